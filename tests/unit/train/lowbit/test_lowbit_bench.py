"""The benchmark's pieces, the demo summary, the CLI's JSON, and a torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from mlcycle.train.lowbit import _bench  # noqa: E402

SUMMARY_FIELDS = {
    "unbiased",
    "variance_ratios",
    "mem_reduction_2bit",
    "mem_reduction_4bit",
    "acc_fp32",
    "acc_drop_4bit",
    "acc_drop_2bit",
    "throughput_ratio_2bit",
}


def test_importing_the_package_does_not_import_torch() -> None:
    code = (
        "import sys, mlcycle.train.lowbit as L, mlcycle.train.lowbit._cli; "
        "L.compressed_graph; L.compression_ratio; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unbiasedness_measure_separates_stochastic_from_nearest() -> None:
    r = _bench.measure_unbiasedness(n=2000, bits=(2, 4))
    assert r["unbiased"] and r["within_3sigma"] >= 0.99
    assert r["nearest_bias_sigmas"] > 10
    assert {row["kind"] for row in r["rows"]} == {
        "per_tensor",
        "per_sample",
        "householder",
        "nearest",
    }


def test_variance_measure_is_ordered_and_checked_by_monte_carlo() -> None:
    r = _bench.measure_variance_ratios(bits=(4,), draws=8)
    row = r["by_bits"]["4"]
    assert row["per_tensor/per_sample"] > 1 and row["per_sample/householder"] > 1
    assert all(0.5 < v < 1.5 for v in row["mc_over_exact"].values())


def test_demo_summary_reports_the_activation_memory_saved() -> None:
    s = _bench.demo_summary(quick=True)
    assert s["reduction"] >= 10 and s["bits"] == 2
    assert s["saved_bytes"] == s["saved_fp32_bytes"] - s["saved_compressed_bytes"] > 0
    assert s["loss_last"] < s["loss_first"]  # it trains


def test_accuracy_runs_share_seeds_and_report_drops() -> None:
    r = _bench.measure_accuracy(seeds=(0,), steps=8, bits=(2,))
    fp32, two = r["runs"]
    assert fp32["bits"] is None and two["bits"] == 2 and fp32["seed"] == two["seed"] == 0
    assert r["drop"]["2"] == pytest.approx(fp32["acc"] - two["acc"])
    assert two["reduction"] > 10
    assert len(r["fp32_models"]) == 1


def test_cli_bench_prints_exactly_the_summary_fields_last(monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from mlcycle.train.lowbit._cli import lowbit_app

    monkeypatch.setattr(
        _bench,
        "measure_memory",
        lambda *a, **k: [
            {
                "model": "m",
                "batch": 1,
                "bits": b,
                "forward_s": 0.0,
                "original_bytes": 100,
                "stored_bytes": 100 // (16 // b),
                "reduction": 16 / b,
                "compressed": 1,
                "kept": 0,
                "reused": 0,
                "parameters": 0,
            }
            for b in (2, 4, 8)
        ],
    )
    monkeypatch.setattr(
        _bench,
        "measure_accuracy",
        lambda **k: {
            "steps": 1,
            "seeds": [0],
            "test_images": 450,
            "runs": [],
            "acc_fp32": 97.0,
            "acc_fp32_range": [97.0, 97.0],
            "drop": {"8": 0.0, "4": 0.1, "2": 0.3},
            "drop_range": {"8": [0, 0], "4": [0.1, 0.1], "2": [0.3, 0.3]},
            "fp32_models": [_bench.DigitsCNN(4)],
        },
    )
    monkeypatch.setattr(
        _bench,
        "measure_throughput",
        lambda **k: {
            "model": "m",
            "batch": 1,
            "bits": 2,
            "fp32_step_s": 1.0,
            "compressed_step_s": 2.0,
            "throughput_ratio": 0.5,
        },
    )
    monkeypatch.setattr(
        _bench,
        "measure_unbiasedness",
        lambda **k: {
            "n": 200,
            "rows": [],
            "within_3sigma": 1.0,
            "unbiased": True,
            "nearest_bias_sigmas": 50.0,
        },
    )
    monkeypatch.setattr(
        _bench,
        "measure_variance_ratios",
        lambda **k: {
            "shape": [2, 2],
            "by_bits": {
                "4": {
                    "variance": {},
                    "mc_over_exact": {},
                    "per_tensor/per_sample": 3.0,
                    "per_sample/householder": 2.0,
                    "per_tensor/householder": 6.0,
                }
            },
        },
    )
    monkeypatch.setattr(
        _bench,
        "measure_gradient_variance",
        lambda *a, **k: {
            "4": {"by_kind": {}, "per_tensor/per_sample": 4.0, "per_sample/householder": 1.5}
        },
    )
    out = tmp_path / "details.json"
    res = CliRunner().invoke(lowbit_app, ["bench", "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(summary) == SUMMARY_FIELDS
    assert summary["mem_reduction_2bit"] == 8.0 and summary["mem_reduction_4bit"] == 4.0
    assert summary["variance_ratios"]["4"]["gradient per_sample/householder"] == 1.5
    assert json.loads(out.read_text())["summary"] == summary
