"""Plan a training step within a memory budget at the least recomputation: the Plan API.

``solve`` works on any :class:`~mlcycle.train.remat.graph.Graph`; ``plan`` captures a PyTorch
module first. The strategy behind ``solver="auto"``:

1. **A proven lower bound first** (:mod:`._bounds`): the cut knapsack bound, valid for every
   schedule with any number of recomputations. A budget below the least that any schedule
   needs raises :class:`InfeasibleBudgetError` naming that least budget.
2. **Fast incumbents**: every baseline of :mod:`.baselines` at its best setting, the ratio
   greedy of :mod:`._heuristic` (drop the outputs cheapest per byte, then repair), and
   eviction under a hard cap with lookahead (DTR, Kirisame et al., ICLR 2021). On the
   published Checkmate graphs these land within 0.1% of the bound at moderate budgets, and
   within a few percent at tight ones, in seconds. Then a local search over the eviction
   choices (``evict_search``): one choice at a time, evict another candidate and rerun.
3. **Exact search while the gap is open**: Checkmate's MILP (Jain et al., MLSys 2020, Sec. 4)
   on HiGHS for small graphs, and the interval model of Moccasin (Bartan et al., ICML 2023)
   on CP-SAT for larger ones, seeded with the incumbent and limited to the remaining time.

Every :class:`Plan` is replayed by the simulator, the single judge, before it is returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from mlcycle.train.remat.graph import Graph, Schedule
from mlcycle.train.remat.simulate import SimResult, simulate

__all__ = ["Plan", "InfeasibleBudgetError", "SOLVERS", "solve", "plan", "resolve_budget"]

SOLVERS = (
    "auto",
    "greedy",
    "milp",
    "cpsat",
    "checkpoint_all",
    "chen_sqrtn",
    "chen_greedy",
    "articulation",
    "revolve",
)
MILP_MAX_NODES = 120  # above this, Checkmate's MILP rarely finishes in a minute on 2 cores
# Eviction scores cost / (bytes**beta * distance**alpha), with or without the cost of evicted
# inputs ("chain"): the six variants that won most often on the published and captured graphs.
EVICT_SCORES = (
    (0.5, 0.5, True),
    (0.5, 1.0, True),
    (1.0, 1.0, False),
    (1.0, 1.0, True),
    (1.5, 1.0, False),
    (2.0, 1.0, False),
)
# Shares of the time left that the eviction search (``_heuristic.evict_search``) may take before
# CP-SAT and the MILP, on graphs above and up to MILP_MAX_NODES nodes.
SEARCH_SHARE_LARGE = 0.75
SEARCH_SHARE_SMALL = 0.25
CPSAT_LARGE_MIN_S = 20.0  # the least time worth giving CP-SAT on graphs above MILP_MAX_NODES
CPSAT_OVERRUN_S = 5.0  # how far CP-SAT may overrun its limit there (seen: 2 to 4 s on 2 cores)
FINISH_S = 0.2  # time kept for simulating the last schedule found
MAX_HINT_COPIES = 4  # CP-SAT is seeded with schedules computing a node at most this often
GAP_TOL = 1e-3  # a plan within 0.1% of the proven bound is reported optimal


class InfeasibleBudgetError(ValueError):
    """The memory budget is below what any schedule (or any found within the limit) needs."""

    def __init__(self, message: str, min_feasible_bytes: int):
        super().__init__(message)
        self.min_feasible_bytes = min_feasible_bytes


@dataclass
class Plan:
    """A schedule for one training step and what it costs.

    Attributes:
        schedule: the compute/free operations to run, in order.
        peak_bytes: the simulated peak, constant memory included.
        budget_bytes: the budget the plan was made for.
        cost_ratio: compute of the step relative to the plain step (1.0 = no recomputation).
        lower_bound: a proven lower bound on ``cost_ratio`` for any schedule within the budget.
        solver: the method that produced ``schedule``.
        status: ``"optimal"`` (within 0.1% of ``lower_bound``, or proven optimal by an exact
            solver within its formulation) or ``"feasible"``.
        solve_s: wall time of planning.
        plain_peak_bytes: the peak of the plain step (checkpoint every output).
        baselines: each baseline's best setting within the budget: ``{name: {peak_bytes,
            cost_ratio}}``.
        graph: the graph the schedule runs on.
    """

    schedule: Schedule
    peak_bytes: int
    budget_bytes: int
    cost_ratio: float
    lower_bound: float
    solver: str
    status: str
    solve_s: float
    plain_peak_bytes: int
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    graph: Graph | None = field(default=None, repr=False)

    @property
    def gap(self) -> float:
        """Relative distance to the proven lower bound."""
        return self.cost_ratio / self.lower_bound - 1.0 if self.lower_bound > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """The plan's summary as JSON-ready data (the schedule itself is left out)."""
        return {
            "nodes": len(self.graph) if self.graph is not None else None,
            "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes,
            "plain_peak_bytes": self.plain_peak_bytes,
            "cost_ratio": round(self.cost_ratio, 6),
            "lower_bound": round(self.lower_bound, 6),
            "gap": round(self.gap, 6),
            "solver": self.solver,
            "status": self.status,
            "solve_s": round(self.solve_s, 3),
            "baselines": self.baselines,
        }


