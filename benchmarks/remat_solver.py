"""Claim: mlcycle's planner reaches the optimum (within a proven lower bound) in seconds where
Checkmate's exact MILP does not scale, and beats every baseline at equal or lower memory.

What is measured. :func:`mlcycle.train.remat.solve` (``solver="auto"``) plans one training step
within a memory budget, given as a fraction of the plain step's peak (checkpoint every output):

- on every published Checkmate graph in ``shared/remat-graphs/`` (Checkmate, MLSys 2020, as
  redistributed by Moccasin), at budgets from the smallest feasible one up to 1.0, and at the
  budgets of that folder's README, whose Checkmate MILP / LP-rounding figures are the figures to
  beat (:data:`REFERENCES`);
- on graphs captured from this package's own models (``cost_model="flops"``).

Per plan it records the cost ratio (1.0 = no recomputation), the proven lower bound and the gap
to it, the solver and the wall time, and per baseline (checkpoint-all, Chen sqrt(n), Chen greedy,
articulation points) the cheapest setting whose peak fits the same budget. It draws, per graph,
cost ratio against peak memory: our plans, each baseline's Pareto front over its whole sweep,
and the lower bounds.

Usage::

    python benchmarks/remat_solver.py            # full: ~7 budgets per graph, 60 s limit
    python benchmarks/remat_solver.py --quick    # README budgets only, 5 s limit, < 2 min
    python benchmarks/remat_solver.py --quick --json   # last stdout line: one JSON object

The exit code is 0 whether or not every figure is beaten (this is a measurement); it is non-zero
when a graph could not be loaded or captured, or a solve crashed.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from _common import make_console, make_parser, print_json_last, progress_bar, pyplot, shared_dir
from mlcycle.train.remat import Graph, InfeasibleBudgetError, solve
from mlcycle.train.remat._bounds import min_feasible_bytes
from mlcycle.train.remat.baselines import BaselineRun, sweep_baselines

CLAIM = (
    "mlcycle's planner reaches the optimum (within a proven lower bound) in seconds where "
    "Checkmate's exact MILP does not scale, and beats every baseline at equal or lower memory"
)
NAME = "remat_solver"
TOL = 1e-9


@dataclass(frozen=True)
class Reference:
    """A published figure for one graph and budget: the cost ratio to beat and where from."""

    cost_ratio: float | None  # None: the reference found no feasible schedule
    method: str
    lp_bound: float | None = None  # the LP relaxation's bound reported beside it


# The figures to beat: the "Reference figures" table of shared/remat-graphs/README.md (Checkmate's
# exact MILP, and its LP relaxation + rounding, both on HiGHS, on a 2-core machine). Keys are the
# graph file's stem without "_train" and the budget fraction; the value kept is the best feasible
# figure of the row (the lower of MILP and LP + rounding).
REFERENCES: dict[tuple[str, float], Reference] = {
    ("VGG16_256", 0.9): Reference(1.020, "Checkmate MILP (HiGHS), 1 s"),
    ("vgg_unet_32", 0.9): Reference(1.011, "Checkmate MILP (HiGHS), 5-12 s; LP+rounding 1.012"),
    ("vgg_unet_32", 0.7): Reference(1.030, "Checkmate MILP (HiGHS), 5-12 s; LP+rounding 1.040"),
    ("vgg_unet_32", 0.5): Reference(
        1.072, "Checkmate MILP (HiGHS), 5-12 s; LP+rounding none feasible"
    ),
    ("MobileNet_512", 0.5): Reference(
        1.038, "Checkmate MILP (HiGHS) after 300 s, gap 2.1%; LP+rounding 1.044", 1.019
    ),
    ("MobileNet_512", 0.4): Reference(
        None, "Checkmate MILP (HiGHS): no feasible schedule in 150 s at ~0.41"
    ),
    ("MobileNet_512", 0.3): Reference(
        1.096, "Checkmate MILP (HiGHS) after 300 s, gap 5.6%; LP+rounding 1.169", 1.039
    ),
    ("ResNet50_256", 0.5): Reference(
        1.039, "LP+rounding (LP 63 s); MILP: no feasible schedule in 600 s", 1.018
    ),
    ("ResNet50_256", 0.3): Reference(1.199, "LP+rounding (LP 29 s); MILP not tried", 1.037),
}

# Our own models: (registry name, build keyword arguments).
# Batches where activations, not weights and gradients, dominate the plain peak, so that the
# budgets below are feasible at all (weights, gradients and inputs are constant memory).
FULL_MODELS: list[tuple[str, dict[str, Any]]] = [
    ("resnet18", {"batch": 64}),
    ("resnet50", {"batch": 32}),
    ("vgg19", {"batch": 64}),
    ("mobilenet_v2", {"batch": 32}),
    ("unet", {"batch": 8}),
    ("gpt2-small", {"batch": 8, "seq_len": 512}),
]
QUICK_MODELS: list[tuple[str, dict[str, Any]]] = [("resnet50", {"batch": 32})]
FULL_MODEL_BUDGETS = (0.7, 0.5, 0.4, 0.3)
QUICK_MODEL_BUDGETS = (0.5, 0.3)
FULL_POINTS = 7  # evenly spaced budgets per published graph in the full run


@dataclass
class Job:
    """One graph (published or captured) and the budget fractions to plan it at."""

    label: str
    kind: str  # "published" or "captured"
    load: Callable[[], Graph]
    fractions: list[float] | None  # None: decided once the graph is loaded (published graphs)
    detail: str = ""
    graph: Graph | None = None
    sweep: list[BaselineRun] = field(default_factory=list)
    plain_peak: int = 0
    min_fraction: float = 0.0  # smallest feasible budget, rounded up to 2 decimals
    min_exact: float = 0.0  # min_feasible_bytes / plain peak
    origins: dict[float, str] = field(default_factory=dict)  # budget -> why it is measured
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


# -- budgets ---------------------------------------------------------------------------------


def smallest_feasible_fraction(graph: Graph, plain_peak: int) -> float:
    """``min_feasible_bytes / plain peak`` rounded up to 2 decimals (and still feasible)."""
    least = min_feasible_bytes(graph)
    frac = math.ceil(least / plain_peak * 100 - 1e-9) / 100
    while int(plain_peak * frac) < least:  # float rounding
        frac = round(frac + 0.01, 2)
    return frac


def published_fractions(stem: str, min_fraction: float, quick: bool) -> dict[float, str]:
    """The budgets for a published graph, each with its origin: the README's (quick), or ~7
    evenly spaced ones from the smallest feasible to 1.0 plus the README's (full). README
    budgets below the smallest feasible are kept and recorded as infeasible."""
    origins = {b: "readme" for (s, b) in REFERENCES if s == stem}
    if not quick:
        lo = min(min_fraction, 1.0)
        for k in range(FULL_POINTS):
            origins.setdefault(round(lo + (1.0 - lo) * k / (FULL_POINTS - 1), 2), "spaced")
    return dict(sorted(origins.items(), reverse=True))


# -- loading ---------------------------------------------------------------------------------


def published_jobs(quick: bool, console: Console) -> list[Job]:
    """One job per graph file in ``shared/remat-graphs``; none (with a note) when missing."""
    folder = shared_dir("remat-graphs")
    if folder is None:
        console.print(
            "[yellow]note:[/] shared/remat-graphs not found (looked in <repo>/shared and "
            "<repo>/../shared): the published graphs are skipped."
        )
        return []
    jobs = []
    with_refs = {s for (s, _) in REFERENCES}
    for path in sorted(folder.glob("*_train.json")):
        stem = path.name.removesuffix("_train.json")
        if quick and stem not in with_refs:
            continue
        jobs.append(
            Job(
                label=stem,
                kind="published",
                load=lambda p=path: Graph.from_node_link(p),
                fractions=None,
                detail=path.name,
            )
        )
    skipped = sorted(
        p.name.removesuffix("_train.json")
        for p in folder.glob("*_train.json")
        if p.name.removesuffix("_train.json") not in with_refs
    )
    if quick and skipped:
        console.print(
            f"[dim]quick: only graphs with README budgets; skipping {', '.join(skipped)}[/]"
        )
    return jobs


def captured_jobs(quick: bool) -> list[Job]:
    """One job per model of :data:`QUICK_MODELS` or :data:`FULL_MODELS`.

    Their budgets are the requested fractions; when some of them lie below what any schedule
    of the captured graph needs (parameters, gradients and inputs are resident throughout, so
    small models can rarely halve their peak), the smallest feasible fraction is measured too
    (see :func:`prepare`), so that every model gets at least one constrained plan.
    """
    models = QUICK_MODELS if quick else FULL_MODELS
    budgets = QUICK_MODEL_BUDGETS if quick else FULL_MODEL_BUDGETS
    jobs = []
    for name, kw in models:
        detail = ", ".join(f"{k}={v}" for k, v in kw.items())

        def load(name: str = name, kw: dict[str, Any] = kw) -> Graph:
            from mlcycle.models import build
            from mlcycle.train.remat import capture

            model, inputs = build(name, **kw)
            graph = capture(model, inputs, cost_model="flops")
            graph.name = name
            return graph

        jobs.append(Job(name, "captured", load, sorted(budgets, reverse=True), detail))
    return jobs


def prepare(job: Job, quick: bool) -> None:
    """Load or capture the graph, sweep the baselines, and fix the budgets."""
    graph = job.load()
    job.graph = graph
    job.sweep = sweep_baselines(graph)
    job.plain_peak = next(r.result.peak_bytes for r in job.sweep if r.name == "checkpoint_all")
    job.min_exact = min_feasible_bytes(graph) / job.plain_peak
    job.min_fraction = smallest_feasible_fraction(graph, job.plain_peak)
    if job.fractions is None:
        job.origins = published_fractions(job.label, job.min_fraction, quick)
    else:
        job.origins = {f: "requested" for f in job.fractions}
        if min(job.fractions) < job.min_fraction < 1.0:
            job.origins.setdefault(job.min_fraction, "smallest_feasible")
        job.origins = dict(sorted(job.origins.items(), reverse=True))
    job.fractions = list(job.origins)


# -- one solve -------------------------------------------------------------------------------


def run_one(job: Job, fraction: float, time_limit: float) -> dict[str, Any]:
    """Plan ``job.graph`` at ``fraction`` of its plain peak; one result row."""
    graph = job.graph
    assert graph is not None
    ref = REFERENCES.get((job.label, fraction))
    row: dict[str, Any] = {
        "graph": job.label,
        "kind": job.kind,
        "source": job.detail,
        "nodes": len(graph),
        "budget_fraction": fraction,
        "budget_origin": job.origins.get(fraction),
        "budget_bytes": int(job.plain_peak * fraction),
        "plain_peak_bytes": job.plain_peak,
        "min_feasible_fraction": round(job.min_exact, 6),
        "peak_bytes": None,
        "peak_fraction": None,
        "cost_ratio": None,
        "lower_bound": None,
        "gap": None,
        "solver": None,
        "status": None,
        "solve_s": None,
        "within_budget": None,
        "baselines": {},
        "best_baseline": None,
        "best_baseline_cost_ratio": None,
        "beats_baselines": None,
        "reference": ref.cost_ratio if ref else None,
        "reference_method": ref.method if ref else None,
        "reference_lp_bound": ref.lp_bound if ref else None,
        "beats_reference": None,
    }
    t0 = time.perf_counter()
    try:
        plan = solve(graph, budget_fraction=fraction, time_limit_s=time_limit)
    except InfeasibleBudgetError as err:
        row["solve_s"] = round(time.perf_counter() - t0, 3)
        least = err.min_feasible_bytes
        below = row["budget_bytes"] < least
        row["status"] = "infeasible" if below else "none found"
        row["note"] = (
            f"every schedule needs {least / job.plain_peak:.3f} of the plain peak"
            if below
            else f"no schedule found within {time_limit:g} s"
        )
        return row
    row.update(
        budget_bytes=plan.budget_bytes,
        peak_bytes=plan.peak_bytes,
        peak_fraction=round(plan.peak_bytes / plan.plain_peak_bytes, 6),
        cost_ratio=round(plan.cost_ratio, 6),
        lower_bound=round(plan.lower_bound, 6),
        gap=round(plan.gap, 6),
        solver=plan.solver,
        status=plan.status,
        solve_s=round(plan.solve_s, 3),
        within_budget=plan.peak_bytes <= plan.budget_bytes,
        baselines=plan.baselines,
    )
    # plan.baselines: per baseline, its cheapest setting whose peak fits the same budget.
    fitting = {k: v for k, v in plan.baselines.items() if v["peak_bytes"] <= plan.budget_bytes}
    if fitting:
        best = min(fitting, key=lambda k: (fitting[k]["cost_ratio"], fitting[k]["peak_bytes"]))
        row["best_baseline"] = best
        row["best_baseline_cost_ratio"] = fitting[best]["cost_ratio"]
        row["beats_baselines"] = all(
            plan.cost_ratio <= v["cost_ratio"] + TOL for v in fitting.values()
        )
    else:
        row["beats_baselines"] = True  # no baseline fits the budget at all
    if ref is not None and ref.cost_ratio is not None:
        row["beats_reference"] = plan.cost_ratio <= ref.cost_ratio + TOL
    return row


# -- figures ---------------------------------------------------------------------------------

_COLORS = {
    "checkpoint_all": "tab:gray",
    "chen_sqrtn": "tab:orange",
    "chen_greedy": "tab:green",
    "articulation": "tab:purple",
    "revolve": "tab:brown",
}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower-left envelope of ``(memory, cost)`` points: those no other point beats on
    both, sorted by memory."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1] - 1e-12:
            front.append((x, y))
    return front


def draw(ax: Any, job: Job, small: bool = False) -> None:
    """Cost ratio against peak / plain peak on ``ax``: baselines' fronts, our plans, bounds."""
    plain = job.plain_peak or 1
    by_name: dict[str, list[tuple[float, float]]] = {}
    for run in job.sweep:
        by_name.setdefault(run.name, []).append(
            (run.result.peak_bytes / plain, run.result.cost_ratio)
        )
    ms = 3 if small else 5
    for name, points in by_name.items():
        front = pareto_front(points)
        xs, ys = zip(*front, strict=True)
        ax.plot(
            xs,
            ys,
            drawstyle="steps-post",
            marker="o",
            ms=ms - 1,
            lw=1,
            alpha=0.8,
            color=_COLORS.get(name),
            label=name,
        )
    solved = sorted(
        (r for r in job.rows if r["cost_ratio"] is not None), key=lambda r: r["budget_fraction"]
    )
    if solved:
        ax.plot(
            [r["budget_fraction"] for r in solved],
            [r["lower_bound"] for r in solved],
            ls="--",
            lw=1,
            marker="_",
            ms=ms + 3,
            color="black",
            label="proven lower bound (at budget)",
        )
        ax.plot(
            [r["peak_fraction"] for r in solved],
            [r["cost_ratio"] for r in solved],
            marker="s",
            ms=ms,
            lw=1.5,
            color="tab:blue",
            label="mlcycle solve",
        )
    refs = [r for r in job.rows if r["reference"] is not None]
    if refs:
        ax.scatter(
            [r["budget_fraction"] for r in refs],
            [r["reference"] for r in refs],
            marker="*",
            s=40 if small else 80,
            color="tab:red",
            zorder=5,
            label="README reference (at budget)",
        )
    # No schedule has a peak left of this line.
    ax.axvline(job.min_exact, color="tab:red", lw=0.8, ls=":", alpha=0.6)
    ax.set_title(f"{job.label} ({len(job.graph or [])} nodes)", fontsize=9 if small else 11)
    ax.set_xlabel("peak memory / plain peak", fontsize=8 if small else 10)
    ax.set_ylabel("cost ratio", fontsize=8 if small else 10)
    ax.tick_params(labelsize=7 if small else 9)
    ax.grid(alpha=0.3)
    # Keep the interesting range: baselines at very low memory can cost several times more.
    ys = [y for pts in by_name.values() for _, y in pts]
    top = max([r["cost_ratio"] for r in solved] + [r["reference"] for r in refs] + [1.05])
    ax.set_ylim(0.99, min(max([*ys, top]), max(1.5, 1.15 * top)) + 0.01)


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "graph"


