"""The `mlcycle` command as a user runs it: fast help, light imports, JSON out, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GRAPHS = REPO.parent / "shared" / "remat-graphs"
PLAN_FIELDS = {
    "nodes",
    "budget_bytes",
    "peak_bytes",
    "cost_ratio",
    "lower_bound",
    "solver",
    "status",
    "solve_s",
    "baselines",
}


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlcycle.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_import_is_light() -> None:
    code = (
        "import sys, mlcycle, mlcycle.cli, mlcycle.train.remat, mlcycle.models;"
        "heavy = [m for m in ('torch', 'ray', 'mlflow', 'duckdb', 'ortools') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_is_fast() -> None:
    run("--help")  # warm the file cache once
    t0 = time.perf_counter()
    out = run("--help")
    assert out.returncode == 0 and "remat" in out.stdout and "demo" in out.stdout
    assert time.perf_counter() - t0 < 1.0


def test_version() -> None:
    from mlcycle import __version__

    assert run("version").stdout.strip() == __version__


@pytest.mark.skipif(not GRAPHS.exists(), reason="shared/remat-graphs not present")
def test_solve_graph_json() -> None:
    out = run(
        "remat",
        "solve-graph",
        str(GRAPHS / "VGG16_256_train.json"),
        "--budget-fraction",
        "0.9",
        "--time-limit",
        "20",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert PLAN_FIELDS | {"graph"} <= data.keys()
    assert data["peak_bytes"] <= data["budget_bytes"]
    assert data["cost_ratio"] <= 1.020 + 1e-9  # the exact MILP's figure in the graphs' README
    assert 1.0 <= data["lower_bound"] <= data["cost_ratio"]


@pytest.mark.skipif(not GRAPHS.exists(), reason="shared/remat-graphs not present")
def test_infeasible_budget_is_a_clear_error() -> None:
    out = run(
        "remat", "solve-graph", str(GRAPHS / "VGG16_256_train.json"), "--budget-fraction", "0.5"
    )
    assert out.returncode == 2
    assert "infeasible" in out.stderr and "at least" in out.stderr


def test_plan_model_json() -> None:
    out = run(
        "remat",
        "plan",
        "--model",
        "resnet-tiny",
        "--batch",
        "4",
        "--budget-fraction",
        "0.5",
        "--time-limit",
        "10",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert PLAN_FIELDS | {"model"} <= data.keys()
    assert data["peak_bytes"] <= data["budget_bytes"]


def test_unknown_model_lists_the_valid_ones() -> None:
    out = run("remat", "plan", "--model", "nope")
    assert out.returncode == 2 and "resnet50" in out.stderr
