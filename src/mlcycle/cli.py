"""The ``mlcycle`` command: ``mlcycle <stage> <verb>``; ``mlcycle demo`` runs the lifecycle.

Heavy libraries (torch, ortools, ray, ...) are imported inside the commands, so that
``mlcycle --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mlcycle._version import __version__
from mlcycle.develop._cli import tune
from mlcycle.serve.online._cli import serve_app
from mlcycle.train.lowbit._cli import lowbit_app

app = typer.Typer(
    help="mlcycle: the machine-learning lifecycle, each stage on the systems that made it fast.",
    no_args_is_help=True,
    add_completion=False,
)
remat_app = typer.Typer(
    help="Train beyond the memory wall: optimal rematerialization (Checkmate).",
    no_args_is_help=True,
)
app.add_typer(remat_app, name="remat")
app.add_typer(serve_app, name="serve")  # defined beside the server; imports typer and stdlib only
app.add_typer(lowbit_app, name="lowbit")
app.command(help="Find the best model by a deadline on a pool of atoms (HyperSched on Ray Tune).")(
    tune
)

SolverOpt = Annotated[
    str, typer.Option("--solver", help="auto | greedy | milp | cpsat | a baseline name")
]
TimeOpt = Annotated[float, typer.Option("--time-limit", help="seconds for the exact search")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
FractionOpt = Annotated[
    float, typer.Option("--budget-fraction", help="budget as a fraction of the plain peak")
]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def version() -> None:
    """Print the mlcycle version."""
    typer.echo(__version__)


def _plan_report(plan: Any, head: dict[str, Any], as_json: bool) -> None:
    data = {**head, **plan.to_dict()}
    if as_json:
        typer.echo(json.dumps(data))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{head.get('model', head.get('graph'))}: {data['nodes']} nodes")
    table.add_column("schedule")
    table.add_column("peak", justify="right")
    table.add_column("peak / plain", justify="right")
    table.add_column("cost ratio", justify="right")
    plain = plan.plain_peak_bytes
    table.add_row(
        f"mlcycle ({plan.solver}, {plan.status})",
        _gib(plan.peak_bytes),
        f"{plan.peak_bytes / plain:.3f}",
        f"{plan.cost_ratio:.4f}",
    )
    for name, b in plan.baselines.items():
        table.add_row(
            name, _gib(b["peak_bytes"]), f"{b['peak_bytes'] / plain:.3f}", f"{b['cost_ratio']:.4f}"
        )
    console = Console()
    console.print(table)
    console.print(
        f"budget {_gib(plan.budget_bytes)} ({plan.budget_bytes / plain:.2f} of plain "
        f"{_gib(plain)}); proven lower bound {plan.lower_bound:.4f} (gap {plan.gap:.2%}); "
        f"solved in {plan.solve_s:.1f} s"
    )


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.2f} MiB"


@remat_app.command("plan")
def remat_plan(
    model: Annotated[str, typer.Option("--model", help="a name from mlcycle.models")],
    batch: Annotated[int, typer.Option("--batch", help="batch size of the example input")] = 8,
    budget_fraction: FractionOpt = 0.5,
    solver: SolverOpt = "auto",
    time_limit: TimeOpt = 60.0,
    cost_model: Annotated[
        str, typer.Option("--cost-model", help="auto | measure | flops")
    ] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Capture a model's training step and plan it within a memory budget."""
    from mlcycle.models import build, list_models
    from mlcycle.train.remat import InfeasibleBudgetError, capture, solve

    if model not in list_models():
        _fail(f"unknown model {model!r}; choose one of {', '.join(list_models())}.")
    module, inputs = build(model, batch=batch)
    graph = capture(module, inputs, cost_model=cost_model)
    try:
        plan = solve(graph, budget_fraction=budget_fraction, solver=solver, time_limit_s=time_limit)
    except (InfeasibleBudgetError, ValueError) as exc:
        _fail(str(exc))
    _plan_report(plan, {"model": model, "batch": batch}, as_json)


@remat_app.command("solve-graph")
def remat_solve_graph(
    file: Annotated[Path, typer.Argument(help="node-link JSON graph (Checkmate format)")],
    budget_fraction: FractionOpt = 0.5,
    solver: SolverOpt = "auto",
    time_limit: TimeOpt = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Plan a published graph; the budget is relative to the checkpoint-all peak."""
    from mlcycle.train.remat import Graph, InfeasibleBudgetError, solve

    try:
        graph = Graph.from_node_link(file)
        plan = solve(graph, budget_fraction=budget_fraction, solver=solver, time_limit_s=time_limit)
    except (InfeasibleBudgetError, ValueError, FileNotFoundError, KeyError) as exc:
        _fail(str(exc))
    _plan_report(plan, {"graph": file.name}, as_json)


@remat_app.command("check")
def remat_check(
    model: Annotated[str, typer.Option("--model", help="a name from mlcycle.models")],
    batch: Annotated[int, typer.Option("--batch", help="batch size")] = 8,
    budget_fraction: FractionOpt = 0.5,
    solver: SolverOpt = "auto",
    time_limit: TimeOpt = 60.0,
    steps: Annotated[int, typer.Option("--steps", help="timed steps (median)")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Run the planned step beside the plain one: gradients, peak memory, step time."""
    from mlcycle.models import list_models
    from mlcycle.train.remat import InfeasibleBudgetError
    from mlcycle.train.remat.check import check_model

    if model not in list_models():
        _fail(f"unknown model {model!r}; choose one of {', '.join(list_models())}.")
    try:
        result = check_model(
            model,
            batch=batch,
            budget_fraction=budget_fraction,
            steps=steps,
            solver=solver,
            time_limit_s=time_limit,
        )
    except (InfeasibleBudgetError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console

    r = result
    Console().print(
        f"{model} batch {batch} on {r['device']}: peak {_gib(r['measured_peak_bytes'])} "
        f"(predicted {_gib(r['predicted_peak_bytes'])}, plain {_gib(r['plain_peak_bytes'])}, "
        f"{r['mem_ratio']:.2f}x); step {r['step_s_remat']:.3f} s vs {r['step_s_plain']:.3f} s "
        f"({r['time_ratio']:.2f}x); planned compute {r['cost_ratio']:.3f}x; "
        f"max |grad diff| {r['grad_max_abs_diff']:.2e}"
    )


@remat_app.command(
    "bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def remat_bench(ctx: typer.Context) -> None:
    """Run benchmarks/remat_train.py (ours beside torch's checkpointing and torch.compile);
    extra arguments such as --quick and --json are passed on."""
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "remat_train.py"
    if not script.exists():
        _fail(
            f"{script} not found: the benchmarks ship with the source checkout, not the wheel. "
            "Clone the repository and run `make bench`."
        )
    sys.argv = [str(script), *ctx.args]
    runpy.run_path(str(script), run_name="__main__")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick/--full", help="small sizes")] = True,
) -> None:
    """Run every lifecycle stage that exists, on embedded defaults, and sum up."""
    from mlcycle._demo import run_demo

    sys.exit(run_demo(quick=quick))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
