"""``mlcycle lowbit ...``: the low-bit training commands (wired into :mod:`mlcycle.cli`).

Heavy imports (torch, scikit-learn) happen inside the commands, so ``mlcycle --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["lowbit_app", "print_report"]

lowbit_app = typer.Typer(
    help="Low-bit training that stays unbiased: stochastic rounding, quantized gradients, "
    "compressed activations (ActNN).",
    no_args_is_help=True,
)


@lowbit_app.callback()
def _group() -> None:
    """Low-bit training that stays unbiased: stochastic rounding, quantized gradients, ActNN."""


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def print_report(result: dict[str, Any], console: Any) -> None:
    """Print :func:`mlcycle.train.lowbit.run_bench`'s result as tables on a rich console."""
    from rich.table import Table

    s, d = result["summary"], result["details"]
    u = d["unbiasedness"]
    console.print(
        f"(a) unbiasedness: {u['within_3sigma']:.1%} of stochastic-rounding means of "
        f"{u['n']:,} draws lie within 3 sigma/sqrt(n) of the input (unbiased: {s['unbiased']}); "
        f"round-to-nearest is off by up to {u['nearest_bias_sigmas']:.0f} sigma/sqrt(n)."
    )
    t = Table(title="(b) variance ratios on outlier-row tensors (and fully quantized gradients)")
    t.add_column("bits")
    keys = list(next(iter(s["variance_ratios"].values())))
    for k in keys:
        t.add_column(k, justify="right")
    for b, row in s["variance_ratios"].items():
        t.add_row(b, *(f"{row.get(k, float('nan')):.1f}" for k in keys))
    console.print(t)
    t = Table(title="(c) saved-activation memory, hooks' own count (one forward pass)")
    for col in ("model", "batch", "bits", "fp32", "stored", "reduction"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for r in d["memory"]:
        t.add_row(
            r["model"],
            str(r["batch"]),
            str(r["bits"]),
            _fmt_bytes(r["original_bytes"]),
            _fmt_bytes(r["stored_bytes"]),
            f"{r['reduction']:.2f}x",
        )
    console.print(t)
    a = d["accuracy"]
    t = Table(
        title=f"(d) digits CNN test accuracy ({a['test_images']} images, {a['steps']} steps, "
        f"seeds {a['seeds']})"
    )
    for col in ("activations", "mean accuracy", "drop (points)", "drop range over seeds"):
        t.add_column(col, justify="right")
    t.add_row("fp32", f"{a['acc_fp32']:.2f}", "", "")
    for b, drop in a["drop"].items():
        lo, hi = a["drop_range"][b]
        t.add_row(
            f"{b} bits", f"{a['acc_fp32'] - drop:.2f}", f"{drop:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]"
        )
    console.print(t)
    th = d["throughput"]
    console.print(
        f"(e) throughput at {th['bits']} bits, {th['model']} batch {th['batch']}: "
        f"{th['throughput_ratio']:.2f}x of fp32 ({th['fp32_step_s'] * 1e3:.0f} ms vs "
        f"{th['compressed_step_s'] * 1e3:.0f} ms per step)"
    )


@lowbit_app.command()
def bench(
    quick: Annotated[
        bool, typer.Option("--quick/--full", help="reduced run (< 2 min on 2 cores) or full")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="last stdout line: one JSON object (the summary)")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="also write every measurement to this JSON file")
    ] = None,
) -> None:
    """Measure unbiasedness, variance, activation memory, accuracy and throughput."""
    from rich.console import Console

    from mlcycle.train.lowbit._bench import run_bench

    console = Console(stderr=as_json)
    with console.status("low-bit benchmark ...") as status:
        result = run_bench(quick=quick, progress=lambda text: status.update(text))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
    print_report(result, console)
    if as_json:
        sys.stderr.flush()
        typer.echo(json.dumps(_finite(result["summary"]), separators=(",", ":")))


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no inf/nan)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
