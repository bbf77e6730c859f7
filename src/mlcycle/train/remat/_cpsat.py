"""Optimal rematerialization with bounded recomputation, as interval scheduling on CP-SAT.

The formulation follows Moccasin (Bartan et al., "Moccasin: Efficient Tensor Rematerialization
for Neural Networks", ICML 2023, Sec. 3): node ``v`` may be computed at most ``C_v`` times; each
computation ``k`` is an optional *retention interval* ``[s_vk, e_vk]`` on a discrete clock with
one computation per tick. Instead of Checkmate's O(n^2) stage variables (Jain et al., MLSys 2020)
the model has O(C n) intervals and O(C^2 |E|) precedence literals:

* a compute happens at a distinct tick: ``NoOverlap`` over unit intervals at ``s_vk``;
* an edge ``u -> v`` needs, for each present copy ``j`` of ``v``, some present copy ``i`` of ``u``
  alive at that tick: ``s_ui < s_vj <= e_ui``;
* memory: ``Cumulative`` over ``[s_vk, e_vk + 1)`` with demand ``bytes_v`` within the budget,
  which is exactly the simulator's accounting (inputs and the new output are live together);
* first computations keep the topological order (Checkmate's frontier-advancing restriction);
* objective: the cost of the extra computations.

CP-SAT returns the best schedule found and a proven bound *within this model*, i.e. among
schedules that compute each node at most ``C_v`` times in frontier-advancing order.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import reduce

from mlcycle.train.remat.graph import COMPUTE, FREE, Graph, Schedule

COST_SCALE = 1_000_000  # the objective is in millionths of the graph's total cost


@dataclass
class CpSatResult:
    schedule: Schedule | None
    lower_bound_cost: float  # proven, in the graph's cost units, within the bounded model
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    solve_s: float


def _copies(graph: Graph, max_copies: int, backward_copies: int) -> list[int]:
    out = []
    for i, node in enumerate(graph.nodes):
        if node.output or not graph.succs[i]:
            out.append(1)  # outputs stay to the end and sinks are used by no one: never recompute
        else:
            out.append(backward_copies if node.backward else max_copies)
    return out


def _intervals_of(schedule: Schedule, n: int) -> list[list[tuple[int, int]]]:
    """Per node, the (start tick, end tick) of each computation in ``schedule``."""
    spans: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    open_at: dict[int, int] = {}
    tick = -1
    for op, v in schedule.ops:
        if op == COMPUTE:
            tick += 1
            open_at[v] = tick
        else:
            spans[v].append((open_at.pop(v), tick))
    for v, start in open_at.items():
        spans[v].append((start, -1))  # resident to the end; filled in by the caller
    for s in spans:
        s.sort()
    return spans


def solve_cpsat(
    graph: Graph,
    budget_bytes: int,
    *,
    time_limit_s: float = 60.0,
    max_copies: int = 2,
    backward_copies: int = 1,
    hint: Schedule | None = None,
    workers: int | None = None,
    log: bool = False,
) -> CpSatResult:
    """Minimize recomputation cost within ``budget_bytes`` (``graph.const_bytes`` included).

    Args:
        graph: the training graph.
        budget_bytes: peak memory allowed, the constant part included.
        time_limit_s: wall-clock limit for CP-SAT.
        max_copies: computations allowed per forward node (Moccasin's C).
        backward_copies: computations allowed per backward node.
        hint: a valid schedule to start from (e.g. the best baseline); it is used only when
            it computes no node more often than allowed.
        workers: CP-SAT search workers (default: the machine's cores).
        log: print CP-SAT's search log.
    """
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    n = len(graph)
    cap_bytes = budget_bytes - graph.const_bytes
    sizes = [node.bytes for node in graph.nodes]
    extras = [x for node in graph.nodes for x in (node.transient, node.stash) if x]
    unit = reduce(math.gcd, [s for s in sizes + extras if s] + [1 << 62]) or 1
    demand = [math.ceil(s / unit) for s in sizes]
    capacity = cap_bytes // unit
    if capacity < 0:
        return CpSatResult(None, math.inf, "infeasible", time.perf_counter() - t0)
    total = graph.total_cost or 1.0
    cost_int = [int(math.floor(node.cost / total * COST_SCALE)) for node in graph.nodes]

    copies = _copies(graph, max_copies, backward_copies)
    horizon = sum(copies)
    m = cp_model.CpModel()
    start: list[list] = []
    end: list[list] = []
    present: list[list] = []
    mem_intervals, mem_demands, ticks = [], [], []
    extra = horizon - n
    for v in range(n):
        sv, ev, pv = [], [], []
        for k in range(copies[v]):
            lo = v if k == 0 else v + 1
            hi = v + extra if k == 0 else horizon - 1
            s = m.NewIntVar(lo, hi, f"s{v}_{k}")
            e = m.NewIntVar(lo, horizon - 1, f"e{v}_{k}")
            p = m.NewConstant(1) if k == 0 else m.NewBoolVar(f"p{v}_{k}")
            length = m.NewIntVar(1, horizon, f"l{v}_{k}")
            m.Add(e + 1 == s + length)
            mem_intervals.append(m.NewOptionalIntervalVar(s, length, e + 1, p, f"m{v}_{k}"))
            mem_demands.append(demand[v])
            tick = m.NewOptionalFixedSizeIntervalVar(s, 1, p, f"t{v}_{k}")
            ticks.append(tick)
            if graph.nodes[v].transient:  # intermediates live only at the compute tick
                mem_intervals.append(tick)
                mem_demands.append(math.ceil(graph.nodes[v].transient / unit))
            if k == 0 and graph.nodes[v].stash:  # from the first computation to the end
                mem_intervals.append(m.NewIntervalVar(s, horizon - s, horizon, f"z{v}"))
                mem_demands.append(math.ceil(graph.nodes[v].stash / unit))
            if k:
                m.Add(s > ev[k - 1]).OnlyEnforceIf(p)  # copies do not overlap
                if k >= 2:
                    m.AddImplication(p, pv[k - 1])
            sv.append(s)
            ev.append(e)
            pv.append(p)
        start.append(sv)
        end.append(ev)
        present.append(pv)
        if graph.nodes[v].output:
            m.Add(ev[-1] == horizon - 1)
        elif not graph.succs[v]:
            m.Add(ev[0] == sv[0])
    for v in range(1, n):
        m.Add(start[v][0] > start[v - 1][0])
    m.AddNoOverlap(ticks)
    m.AddCumulative(mem_intervals, mem_demands, capacity)

    # Precedence: each present copy j of v is served by some present copy i of u.
    serve: dict[tuple[int, int, int, int], object] = {}
    for v in range(n):
        for u in graph.preds[v]:
            for j in range(copies[v]):
                options = []
                for i in range(copies[u]):
                    x = m.NewBoolVar(f"x{u}_{i}_{v}_{j}")
                    if i:
                        m.AddImplication(x, present[u][i])
                    m.Add(start[u][i] < start[v][j]).OnlyEnforceIf(x)
                    m.Add(end[u][i] >= start[v][j]).OnlyEnforceIf(x)
                    options.append(x)
                    serve[u, i, v, j] = x
                if j == 0:
                    m.AddBoolOr(options)
                else:
                    m.AddBoolOr(options).OnlyEnforceIf(present[v][j])
    # A recomputed copy must be used, and a copy's retention ends at a use (no dead tail):
    # these only prune symmetric solutions, the objective already rules them out.
    m.Minimize(sum(cost_int[v] * present[v][k] for v in range(n) for k in range(1, copies[v])))

    if hint is not None:
        spans = _intervals_of(hint, n)
        if all(len(spans[v]) <= copies[v] for v in range(n)):
            for v in range(n):
                for k in range(copies[v]):
                    if k < len(spans[v]):
                        s, e = spans[v][k]
                        m.AddHint(start[v][k], s)
                        m.AddHint(end[v][k], horizon - 1 if e < 0 else e)
                        if k:
                            m.AddHint(present[v][k], 1)
                    elif k:
                        m.AddHint(present[v][k], 0)
                        m.AddHint(start[v][k], spans[v][0][0] + 1)
                        m.AddHint(end[v][k], spans[v][0][0] + 1)
            for (u, i, v, j), x in serve.items():
                ok = False
                if i < len(spans[u]) and j < len(spans[v]):
                    su, eu = spans[u][i]
                    eu = horizon - 1 if eu < 0 else eu
                    ok = su < spans[v][j][0] <= eu
                m.AddHint(x, int(ok))

    solver = cp_model.CpSolver()
    # The limit covers building the model too (seconds on a few hundred nodes).
    solver.parameters.max_time_in_seconds = max(0.1, time_limit_s - (time.perf_counter() - t0))
    solver.parameters.num_workers = workers or int(os.environ.get("MLCYCLE_CPSAT_WORKERS", 8))
    solver.parameters.log_search_progress = log
    code = solver.Solve(m)
    elapsed = time.perf_counter() - t0
    status = {
        cp_model.OPTIMAL: "optimal",
        cp_model.FEASIBLE: "feasible",
        cp_model.INFEASIBLE: "infeasible",
    }.get(code, "unknown")
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        bound = math.inf if code == cp_model.INFEASIBLE else graph.total_cost
        return CpSatResult(None, bound, status, elapsed)
    base = sum(cost_int[v] for v in range(n))
    lower = (solver.BestObjectiveBound() + base) / COST_SCALE * total
    spans_out = []
    for v in range(n):
        for k in range(copies[v]):
            if solver.Value(present[v][k]):
                spans_out.append((solver.Value(start[v][k]), solver.Value(end[v][k]), v))
    return CpSatResult(_to_schedule(graph, spans_out), lower, status, elapsed)


def _to_schedule(graph: Graph, spans: list[tuple[int, int, int]]) -> Schedule:
    """Turn (start, end, node) retention intervals into compute/free operations."""
    events: list[tuple[int, int, int]] = []  # (tick, 0 = compute | 1 = free, node)
    for s, e, v in spans:
        events.append((s, 0, v))
        if not graph.nodes[v].output:
            events.append((e, 1, v))
    events.sort()
    return Schedule.from_ops((COMPUTE if kind == 0 else FREE, v) for _, kind, v in events)
