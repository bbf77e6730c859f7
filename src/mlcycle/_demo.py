"""``mlcycle demo``: each lifecycle stage that exists, in order, then a summary table.

A stage that is not built yet is listed as such, never faked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class StageResult:
    stage: str
    system: str
    status: str  # "ok" | "not built yet" | "failed"
    result: str


def _remat(quick: bool) -> str:
    from mlcycle.models import build
    from mlcycle.train.remat import capture, solve

    # Batches where activations dominate memory, as in real training.
    name, batch, kw = ("resnet50", 32, {}) if quick else ("resnet50", 64, {})
    module, inputs = build(name, batch=batch, **kw)
    graph = capture(module, inputs, cost_model="flops")
    rows = []
    for fraction in (0.5, 0.3):
        plan = solve(graph, budget_fraction=fraction, time_limit_s=10 if quick else 60)
        best_base = min((b["cost_ratio"] for b in plan.baselines.values()), default=float("nan"))
        rows.append(
            f"at {fraction:.1f}x memory: {plan.cost_ratio:.3f}x compute "
            f"(bound {plan.lower_bound:.3f}, best baseline {best_base:.3f})"
        )
    return f"{name} batch {batch}, {len(graph)} nodes; " + "; ".join(rows)


def _remat_train(quick: bool) -> str:
    from mlcycle.train.remat.check import check_model

    name, batch = ("resnet-tiny", 64) if quick else ("resnet50", 16)
    r = check_model(name, batch=batch, budget_fraction=0.4, steps=3, time_limit_s=10)
    return (
        f"{name} batch {batch}, 3 training steps at a 0.4 budget: peak "
        f"{r['measured_peak_bytes'] / 2**20:.1f} MiB vs plain {r['plain_peak_bytes'] / 2**20:.1f}"
        f" MiB ({1 - r['mem_ratio']:.0%} saved), step time {r['time_ratio']:.2f}x, "
        f"gradients equal to the plain step within {r['grad_max_abs_diff']:.1e}"
    )


def _lowbit(quick: bool) -> str:
    from mlcycle.train.lowbit import demo_summary

    r = demo_summary(quick=quick)
    return (
        f"digits CNN, {r['steps']} training steps with activations saved at {r['bits']} bits: "
        f"{r['saved_fp32_bytes'] / 2**20:.2f} MiB of float32 activations held as "
        f"{r['saved_compressed_bytes'] / 2**20:.2f} MiB ({r['reduction']:.1f}x less), loss "
        f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}"
    )


# (stage, reference system, runner or None when the stage is not built yet)
STAGES: list[tuple[str, str, Callable[[bool], str] | None]] = [
    ("develop", "HyperSched: trials on a deadline", None),
    ("train", "Checkmate: plan a step within a memory budget", _remat),
    ("train", "Checkmate: train under that budget", _remat_train),
    ("train", "ActNN: activations compressed to 2 bits", _lowbit),
    ("registry", "model versions on MLflow", None),
    ("serve online", "Clipper: adaptive batching, cache, selection", None),
    ("serve offline", "predictions in DuckDB", None),
    ("secure", "differential privacy, secure aggregation", None),
]


def run_demo(*, quick: bool = True) -> int:
    """Run the demo; return the process exit code (0 when every built stage succeeded)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results: list[StageResult] = []
    for stage, system, runner in STAGES:
        if runner is None:
            results.append(StageResult(stage, system, "not built yet", ""))
            continue
        console.rule(f"[bold]{stage}[/]: {system}")
        t0 = time.perf_counter()
        try:
            with console.status(f"running {stage} ..."):
                summary = runner(quick)
            status = "ok"
        except Exception as exc:  # the demo reports a failed stage and goes on
            summary, status = f"{type(exc).__name__}: {exc}", "failed"
        console.print(f"{summary}  [dim]({time.perf_counter() - t0:.1f} s)[/]")
        results.append(StageResult(stage, system, status, summary))
    table = Table(title="mlcycle demo")
    for col in ("stage", "system", "status", "result"):
        table.add_column(col, overflow="fold")
    colour = {"ok": "green", "failed": "red"}
    for r in results:
        table.add_row(r.stage, r.system, f"[{colour.get(r.status, 'dim')}]{r.status}[/]", r.result)
    console.print(table)
    return 1 if any(r.status == "failed" for r in results) else 0