def resolve_budget(
    plain_peak_bytes: int, budget_bytes: int | None, budget_fraction: float | None
) -> int:
    """One budget in bytes from exactly one of ``budget_bytes`` or ``budget_fraction``."""
    if (budget_bytes is None) == (budget_fraction is None):
        raise ValueError(
            "Give exactly one of budget_bytes (e.g. budget_bytes=2 * 2**30) or budget_fraction "
            "(e.g. budget_fraction=0.5, half the plain step's peak)."
        )
    if budget_fraction is not None:
        if not 0 < budget_fraction:
            raise ValueError(
                f"budget_fraction must be > 0 (a fraction of the plain peak, e.g. 0.5); "
                f"got {budget_fraction}."
            )
        return int(plain_peak_bytes * budget_fraction)
    if budget_bytes is None or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes; got {budget_bytes}.")
    return int(budget_bytes)


def solve(
    graph: Graph,
    *,
    budget_bytes: int | None = None,
    budget_fraction: float | None = None,
    solver: str = "auto",
    time_limit_s: float = 60.0,
) -> Plan:
    """Find a low-recomputation schedule of ``graph`` within a memory budget.

    Args:
        graph: the training graph.
        budget_bytes: peak memory allowed, constant memory included.
        budget_fraction: the budget as a fraction of the plain step's peak (checkpoint all).
        solver: ``"auto"`` (see the module docstring), ``"greedy"``, ``"milp"`` (Checkmate's
            exact MILP), ``"cpsat"`` (Moccasin's interval model), or a baseline name.
        time_limit_s: wall-clock limit for the exact search.

    Raises:
        InfeasibleBudgetError: the budget is below the least any schedule needs, or no
            schedule within it was found in time; the message gives the smallest budget known
            to work.
        ValueError: an unknown solver or a malformed budget.
    """
    from mlcycle.train.remat import _bounds
    from mlcycle.train.remat.baselines import baseline_schedules, checkpoint_all

    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}.")
    t0 = time.perf_counter()
    plain = simulate(graph, checkpoint_all(graph))
    budget = resolve_budget(plain.peak_bytes, budget_bytes, budget_fraction)
    least = _bounds.min_feasible_bytes(graph)
    if budget < least:
        raise InfeasibleBudgetError(
            f"A budget of {_fmt(budget)} is infeasible: no schedule of {graph.name!r} fits "
            f"below {_fmt(least)} ({least / plain.peak_bytes:.3f} of the plain peak "
            f"{_fmt(plain.peak_bytes)}), because some operation needs its inputs and output "
            f"resident at once. Raise the budget to at least {least} bytes.",
            least,
        )
    total = graph.total_cost or 1.0
    bound = _bounds.cut_knapsack_bound(graph, budget) / total
    found: list[tuple[float, str, Schedule, SimResult, bool]] = []  # (cost, solver, ..., proven)

    def offer(name: str, schedule: Schedule | None, proven: bool = False) -> None:
        if schedule is None:
            return
        sim = simulate(graph, schedule)
        if sim.peak_bytes <= budget:
            found.append((sim.cost, name, schedule, sim, proven))

    base = baseline_schedules(graph, budget)
    baselines = {
        name: {"peak_bytes": sim.peak_bytes, "cost_ratio": round(sim.cost_ratio, 6)}
        for name, (_, sim) in base.items()
    }
    if solver in base:
        offer(solver, base[solver][0])
    elif solver == "auto":
        for name, (schedule, _) in base.items():
            offer(name, schedule)
    if solver in ("auto", "greedy", "cpsat"):
        from mlcycle.train.remat._heuristic import evict_schedule, ratio_greedy

        offer("greedy", ratio_greedy(graph, budget))
        for alpha, beta, chain in EVICT_SCORES:
            offer("evict", evict_schedule(graph, budget, alpha=alpha, beta=beta, chain=chain))

    def best() -> tuple[float, str, Schedule, SimResult, bool] | None:
        return min(found, key=lambda f: f[0]) if found else None

    def open_gap() -> bool:
        b = best()
        return b is None or b[3].cost_ratio > bound * (1 + GAP_TOL)

    remaining = lambda: time_limit_s - (time.perf_counter() - t0)  # noqa: E731
    small = len(graph) <= MILP_MAX_NODES
    # Local search over the eviction choices: on large graphs it is what improves the
    # incumbent (CP-SAT seeded with it did not, in 300 s on our ResNet-50), so it gets most of
    # the time, all of it unless CP-SAT would still get CPSAT_LARGE_MIN_S; on small graphs the
    # exact solvers do better and it gets a smaller share.
    if solver in ("auto", "greedy") and open_gap() and remaining() > 1:
        from mlcycle.train.remat._heuristic import evict_search

        share = SEARCH_SHARE_SMALL if small else SEARCH_SHARE_LARGE
        limit = remaining() * share
        if solver == "greedy" or (not small and remaining() - limit < CPSAT_LARGE_MIN_S):
            limit = remaining() - FINISH_S  # nothing runs after it but the final check
        offer("evict-search", evict_search(graph, budget, EVICT_SCORES, time_limit_s=limit))
    # CP-SAT next, seeded with the incumbent: it improves a good schedule quickly. Then, on
    # small graphs, Checkmate's MILP with what time is left, which can prove optimality.
    if solver == "auto" and not _has_ortools():
        pass  # OR-Tools is a dependency, but a bare environment still gets a plan
    elif solver in ("auto", "cpsat") and (solver == "cpsat" or open_gap()) and remaining() > 1:
        from mlcycle.train.remat._cpsat import solve_cpsat

        incumbent = best()
        hint = incumbent[2] if incumbent else None
        copies = (2, 1)  # computations allowed per forward and per backward node
        if hint is not None:
            counts = hint.compute_counts(len(graph))
            phase = [(c, n.backward) for c, n in zip(counts, graph.nodes, strict=True)]
            fwd = max((c for c, b in phase if not b), default=1)
            bwd = max((c for c, b in phase if b), default=1)
            if max(fwd, bwd) > MAX_HINT_COPIES:
                hint = None  # too large a model; CP-SAT starts from scratch with C = 2
            else:
                copies = (max(2, fwd), bwd)
        # Unseeded, CP-SAT finds no schedule for graphs of a few hundred nodes in a minute on
        # 2 cores (measured on ResNet-50); it is worth the time only with a hint or if asked.
        # On large graphs CP-SAT's presolve with a hint takes about 10 s whatever its limit
        # (the published ResNet-50 on 2 cores), so it needs a minimum of time to be of use.
        enough = small or solver == "cpsat" or remaining() >= CPSAT_LARGE_MIN_S
        if (hint is not None or small or solver == "cpsat") and enough:
            share = remaining() if solver == "cpsat" or not small else remaining() / 2
            if solver == "auto" and not small:
                share -= CPSAT_OVERRUN_S
            res = solve_cpsat(
                graph,
                budget,
                time_limit_s=share,
                hint=hint,
                max_copies=copies[0],
                backward_copies=copies[1],
            )
            offer("cpsat", res.schedule, proven=res.status == "optimal")
    use_milp = solver == "milp" or (solver == "auto" and small)
    if use_milp and (solver == "milp" or open_gap()) and remaining() > 1:
        from mlcycle.train.remat._checkmate import solve_checkmate_milp

        res = solve_checkmate_milp(graph, budget, time_limit_s=remaining(), linearization="tight")
        offer("checkmate-milp", res.schedule, proven=res.status == "optimal")

    winner = best()
    if winner is None:
        lowest = min([plain.peak_bytes] + [int(b["peak_bytes"]) for b in baselines.values()])
        raise InfeasibleBudgetError(
            f"No schedule of {graph.name!r} within {_fmt(budget)} was found in {time_limit_s:g} s "
            f"with solver={solver!r}. Every schedule needs at least {_fmt(least)}; the lowest "
            f"peak found by a baseline is {_fmt(lowest)}. Raise the budget, the time limit, or "
            "use solver='auto'.",
            least,
        )
    cost, name, schedule, sim, proven = winner
    status = "optimal" if proven or sim.cost_ratio <= bound * (1 + GAP_TOL) else "feasible"
    return Plan(
        schedule=schedule,
        peak_bytes=sim.peak_bytes,
        budget_bytes=budget,
        cost_ratio=sim.cost_ratio,
        lower_bound=min(bound, sim.cost_ratio),
        solver=name,
        status=status,
        solve_s=time.perf_counter() - t0,
        plain_peak_bytes=plain.peak_bytes,
        baselines=baselines,
        graph=graph,
    )


def plan(
    module: Any,
    example_inputs: Any,
    *,
    budget_bytes: int | None = None,
    budget_fraction: float | None = None,
    solver: str = "auto",
    time_limit_s: float = 60.0,
    cost_model: str = "auto",
) -> Plan:
    """Capture one training step of ``module`` and plan it within a memory budget.

    ``budget_fraction`` is relative to the peak of the plain step (every activation kept).
    See :func:`solve` for the other arguments and errors, and
    :func:`mlcycle.train.remat.graph.capture` for what is captured.
    """
    from mlcycle.train.remat.graph import capture

    graph = capture(module, example_inputs, cost_model=cost_model)
    return solve(
        graph,
        budget_bytes=budget_bytes,
        budget_fraction=budget_fraction,
        solver=solver,
        time_limit_s=time_limit_s,
    )


def _has_ortools() -> bool:
    import importlib.util

    return importlib.util.find_spec("ortools") is not None


def _fmt(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes} B"
