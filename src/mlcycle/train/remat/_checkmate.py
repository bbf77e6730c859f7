"""Checkmate's exact MILP for rematerialization, and its LP relaxation, on HiGHS (SciPy).

The formulation is the one of Jain et al., "Checkmate: Breaking the Memory Wall with Optimal
Tensor Rematerialization" (MLSys 2020), Sec. 4, restricted to *frontier-advancing* schedules:

* There are ``T = n`` stages; stage ``t`` computes node ``t`` for the first time
  (``R[t,t] = 1``), possibly after recomputing some earlier nodes. Stage ``t`` computes the
  nodes with ``R[t,i] = 1`` (``i <= t``) in index order, each at most once.
* ``S[t,i]`` (``i < t``) says that the output of node ``i`` is resident when stage ``t``
  begins (a checkpoint carried over from stage ``t - 1``).
* Correctness (Eq. 1b, 1c): ``R[t,j] <= R[t,i] + S[t,i]`` for every edge ``(i, j)``, and
  ``S[t,i] <= R[t-1,i] + S[t-1,i]``; nothing is resident before stage 0.
* Memory (Sec. 4.3): ``U[t,k]`` is the memory in use while node ``k`` is computed in stage
  ``t``, before the frees that follow it::

      U[t,0]   = M_0 R[t,0] + sum_i M_i S[t,i]
      U[t,k+1] = U[t,k] + M_{k+1} R[t,k+1] - sum_{i in DEPS[k] + {k}} M_i FREE[t,i,k]
      U[t,k]  <= budget

  where ``FREE[t,i,k] = R[t,k] (1 - S[t+1,i]) prod_{j in USERS[i], j > k} (1 - R[t,j])``
  frees ``i`` right after its last use ``k`` in the stage unless it is kept for the next
  stage. The product is linearized as in the paper (Eq. 4-5) with
  ``h = (1 - R[t,k]) + S[t+1,i] + sum_{j in USERS[i], j > k} R[t,j]``:
  ``1 - FREE <= h`` and ``kappa (1 - FREE) >= h`` with ``kappa`` the largest value ``h`` can
  take, and ``FREE`` binary (``linearization="paper"``). ``"paper-upper"`` keeps only the
  ``kappa`` row (the one that bounds ``FREE`` from above); ``"tight"`` uses the standard
  product linearization (``FREE`` continuous, ``FREE <= R[t,k]``, ``FREE <= 1 - S[t+1,i]``,
  ``FREE <= 1 - R[t,j]``). All three admit the same integer R/S and have the same optimum;
  "tight" has the strongest relaxation. ``FREE[t,k,k]`` (a node nobody reads later in the
  stage) is in the paper's sum but not in the reference code (``gurobi_solver.py`` frees
  along edges only); it is kept here, since the simulator frees such a node at once.
* Nodes marked ``output`` must be resident at the end: ``R[T-1,i] + S[T-1,i] >= 1`` and, in the
  last stage, ``S[T,i]`` is the constant 1 (so they are never freed there).
* Objective: ``sum_{t,i} cost_i R[t,i]``.

Memory accounting against :func:`mlcycle.train.remat.simulate.simulate`: for the schedule that
:func:`_schedule_from_solution` builds (stage by stage, frees as early as possible), the
simulator's live memory at each compute is at most the MILP's ``U[t,k]``; it is smaller when a
checkpoint ``S[t,i]`` is neither used in stage ``t`` nor kept for stage ``t+1`` (the MILP keeps
counting it until the stage ends, the schedule frees it when the stage begins) and when a node
is both stored and "recomputed" in one stage (the MILP counts it twice, the schedule skips the
recomputation). For schedules with frees as early as possible and no such checkpoints the two
agree exactly (the unit tests check the MILP optimum against exhaustive search over
frontier-advancing schedules in the simulator). Every schedule is replayed in the simulator
before it is returned; HiGHS's feasibility tolerance could in principle let a rounded solution
exceed the budget by a few bytes, in which case the model's budget is tightened and it is
solved again.
``graph.const_bytes`` is subtracted from the budget before the model is built. A node's
``stash`` is allocated at its first computation, which in a frontier-advancing schedule is the
end of stage ``t`` for node ``t``: ``U[t,k] <= budget - sum_{j<t} stash_j - [k = t] stash_t``.
Its ``transient`` bytes are live only while it computes: ``U[t,k] + transient_k R[t,k]`` obeys
the same cap. Both are exact for the simulator, so optimality is proven within the
frontier-advancing formulation with them too.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from mlcycle.train.remat.graph import COMPUTE, FREE, Graph, Schedule
from mlcycle.train.remat.simulate import simulate

__all__ = ["CheckmateResult", "solve_checkmate_milp", "lp_lower_bound"]

_INF = math.inf
_LINEARIZATIONS = ("paper", "paper-upper", "tight")


@dataclass(frozen=True)
class CheckmateResult:
    """The answer of :func:`solve_checkmate_milp`.

    Attributes:
        schedule: the best schedule found (replayed in the simulator, peak within the budget),
            or ``None`` when none was found (or, with ``relax=True``, when the LP optimum is
            fractional).
        cost: the simulated compute cost of ``schedule`` (recomputations included), or
            ``None``.
        lower_bound: a proven lower bound on the cost of any frontier-advancing schedule within
            the budget (absolute cost, same units as ``cost``): the MILP dual bound, the LP
            optimum with ``relax=True``, never below ``graph.total_cost``; ``inf`` when the
            budget is infeasible.
        status: ``"optimal"`` (solved to ``mip_rel_gap``, or the LP solved with ``relax``),
            ``"feasible"`` (time limit hit with a schedule in hand), ``"infeasible"`` (no
            frontier-advancing schedule fits), ``"timeout"`` (time limit hit without one).
        solve_s: wall time of the whole call (model build, HiGHS, conversion, simulation).
        build_s: wall time spent building the sparse model.
        n_vars: number of model variables.
        n_constraints: number of model rows.
    """

    schedule: Schedule | None
    cost: float | None
    lower_bound: float
    status: str
    solve_s: float
    build_s: float = 0.0
    n_vars: int = 0
    n_constraints: int = 0


@dataclass(frozen=True)
class _Model:
    c: np.ndarray
    integrality: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    a: sp.csr_array
    row_lb: np.ndarray
    row_ub: np.ndarray
    n_r: int
    n_s: int
    mem_rows: np.ndarray  # rows bounding memory with a transient: U[t,k] + T_k R[t,k] <= cap


def _ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each ``m``, the integers in ``[starts[m], stops[m])``: (owner index, value)."""
    lengths = np.maximum(stops - starts, 0)
    owner = np.repeat(np.arange(len(starts)), lengths)
    first = np.cumsum(lengths) - lengths
    values = np.arange(int(lengths.sum())) - np.repeat(first, lengths) + np.repeat(starts, lengths)
    return owner, values