def write_figures(jobs: list[Job], out: Path) -> list[Path]:
    """One PNG per graph and the summary grid ``overhead_vs_memory.png``; returns the paths."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    drawn = [j for j in jobs if j.graph is not None]
    paths = []
    for job in drawn:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        draw(ax, job)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{slug(job.label)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    if drawn:
        cols = min(3, len(drawn))
        rows = math.ceil(len(drawn) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
        for ax, job in zip(axes.flat, drawn, strict=False):
            draw(ax, job, small=True)
        for ax in list(axes.flat)[len(drawn) :]:
            ax.axis("off")
        handles, labels = {}, []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in handles:
                    handles[lab] = h
                    labels.append(lab)
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=4, fontsize=8)
        fig.suptitle("Recomputation overhead vs memory: mlcycle solve vs baselines", fontsize=11)
        fig.tight_layout(rect=(0, 0.06, 1, 0.97))
        path = out / "overhead_vs_memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- report ----------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def results_table(rows: list[dict[str, Any]]) -> Table:
    """The rich table of all rows."""
    table = Table(
        title="mlcycle remat solve vs baselines and published figures",
        caption="budget, peak: fractions of the plain peak; * the smallest feasible budget, "
        "added where a requested one is infeasible; gap: to the proven lower bound",
    )
    for col in ("graph", "nodes", "budget", "peak", "ours", "bound", "gap", "solver", "status"):
        table.add_column(col, justify="left" if col in ("graph", "solver", "status") else "right")
    table.add_column("time s", justify="right")
    table.add_column("best baseline", justify="left")
    table.add_column("reference", justify="right")
    table.add_column("beats", justify="center")
    for r in rows:
        base = (
            f"{r['best_baseline']} {r['best_baseline_cost_ratio']:.3f}"
            if r["best_baseline"]
            else ("none fits" if r["cost_ratio"] is not None else "-")
        )
        if r["reference"] is not None:
            beats = "[green]yes[/]" if r["beats_reference"] else "[red]no[/]"
        elif r["reference_method"] is not None:
            beats = "n/a"
        else:
            beats = ""
        ref = _f(r["reference"]) if r["reference"] is not None else ""
        if r["reference"] is None and r["reference_method"]:
            ref = "none feasible"
        gap = "-" if r["gap"] is None else f"{100 * r['gap']:.2f}%"
        table.add_row(
            r["graph"],
            str(r["nodes"]),
            f"{r['budget_fraction']:.2f}"
            + ("*" if r["budget_origin"] == "smallest_feasible" else ""),
            _f(r["peak_fraction"]),
            _f(r["cost_ratio"], ".4f"),
            _f(r["lower_bound"], ".4f"),
            gap,
            r["solver"] or "-",
            r["status"] or "-",
            _f(r["solve_s"], ".1f"),
            base,
            ref,
            beats,
        )
    return table


def summarize(rows: list[dict[str, Any]], quick: bool, wall_s: float) -> dict[str, Any]:
    """The JSON summary over all rows."""
    solved = [r for r in rows if r["cost_ratio"] is not None]
    with_ref = [r for r in solved if r["reference"] is not None] + [
        r for r in rows if r["cost_ratio"] is None and r["reference"] is not None
    ]
    beaten = sum(1 for r in with_ref if r["beats_reference"])
    gaps = [r["gap"] for r in solved if r["gap"] is not None and math.isfinite(r["gap"])]
    times = [r["solve_s"] for r in solved]
    return {
        "claim": CLAIM,
        "results": rows,
        "all_within_budget": all(r["within_budget"] for r in solved),
        "all_beat_baselines": all(r["beats_baselines"] for r in solved),
        "references_beaten": f"{beaten}/{len(with_ref)}",
        "max_gap": max(gaps) if gaps else None,
        "median_solve_s": round(statistics.median(times), 3) if times else None,
        "solved": len(solved),
        "unsolved": len(rows) - len(solved),
        "wall_s": round(wall_s, 1),
        "quick": quick,
    }


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = make_parser(NAME, __doc__ or "")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds per solve (default: 60, or 5 with --quick)",
    )
    args = parser.parse_args(argv)
    time_limit = args.time_limit or (5.0 if args.quick else 60.0)
    console = make_console(args.json)
    t_start = time.perf_counter()

    jobs = published_jobs(args.quick, console) + captured_jobs(args.quick)
    errors: list[str] = []
    # The published graphs load in milliseconds: fix their budgets now so the bar knows its
    # total; captured models are captured inside the bar.
    for job in jobs:
        if job.kind == "published":
            try:
                prepare(job, args.quick)
            except Exception as exc:  # a broken file must not hide the other results
                job.error = f"{type(exc).__name__}: {exc}"
                errors.append(f"{job.label}: {job.error}")
                console.print(f"[red]error loading {job.label}:[/] {job.error}")
    total = sum(len(j.fractions or []) for j in jobs if j.error is None)
    with progress_bar(console, total, "planning") as update:
        for job in jobs:
            if job.error is not None:
                continue
            if job.graph is None:
                update(0, f"capturing {job.label} ({job.detail})")
                planned = len(job.fractions or [])
                try:
                    prepare(job, args.quick)
                except Exception as exc:
                    job.error = f"{type(exc).__name__}: {exc}"
                    errors.append(f"{job.label}: {job.error}")
                    console.print(f"[red]error capturing {job.label}:[/] {job.error}")
                    console.print(traceback.format_exc(), markup=False, highlight=False)
                    update(planned)
                    continue
                update(0, add_total=len(job.fractions or []) - planned)
            for fraction in job.fractions or []:
                update(0, f"{job.label} ({len(job.graph or [])} nodes) @ {fraction:.2f}")
                try:
                    job.rows.append(run_one(job, fraction, time_limit))
                except Exception as exc:
                    errors.append(f"{job.label} @ {fraction}: {type(exc).__name__}: {exc}")
                    console.print(f"[red]solve crashed on {job.label} @ {fraction}[/]")
                    console.print(traceback.format_exc(), markup=False, highlight=False)
                update()

    rows = [r for j in jobs for r in j.rows]
    figures = write_figures(jobs, args.out)
    summary = summarize(rows, args.quick, time.perf_counter() - t_start)
    summary["time_limit_s"] = time_limit
    summary["figures"] = [str(p) for p in figures]
    summary["errors"] = errors

    console.print(results_table(rows))
    console.print(
        f"references beaten {summary['references_beaten']}, all within budget "
        f"{summary['all_within_budget']}, all beat baselines {summary['all_beat_baselines']}, "
        f"max gap {_f(summary['max_gap'], '.4f')}, median solve {summary['median_solve_s']} s; "
        f"figures in {args.out}"
    )
    for err in errors:
        console.print(f"[red]error:[/] {err}")
    if args.json:
        print_json_last(summary)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
