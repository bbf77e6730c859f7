"""`mlcycle tune`: the best model by a deadline, on a pool of atoms (registered in cli.py).

Only typer is imported here; Ray, torch and the scheduler load when the command runs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["parse_duration_s", "tune"]

_UNITS_S = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration_s(text: str) -> float:
    """Seconds in ``"120s"``, ``"2m"``, ``"1.5h"`` or ``"90"``.

    Raises:
        ValueError: for anything else, with examples of what is valid.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"deadline {text!r} is not a positive duration; write e.g. 120s, 2m, 1h or 90."
        )
    return float(match.group(1)) * _UNITS_S[match.group(2) or ""]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def tune(
    deadline: Annotated[
        str, typer.Option("--deadline", help="wall-clock budget: 120s, 2m, 1h or seconds")
    ] = "120s",
    atoms: Annotated[
        int, typer.Option("--atoms", help="CPUs the trials share (one worker process each)")
    ] = 2,
    scheduler: Annotated[
        str,
        typer.Option("--scheduler", help="hypersched | asha | rcs (Ray's resource changer)"),
    ] = "hypersched",
    workload: Annotated[
        str,
        typer.Option("--workload", help="digits (a CNN, real work) | synthetic (known curves)"),
    ] = "digits",
    seed: Annotated[int, typer.Option("--seed", help="seeds the searched configurations")] = 0,
    address: Annotated[
        str | None, typer.Option("--address", help="a Ray cluster address; default: local Ray")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="PNG of accuracy vs time (default out/tune/<run>.png)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Search hyperparameters until a deadline: HyperSched explores, then gives the best
    trials all the atoms (Liaw et al., SoCC 2019); asha and rcs are Ray Tune's own."""
    from mlcycle.develop._runner import SCHEDULERS
    from mlcycle.develop._workloads import WORKLOADS

    try:
        deadline_s = parse_duration_s(deadline)
    except ValueError as exc:
        _fail(str(exc))
    if scheduler not in SCHEDULERS:
        _fail(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
    if workload not in WORKLOADS:
        _fail(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}.")
    if atoms < 1:
        _fail(f"--atoms must be >= 1, got {atoms}.")
    from rich.console import Console

    from mlcycle.develop._runner import run_tune

    console = Console(stderr=as_json)
    if plot is None:
        plot = Path("out") / "tune" / f"{scheduler}_{workload}_seed{seed}.png"
    try:
        report = run_tune(
            workload=workload,
            scheduler=scheduler,
            deadline_s=deadline_s,
            atoms=atoms,
            seed=seed,
            address=address,
            console=console,
            plot_path=plot,
        )
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(_jsonable(report.to_dict())) + "\n")
        return
    _print_report(console, report)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _print_report(console: Any, report: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{report.scheduler} on {report.workload}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    acc = "no trial reported" if report.best_accuracy is None else f"{report.best_accuracy:.4f}"
    config = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in (report.best_config or {}).items()
    )
    rows = [
        ("best trial", f"{report.best_trial or '-'} ({config})"),
        ("accuracy at the deadline", f"{acc} after {report.best_iterations} iterations"),
        ("trials run", str(report.trials_run)),
        ("atom utilisation", f"{report.atom_utilisation:.0%} of {report.atoms} atoms"),
        ("resizes", str(report.resizes)),
        ("deadline", f"{report.deadline_s:g} s (finished in {report.wall_s:.1f} s)"),
        ("plot", str(report.plot)),
    ]
    summary = report.scheduler_summary or {}
    if summary.get("admission_closed_at_s") is not None:
        rows.append(("admission closed", f"at {summary['admission_closed_at_s']:.1f} s"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
