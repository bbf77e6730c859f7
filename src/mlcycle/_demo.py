"""``mlcycle demo``: each lifecycle stage that exists, in order, then a summary table.

A stage that is not built yet is listed as such, never faked.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    stage: str
    system: str
    status: str  # "ok" | "not built yet" | "failed"
    result: str


def _remat(quick: bool, ctx: dict[str, Any]) -> str:
    from mlcycle.models import build
    from mlcycle.train.remat import capture, solve

    # Batches where activations dominate memory, as in real training.
    name, batch, kw = ("resnet50", 32, {}) if quick else ("resnet50", 64, {})
    module, inputs = build(name, batch=batch, **kw)
    graph = capture(module, inputs, cost_model="flops")
    rows = []
    for fraction in (0.5, 0.3):
        plan = solve(graph, budget_fraction=fraction, time_limit_s=10 if quick else 60)
        best = min((b["cost_ratio"] for b in plan.baselines.values()), default=None)
        base = f"best baseline {best:.3f}" if best is not None else "no baseline fits"
        rows.append(
            f"at {fraction:.1f}x memory: {plan.cost_ratio:.3f}x compute "
            f"(bound {plan.lower_bound:.3f}, {base})"
        )
    return f"{name} batch {batch}, {len(graph)} nodes; " + "; ".join(rows)


def _remat_train(quick: bool, ctx: dict[str, Any]) -> str:
    from mlcycle.train.remat.check import check_model

    name, batch = ("resnet-tiny", 64) if quick else ("resnet50", 16)
    r = check_model(name, batch=batch, budget_fraction=0.4, steps=3, time_limit_s=10)
    return (
        f"{name} batch {batch}, 3 training steps at a 0.4 budget: peak "
        f"{r['measured_peak_bytes'] / 2**20:.1f} MiB vs plain {r['plain_peak_bytes'] / 2**20:.1f}"
        f" MiB ({1 - r['mem_ratio']:.0%} saved), step time {r['time_ratio']:.2f}x, "
        f"gradients equal to the plain step within {r['grad_max_abs_diff']:.1e}"
    )


def _lowbit(quick: bool, ctx: dict[str, Any]) -> str:
    from mlcycle.train.lowbit import demo_summary

    r = demo_summary(quick=quick)
    return (
        f"digits CNN, {r['steps']} training steps with activations saved at {r['bits']} bits: "
        f"{r['saved_fp32_bytes'] / 2**20:.2f} MiB of float32 activations held as "
        f"{r['saved_compressed_bytes'] / 2**20:.2f} MiB ({r['reduction']:.1f}x less), loss "
        f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}"
    )


def _tune(quick: bool, ctx: dict[str, Any]) -> str:
    from mlcycle.develop import demo_tune

    r = demo_tune(deadline_s=40.0 if quick else 90.0)  # Ray and gloo start-up come first
    ctx["digits_config"] = r["best_config"]
    ctx["digits_epochs"] = r["best_iterations"]  # what the best trial had trained when scored
    return str(r["summary"])


def _train_digits(quick: bool, ctx: dict[str, Any]) -> str:
    """Train the digits CNN with the tuned settings and save it for the serving stage."""
    import torch
    import torch.nn.functional as F

    from mlcycle.develop._digits import build_model, load_digits_split

    cfg = ctx.get("digits_config") or {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "seed": 0}
    x_tr, y_tr, x_val, y_val = load_digits_split()
    model = build_model(int(cfg.get("seed", 0)), int(cfg.get("width", 1)))
    opt = torch.optim.SGD(
        model.parameters(),
        lr=float(cfg["lr"]),
        momentum=float(cfg.get("momentum", 0.0)),
        weight_decay=float(cfg.get("weight_decay", 0.0)),
    )
    gen = torch.Generator().manual_seed(0)
    # As many epochs as the best trial had when it was scored, so the saved model is the one
    # the tuning stage reported on (the first trials can be cut short by the deadline).
    epochs = min(int(ctx.get("digits_epochs") or (8 if quick else 30)), 30)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_tr), generator=gen).split(int(cfg.get("batch_size", 64))):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_val).argmax(1) == y_val).float().mean())
    path = Path(ctx["workdir"]) / "digits.pt"
    torch.save(model, path)
    ctx.update(digits_path=str(path), digits_val=(x_val, y_val))
    tuned = "tuned" if ctx.get("digits_config") else "default"
    return f"digits CNN ({tuned} settings), {epochs} epochs: validation accuracy {acc:.1%}"


def _serve(quick: bool, ctx: dict[str, Any]) -> str:
    """Serve the model trained above and replay a burst (gamma arrivals, CV 4) against it."""
    import json

    from mlcycle.serve.online._launch import serve_in_process
    from mlcycle.serve.online.loadgen import gamma_arrivals, open_loop, summarize

    if "digits_path" not in ctx:
        raise RuntimeError("the training stage saved no model to serve")
    x_val, _ = ctx["digits_val"]
    slo_ms, rate_rps, duration_s = 50.0, 400.0, 4.0 if quick else 15.0
    config = {
        "models": [
            {
                "name": "digits",
                "factory": "mlcycle.serve.online.examples:from_file",
                "args": {"path": ctx["digits_path"]},
                "batching": {"policy": "aimd", "max_batch_size": 64},
            }
        ],
        "apps": [{"name": "digits", "slo_ms": slo_ms, "default": None, "models": ["digits"]}],
    }
    bodies = [json.dumps({"input": x.tolist()}).encode() for x in x_val[:64]]
    with serve_in_process(config) as url:
        arrivals = gamma_arrivals(rate_rps, duration_s, cv=4.0, seed=0)
        samples, span_s = open_loop(f"{url}/digits/predict", bodies, arrivals)
    r = summarize(samples, slo_ms=slo_ms, span_s=span_s, offered_rps=rate_rps)
    return (
        f"the digits model on mlcycle serve, a {duration_s:g} s burst at {rate_rps:g} queries/s "
        f"(gamma, CV 4), SLO {slo_ms:g} ms: {r.within_slo:.1%} answered within the SLO "
        f"({r.default_share:.1%} with the marked default), p50 {r.p50_ms:.1f} ms, "
        f"p99 {r.p99_ms:.1f} ms, goodput {r.goodput_rps:.0f}/s"
    )


# (stage, reference system, runner or None when the stage is not built yet)
STAGES: list[tuple[str, str, Callable[[bool, dict[str, Any]], str] | None]] = [
    ("develop", "HyperSched: trials on a deadline", _tune),
    ("train", "the tuned digits CNN, saved for serving", _train_digits),
    ("train", "Checkmate: plan a step within a memory budget", _remat),
    ("train", "Checkmate: train under that budget", _remat_train),
    ("train", "ActNN: activations compressed to 2 bits", _lowbit),
    ("registry", "model versions on MLflow", None),
    ("serve online", "Clipper: the trained model under a burst", _serve),
    ("serve offline", "predictions in DuckDB", None),
    ("secure", "differential privacy, secure aggregation", None),
]


def run_demo(*, quick: bool = True) -> int:
    """Run the demo; return the process exit code (0 when every built stage succeeded)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results: list[StageResult] = []
    workdir = tempfile.TemporaryDirectory(prefix="mlcycle-demo-")
    ctx: dict[str, Any] = {"workdir": workdir.name}
    for stage, system, runner in STAGES:
        if runner is None:
            results.append(StageResult(stage, system, "not built yet", ""))
            continue
        console.rule(f"[bold]{stage}[/]: {system}")
        t0 = time.perf_counter()
        try:
            with console.status(f"running {stage} ..."):
                summary = runner(quick, ctx)
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
    workdir.cleanup()
    return 1 if any(r.status == "failed" for r in results) else 0