def _tri(t: np.ndarray | int) -> np.ndarray | int:
    return t * (t + 1) // 2


def _build_model(graph: Graph, budget: float, linearization: str = "paper") -> _Model:
    """The sparse MILP in scaled units: memory in units of ``budget``, cost in total cost."""
    if linearization not in _LINEARIZATIONS:
        raise ValueError(
            f"linearization must be one of {', '.join(map(repr, _LINEARIZATIONS))}, "
            f"got {linearization!r}."
        )
    n = len(graph)
    mem = np.array([node.bytes for node in graph.nodes], dtype=np.float64) / budget
    cost = np.array([node.cost for node in graph.nodes], dtype=np.float64)
    total = cost.sum()
    cost = cost / total if total > 0 else cost
    out = np.array([node.output for node in graph.nodes], dtype=bool)

    # Variable layout: R[t,i] (i <= t), S[t,i] (i < t), U[t,k] (k <= t), FREE[t,p] (k_p < t).
    n_r = _tri(n)
    n_s = n * (n - 1) // 2
    s0 = n_r
    u0 = n_r + n_s
    f0 = u0 + n_r

    def rid(t, i):
        return _tri(t) + i

    def sid(t, i):
        return s0 + t * (t - 1) // 2 + i

    def uid(t, k):
        return u0 + _tri(t) + k

    edges = np.array(graph.edges, dtype=np.int64).reshape(-1, 2)
    ei, ek = edges[:, 0], edges[:, 1]
    # Free pairs (i, k): i in DEPS[k] plus (k, k), sorted by k so that the pairs with k < t
    # are a prefix of the list.
    pi = np.concatenate([ei, np.arange(n)])
    pk = np.concatenate([ek, np.arange(n)])
    order = np.lexsort((pi, pk))
    pi, pk = pi[order], pk[order]
    n_pairs = len(pi)
    cnt = np.searchsorted(pk, np.arange(n), side="left")  # pairs with k_p < t
    foff = np.cumsum(cnt) - cnt
    n_f = int(cnt.sum())

    def fid(t, p):
        return f0 + foff[t] + p

    n_var = f0 + n_f

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    row_lb: list[np.ndarray] = []
    row_ub: list[np.ndarray] = []
    n_rows = 0

    def add(r: np.ndarray, c: np.ndarray, v: np.ndarray | float) -> None:
        rows.append(r + n_rows)
        cols.append(np.asarray(c, dtype=np.int64))
        vals.append(np.broadcast_to(np.asarray(v, dtype=np.float64), r.shape))

    def close(m: int, lo: np.ndarray | float, hi: np.ndarray | float) -> None:
        nonlocal n_rows
        row_lb.append(np.broadcast_to(np.asarray(lo, dtype=np.float64), (m,)))
        row_ub.append(np.broadcast_to(np.asarray(hi, dtype=np.float64), (m,)))
        n_rows += m

    # (1b) R[t,k] <= R[t,i] + S[t,i] for each edge (i, k) and stage t >= k.
    e, t = _ranges(ek, np.full(len(ek), n))
    r = np.arange(len(e))
    add(r, rid(t, ek[e]), 1.0)
    add(r, rid(t, ei[e]), -1.0)
    add(r, sid(t, ei[e]), -1.0)
    close(len(e), -_INF, 0.0)

    # (1c) S[t,i] <= R[t-1,i] + S[t-1,i] for i < t (S[t-1,i] exists for i < t - 1).
    t, i = np.tril_indices(n, -1)
    r = np.arange(len(t))
    add(r, sid(t, i), 1.0)
    add(r, rid(t - 1, i), -1.0)
    m = i < t - 1
    add(r[m], sid(t[m] - 1, i[m]), -1.0)
    close(len(t), -_INF, 0.0)

    # Outputs resident at the end: R[T-1,i] + S[T-1,i] >= 1.
    outs = np.flatnonzero(out[: n - 1])
    if len(outs):
        r = np.arange(len(outs))
        add(r, rid(n - 1, outs), 1.0)
        add(r, sid(n - 1, outs), 1.0)
        close(len(outs), 1.0, _INF)

    # FREE linearization, one row pair per FREE[t,p] (k_p < t).
    fp, ft = _ranges(pk + 1, np.full(n_pairs, n))
    n_free = len(fp)
    frow = foff[ft] + fp  # row within the block == FREE variable offset
    assert n_free == n_f
    last = ft == n - 1
    s_const = np.where(last, out[pi[fp]], 0).astype(np.float64)  # S[T,i] is a constant
    # Later users j of i (j > k_p); they enter h for stages t >= j.
    succ_owner: list[int] = []
    succ_j: list[int] = []
    for q in range(n_pairs):
        for j in graph.succs[pi[q]]:
            if j > pk[q]:
                succ_owner.append(q)
                succ_j.append(j)
    sq = np.array(succ_owner, dtype=np.int64)
    sj = np.array(succ_j, dtype=np.int64)
    w, st = _ranges(sj, np.full(len(sj), n))
    sq_rep, sj_rep = sq[w], sj[w]
    srow = foff[st] + sq_rep
    n_later = np.bincount(srow, minlength=n_free).astype(np.float64)
    kappa = 1.0 + np.where(last, s_const, 1.0) + n_later[frow]  # max of h
    not_last = ~last
    if linearization.startswith("paper"):
        blocks = [
            (-1.0, -_INF, s_const),  # -F + R[t,k] - S[t+1,i] - sum R[t,j] <= c
            (-kappa, 1.0 - kappa + s_const, _INF),  # -kF + R - S - sum R >= 1 - k + c
        ]
        for f_coef, lo, hi in blocks[0 if linearization == "paper" else 1 :]:
            add(frow, fid(ft, fp), f_coef)
            add(frow, rid(ft, pk[fp]), 1.0)
            add(frow[not_last], sid(ft[not_last] + 1, pi[fp[not_last]]), -1.0)
            add(srow, rid(st, sj_rep), -1.0)
            lo_rows = np.empty(n_free)
            hi_rows = np.empty(n_free)
            lo_rows[frow] = lo
            hi_rows[frow] = hi
            close(n_free, lo_rows, hi_rows)
    else:
        # F <= R[t,k]; F <= 1 - S[t+1,i] (or 1 - c); F <= 1 - R[t,j] for each later user j.
        add(frow, fid(ft, fp), 1.0)
        add(frow, rid(ft, pk[fp]), -1.0)
        close(n_free, -_INF, 0.0)
        hi_rows = np.empty(n_free)
        hi_rows[frow] = 1.0 - s_const
        add(frow, fid(ft, fp), 1.0)
        add(frow[not_last], sid(ft[not_last] + 1, pi[fp[not_last]]), 1.0)
        close(n_free, -_INF, hi_rows)
        r = np.arange(len(srow))
        add(r, fid(st, sq_rep), 1.0)
        add(r, rid(st, sj_rep), 1.0)
        close(len(srow), -_INF, 1.0)

    # Memory: U[t,0] = M_0 R[t,0] + sum_i M_i S[t,i];
    # U[t,k] = U[t,k-1] + M_k R[t,k] - sum_{p: k_p = k-1} M_{i_p} FREE[t,p].
    tt, kk = _ranges(np.zeros(n, dtype=np.int64), np.arange(1, n + 1))
    mrow = _tri(tt) + kk
    add(mrow, uid(tt, kk), 1.0)
    add(mrow, rid(tt, kk), -mem[kk])
    m = kk > 0
    add(mrow[m], uid(tt[m], kk[m] - 1), -1.0)
    t2, i2 = np.tril_indices(n, -1)
    add(_tri(t2), sid(t2, i2), -mem[i2])
    add(_tri(ft) + pk[fp] + 1, fid(ft, fp), mem[pi[fp]])
    close(len(tt), 0.0, 0.0)

    c = np.zeros(n_var)
    rt, ri = _ranges(np.zeros(n, dtype=np.int64), np.arange(1, n + 1))
    c[rid(rt, ri)] = cost[ri]
    lb = np.zeros(n_var)
    ub = np.ones(n_var)
    diag = rid(np.arange(n), np.arange(n))
    lb[diag] = 1.0  # frontier-advancing: stage t computes node t
    # U[t,k] <= budget - stash of the nodes computed before: in a frontier-advancing schedule
    # node j is first computed at the end of stage j, so stages t > j carry its stash, and so
    # does stage t itself once node t is computed (memory is in units of the budget).
    stash = np.array([node.stash for node in graph.nodes], dtype=np.float64) / budget
    before = np.concatenate(([0.0], np.cumsum(stash)[:-1]))  # stash of nodes j < t
    ut, uk = _ranges(np.zeros(n, dtype=np.int64), np.arange(1, n + 1))
    cap = 1.0 - before[ut] - np.where(uk == ut, stash[ut], 0.0)
    ub[uid(ut, uk)] = cap
    # A node's transient bytes are live only while it computes: U[t,k] + T_k R[t,k] <= cap.
    trans = np.array([node.transient for node in graph.nodes], dtype=np.float64) / budget
    m = trans[uk] > 0
    first_mem_row = n_rows
    r = np.arange(int(m.sum()))
    add(r, uid(ut[m], uk[m]), 1.0)
    add(r, rid(ut[m], uk[m]), trans[uk[m]])
    close(len(r), -_INF, cap[m])
    mem_rows = np.arange(first_mem_row, n_rows)
    a = sp.csr_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_rows, n_var),
    )
    integrality = np.ones(n_var, dtype=np.int8)
    integrality[u0:f0] = 0
    if linearization == "tight":
        integrality[f0:] = 0
    return _Model(
        c=c,
        integrality=integrality,
        lb=lb,
        ub=ub,
        a=a,
        row_lb=np.concatenate(row_lb),
        row_ub=np.concatenate(row_ub),
        n_r=n_r,
        n_s=n_s,
        mem_rows=mem_rows,
    )


def _schedule_from_solution(graph: Graph, x: np.ndarray, n_r: int) -> Schedule:
    """Turn R/S into a schedule: stage order, index order in a stage, frees as early as possible.

    After each compute (and when a stage begins) every resident output that no later compute
    of the stage reads and that is not carried into the next stage (``S[t+1]``; the outputs
    after the last stage) is freed.
    """
    n = len(graph)
    xr = x[:n_r] > 0.5
    xs = x[n_r : n_r + n * (n - 1) // 2] > 0.5
    out = {i for i, node in enumerate(graph.nodes) if node.output}
    preds = graph.preds
    resident: set[int] = set()
    ops: list[tuple[int, int]] = []
    for t in range(n):
        base = t * (t + 1) // 2
        comp = [i for i in range(t + 1) if xr[base + i]]
        if t + 1 < n:
            sbase = (t + 1) * t // 2
            keep = {i for i in range(t + 1) if xs[sbase + i]}
        else:
            keep = out
        comp = [i for i in comp if i not in resident]  # stored and "recomputed": skip
        # Remaining uses of each node within this stage.
        uses: dict[int, int] = {}
        for k in comp:
            for q in preds[k]:
                uses[q] = uses.get(q, 0) + 1
        for i in sorted(resident):
            if i not in keep and not uses.get(i):
                ops.append((FREE, i))
                resident.discard(i)
        for k in comp:
            ops.append((COMPUTE, k))
            resident.add(k)
            for q in preds[k]:
                uses[q] -= 1
            for i in sorted((*preds[k], k)):
                if i in resident and i not in keep and not uses.get(i):
                    ops.append((FREE, i))
                    resident.discard(i)
    return Schedule.from_ops(ops)


def _cheap_infeasible(graph: Graph, budget: int) -> bool:
    """A node whose output plus inputs exceed the budget can never be computed."""
    for k, node in enumerate(graph.nodes):
        if node.bytes + sum(graph.nodes[p].bytes for p in graph.preds[k]) > budget:
            return True
    return False


def _highs(model: _Model, relax: bool, time_limit_s: float, mip_rel_gap: float, **extra):
    integrality = np.zeros_like(model.integrality) if relax else model.integrality
    options = {"time_limit": max(float(time_limit_s), 1e-3), "presolve": True}
    if not relax:
        options["mip_rel_gap"] = float(mip_rel_gap)
    options.update(extra)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        return milp(
            model.c,
            integrality=integrality,
            bounds=Bounds(model.lb, model.ub),
            constraints=LinearConstraint(model.a, model.row_lb, model.row_ub),
            options=options,
        )


def solve_checkmate_milp(
    graph: Graph,
    budget_bytes: int,
    *,
    time_limit_s: float = 60,
    relax: bool = False,
    mip_rel_gap: float = 1e-4,
    linearization: str = "paper",
) -> CheckmateResult:
    """Solve Checkmate's frontier-advancing MILP (or its LP relaxation) for ``budget_bytes``.

    Args:
        graph: the training graph (nodes in topological order).
        budget_bytes: the memory budget, ``graph.const_bytes`` included (as the simulator's
            peak).
        time_limit_s: HiGHS time limit in seconds.
        relax: solve the LP relaxation instead; ``lower_bound`` is then the LP optimum, and a
            schedule is returned only when that optimum happens to be integral.
        mip_rel_gap: relative gap at which HiGHS stops and reports optimality.
        linearization: how ``FREE`` is linearized; all three admit the same integer R/S and
            have the same optimum. ``"paper"``: Eq. 4-5 verbatim (``FREE`` binary,
            ``1 - FREE <= h`` and ``kappa (1 - FREE) >= h``). ``"paper-upper"``: only the
            ``kappa`` row, which bounds ``FREE`` from above; the other row only forces frees,
            which never hurt, so dropping it changes no optimum and can only lower the LP
            optimum (identical on MobileNet at 0.5, in about half the time). ``"tight"``: the
            product linearization, ``FREE`` continuous with ``FREE <= R[t,k]``,
            ``FREE <= 1 - S[t+1,i]``, ``FREE <= 1 - R[t,j]``; a stronger relaxation, the
            fastest MILP on U-Net, but a slow LP.

    Returns:
        A :class:`CheckmateResult`. Any schedule in it has been replayed by
        :func:`~mlcycle.train.remat.simulate.simulate`: it is valid and its peak is at most
        ``budget_bytes``.
    """
    start = time.perf_counter()
    total = graph.total_cost
    # Stash and transient bytes are exact in the model (see _build_model): node t's stash is
    # allocated in stage t, its transient only while it computes. Every stash is allocated by
    # the end of any schedule, so a budget below their sum is infeasible.
    stash = sum(node.stash for node in graph.nodes)
    budget = int(budget_bytes) - int(graph.const_bytes)
    if len(graph) == 0:
        return CheckmateResult(Schedule(()), 0.0, 0.0, "optimal", 0.0)
    if budget <= stash or _cheap_infeasible(graph, budget):
        return CheckmateResult(None, None, _INF, "infeasible", time.perf_counter() - start)

    model = _build_model(graph, float(budget), linearization)
    build_s = time.perf_counter() - start
    n_vars, n_rows = model.a.shape[1], model.a.shape[0]
    deadline = start + float(time_limit_s)

    def result(schedule, cost, lb, status):
        return CheckmateResult(
            schedule=schedule,
            cost=cost,
            lower_bound=lb,
            status=status,
            solve_s=time.perf_counter() - start,
            build_s=build_s,
            n_vars=n_vars,
            n_constraints=n_rows,
        )

    scale = total if total > 0 else 1.0
    lower = total
    ub = model.ub
    # HiGHS satisfies rows up to a tolerance; should the rounded schedule exceed the budget by
    # a few bytes, tighten the model's budget by the overshoot and solve again.
    for attempt in range(3):
        res = _highs(model, relax, deadline - time.perf_counter(), mip_rel_gap)
        if res.status == 2:
            if attempt == 0:
                return result(None, None, _INF, "infeasible")
            break  # only the tightened model is infeasible: no schedule, no proof
        solved = res.status == 0
        if attempt == 0:
            if relax:
                if solved and res.fun is not None:
                    lower = max(lower, float(res.fun) * scale)
            else:
                bound = res.mip_dual_bound
                if bound is not None and np.isfinite(bound):
                    lower = max(lower, float(bound) * scale)
                elif solved and res.fun is not None:
                    lower = max(lower, float(res.fun) * scale)
        if res.x is None:
            return result(None, None, lower, "timeout")
        x = np.asarray(res.x)
        if relax:
            ints = np.flatnonzero(model.integrality)
            if not solved or np.max(np.abs(x[ints] - np.round(x[ints])), initial=0.0) > 1e-6:
                return result(None, None, lower, "optimal" if solved else "timeout")
        schedule = _schedule_from_solution(graph, x, model.n_r)
        sim = simulate(graph, schedule)
        if sim.peak_bytes <= budget_bytes:
            status = "optimal" if solved else "feasible"
            return result(schedule, sim.cost, min(lower, sim.cost), status)
        over = (sim.peak_bytes - budget_bytes) / budget
        ub = ub.copy()
        ub[model.n_r + model.n_s : model.n_r + model.n_s + model.n_r] -= over + 1e-9
        row_ub = model.row_ub.copy()
        row_ub[model.mem_rows] -= over + 1e-9
        model = replace(model, ub=ub, row_ub=row_ub)
        warnings.warn(
            f"Checkmate MILP schedule exceeded the budget by {sim.peak_bytes - budget_bytes} "
            "bytes (solver tolerance); re-solving with a tighter budget.",
            RuntimeWarning,
            stacklevel=2,
        )
        if time.perf_counter() >= deadline:
            break
    return result(None, None, lower, "timeout")


def lp_lower_bound(
    graph: Graph, budget_bytes: int, *, time_limit_s: float = 60, linearization: str = "paper"
) -> float:
    """The optimum of the LP relaxation of Checkmate's MILP: a proven lower bound.

    Every frontier-advancing schedule (stage ``t`` computes node ``t`` for the first time,
    after recomputing some earlier nodes in index order) whose simulated peak is within
    ``budget_bytes`` costs at least this much: with frees as early as possible its R/S/FREE
    values are an integer point of the MILP (whose memory accounting then equals the
    simulator's), hence a feasible point of the relaxation. It is never below
    ``graph.total_cost`` (every node runs at least once); ``inf`` when no node can even be
    computed within the budget or the relaxation is infeasible. When the LP hits
    ``time_limit_s`` before optimality, the trivial bound ``graph.total_cost`` is returned.
    ``linearization`` is as in :func:`solve_checkmate_milp`: ``"paper-upper"`` drops rows of
    the relaxation, so its bound can only be lower or equal (equal on the published graphs
    tried) and comes faster; ``"tight"`` gives a bound at least as high as "paper-upper".
    """
    return solve_checkmate_milp(
        graph, budget_bytes, time_limit_s=time_limit_s, relax=True, linearization=linearization
    ).lower_bound
