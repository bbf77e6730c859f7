"""Baseline rematerialization strategies, all returning :class:`Schedule` on the same graph.

Most baselines here are a *checkpoint set* turned into a schedule by
:func:`schedule_from_checkpoints`: the forward pass runs once, checkpointed outputs stay
resident until their last use, every other forward output is freed after its last forward use
and recomputed from the nearest resident ancestors just before a backward node needs it.
This is how Checkmate (Jain et al., MLSys 2020, Sec. 6.1) evaluates its baselines, so every
comparison runs on one simulator.

The baselines:

* :func:`checkpoint_all`: no rematerialization (the plain training step).
* :func:`chen_sqrtn` and :func:`chen_greedy` (with :func:`chen_greedy_sweep`): Chen et al.,
  "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174, 2016, on the
  articulation points of the forward graph as in Checkmate's implementation.
* :func:`articulation_points`: checkpoint every ``k``-th articulation point of the forward
  graph, i.e. segment boundaries that exist on general graphs (ResNet, U-Net).
* :func:`griewank_revolve`: Griewank and Walther's binomial checkpointing ("Algorithm 799:
  revolve", ACM TOMS 26(1), 2000), optimal on linear chains (:meth:`Graph.chain`).

:func:`baseline_schedules` sweeps each baseline's parameter and keeps, per baseline, the
cheapest setting that fits a memory budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import comb
from typing import Any

from mlcycle.train.remat.graph import COMPUTE, FREE, Graph, Schedule
from mlcycle.train.remat.simulate import SimResult, simulate

__all__ = [
    "BaselineRun",
    "articulation_points",
    "baseline_schedules",
    "chen_greedy",
    "chen_greedy_sweep",
    "chen_sqrtn",
    "checkpoint_all",
    "forward_articulation_points",
    "griewank_revolve",
    "is_chain",
    "revolve_cost",
    "revolve_recomputes",
    "schedule_from_checkpoints",
    "schedule_from_computes",
    "sweep_baselines",
]


# -- checkpoint sets -> schedules -----------------------------------------------------------


def checkpoint_all(graph: Graph) -> Schedule:
    """Compute each node once in order and free each output right after its last use."""
    return schedule_from_checkpoints(graph, set(range(len(graph))))


def schedule_from_checkpoints(graph: Graph, keep: Iterable[int]) -> Schedule:
    """The schedule that keeps the outputs in ``keep`` and recomputes the rest on demand.

    Args:
        graph: the training graph.
        keep: node indices whose outputs stay resident from their first computation until
            their last use. Backward nodes are always kept (they are never recomputed).

    Forward nodes (``backward == False``) run in order. A non-kept forward node is freed once
    no later *forward* node needs it; when a backward node needs it, it is recomputed, together
    with whatever of its ancestors is missing, and then stays until its last use.
    """
    keep = set(keep)
    nodes = graph.nodes
    n = len(graph)
    last = graph.last_use()
    is_bwd = [node.backward for node in nodes]
    fwd_last = [max((s for s in graph.succs[i] if not is_bwd[s]), default=i) for i in range(n)]
    # next_fwd[x]: the first forward index >= x (n when none); a release after a forward node
    # is the only one that drops non-kept forward outputs past their last forward use.
    next_fwd = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        next_fwd[i] = i if not is_bwd[i] else next_fwd[i + 1]
    resident = [False] * n
    due: dict[int, list[int]] = {}  # main-loop step -> outputs released right after it
    ops: list[tuple[int, int]] = []

    def compute(u: int, step: int) -> None:
        ops.append((COMPUTE, u))
        resident[u] = True
        if nodes[u].output:
            return
        when = max(step, last[u])
        if u not in keep and not is_bwd[u]:
            when = min(when, next_fwd[max(step, fwd_last[u])])
        due.setdefault(when, []).append(u)

    def ensure(v: int, step: int) -> None:
        # Recompute v (and missing ancestors) so that it is resident; iterative DFS.
        stack = [v]
        while stack:
            u = stack[-1]
            if resident[u]:
                stack.pop()
                continue
            missing = [p for p in graph.preds[u] if not resident[p]]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            compute(u, step)

    for v in range(n):
        if is_bwd[v]:
            for p in graph.preds[v]:
                ensure(p, v)
        compute(v, v)
        for u in sorted(due.pop(v, ())):
            ops.append((FREE, u))
            resident[u] = False
    return Schedule.from_ops(ops)


def schedule_from_computes(graph: Graph, computes: Sequence[int]) -> Schedule:
    """Insert the earliest frees into a sequence of computations.

    Each computed instance of a node is freed right after the last computation that reads
    it (before the node is computed again), or at once when nothing reads it; the last
    instance of a node marked ``output`` is never freed. For a fixed compute order this gives
    the lowest peak the simulator's memory model allows.

    Raises:
        ValueError: a computation reads a node that was never computed before it.
    """
    n = len(graph)
    current = [-1] * n  # position in ``computes`` of each node's resident instance
    last_read = list(range(len(computes)))
    for t, v in enumerate(computes):
        for p in graph.preds[v]:
            if current[p] < 0:
                raise ValueError(
                    f"compute {t} of node {v} ({graph.nodes[v].name!r}) reads node {p}, which "
                    "is not computed before it."
                )
            last_read[current[p]] = t
        current[v] = t
    final = {current[v] for v in range(n) if graph.nodes[v].output and current[v] >= 0}
    frees: list[list[int]] = [[] for _ in computes]
    for t, v in enumerate(computes):
        if t not in final:
            frees[last_read[t]].append(v)
    ops: list[tuple[int, int]] = []
    for t, v in enumerate(computes):
        ops.append((COMPUTE, v))
        ops.extend((FREE, u) for u in frees[t])
    return Schedule.from_ops(ops)


# -- articulation points -------------------------------------------------------------------


def forward_articulation_points(graph: Graph) -> list[int]:
    """The forward nodes that separate the forward graph, in topological order.

    The forward DAG (nodes with ``backward == False`` and the edges between them) is taken as
    an undirected graph, with a virtual source joined to every forward node without forward
    inputs and a virtual sink joined to every forward node without forward consumers (as in
    Checkmate's ``DFGraph.articulation_points``). A node is returned when removing it
    disconnects that graph: every path from the input to the loss passes through it, so
    checkpointing it cuts the network into independent segments. On a chain every forward
    node is one; on a ResNet only the nodes between residual blocks are.
    """
    fwd = [i for i, node in enumerate(graph.nodes) if not node.backward]
    if not fwd:
        return []
    local = {v: k for k, v in enumerate(fwd)}
    m = len(fwd)
    source, sink = m, m + 1
    adj: list[list[int]] = [[] for _ in range(m + 2)]
    for k, v in enumerate(fwd):
        ins = [local[p] for p in graph.preds[v] if p in local]
        outs = [s for s in graph.succs[v] if s in local]
        for j in ins:
            adj[k].append(j)
            adj[j].append(k)
        # Only the first input-free node is the entry: later ones read only parameters (a
        # captured weight transpose, say) and would open a bypass around every block.
        if not ins and k == 0:
            adj[k].append(source)
            adj[source].append(k)
        if not outs:
            adj[k].append(sink)
            adj[sink].append(k)
    # Iterative Tarjan (Hopcroft-Tarjan lowpoints) from the virtual source.
    disc = [-1] * (m + 2)
    low = [0] * (m + 2)
    parent = [-1] * (m + 2)
    cut = [False] * (m + 2)
    disc[source] = low[source] = 0
    timer = 0
    stack = [(source, iter(adj[source]))]
    while stack:
        u, it = stack[-1]
        advanced = False
        for w in it:
            if disc[w] < 0:
                timer += 1
                disc[w] = low[w] = timer
                parent[w] = u
                stack.append((w, iter(adj[w])))
                advanced = True
                break
            if w != parent[u]:
                low[u] = min(low[u], disc[w])
        if advanced:
            continue
        stack.pop()
        if stack:
            p = stack[-1][0]
            low[p] = min(low[p], low[u])
            if p != source and low[u] >= disc[p]:
                cut[p] = True
    return [fwd[k] for k in range(m) if cut[k]]


def articulation_points(graph: Graph, k: int = 1) -> Schedule:
    """Checkpoint every ``k``-th articulation point of the forward graph.

    Segmentation on general graphs, the candidate set that Chen et al. (arXiv:1604.06174,
    2016, Sec. 4) and Checkmate (Jain et al., MLSys 2020, Sec. 6.1) use for their baselines on
    non-linear networks: the articulation points (:func:`forward_articulation_points`) are the
    only nodes whose checkpoint splits the graph, so a skip-connection graph (ResNet, U-Net)
    is cut between its blocks. With ``k == 1`` all of them are kept; the schedule is built
    by :func:`schedule_from_checkpoints`.

    Args:
        graph: the training graph.
        k: keep the ``k``-th, ``2k``-th, ... articulation point in topological order.

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (keep every k-th articulation point), got {k}.")
    aps = forward_articulation_points(graph)
    return schedule_from_checkpoints(graph, _every_kth(aps, k))


def _every_kth(items: Sequence[int], k: int) -> set[int]:
    return {v for idx, v in enumerate(items) if (idx + 1) % k == 0}


# -- Chen et al. 2016 ----------------------------------------------------------------------


def chen_sqrtn(graph: Graph) -> Schedule:
    """Chen et al.'s sqrt(n) checkpointing on the articulation points.

    Chen, Xu, Zhang and Guestrin, "Training Deep Nets with Sublinear Memory Cost",
    arXiv:1604.06174, 2016, Sec. 4.1: split the network into about sqrt(n) segments, keep
    each segment's boundary and recompute the segment's inside during the backward pass, for
    O(sqrt(n)) memory at the cost of one extra forward pass. As in Checkmate's
    ``solve_chen_sqrtn``, the ``n`` candidates are the forward graph's articulation points
    (:func:`forward_articulation_points`; every node of a chain) and every
    ``floor(sqrt(n))``-th one is kept.
    """
    aps = forward_articulation_points(graph)
    k = max(1, math.isqrt(len(aps)))
    return schedule_from_checkpoints(graph, _every_kth(aps, k))


def _chen_greedy_keep(graph: Graph, aps: Sequence[int], budget_bytes_segment: float) -> set[int]:
    candidates = set(aps)
    keep: set[int] = set()
    running = 0
    for v, node in enumerate(graph.nodes):
        if node.backward:
            continue
        running += node.bytes
        if v in candidates and running > budget_bytes_segment:
            keep.add(v)
            running = 0
    return keep


def chen_greedy(graph: Graph, budget_bytes_segment: int) -> Schedule:
    """Chen et al.'s greedy segmentation for a per-segment memory threshold ``b``.

    Chen, Xu, Zhang and Guestrin, "Training Deep Nets with Sublinear Memory Cost",
    arXiv:1604.06174, 2016, Algorithm 3 ("memory planning with budget"): walk the forward
    nodes in order adding up their output bytes, and at an articulation point (a valid
    segment boundary, :func:`forward_articulation_points`) whose running total exceeds ``b``,
    checkpoint it and restart the count (as in Checkmate's ``solve_chen_greedy``). Smaller
    ``b`` gives more, shorter segments; sweep ``b`` with :func:`chen_greedy_sweep`.

    Args:
        graph: the training graph.
        budget_bytes_segment: the threshold ``b`` in bytes.
    """
    aps = forward_articulation_points(graph)
    return schedule_from_checkpoints(graph, _chen_greedy_keep(graph, aps, budget_bytes_segment))


def chen_greedy_sweep(graph: Graph, num: int = 32) -> list[tuple[int, Schedule]]:
    """:func:`chen_greedy` over a geometric sweep of thresholds ``b``.

    Chen et al. (arXiv:1604.06174, 2016, Sec. 4.3) search ``b`` for the lowest-memory
    plan; here ``num`` thresholds are spaced geometrically from the smallest nonzero forward
    output to the total forward bytes, and thresholds that give the same checkpoint set are
    reported once (with the first such ``b``).

    Returns:
        ``(b, schedule)`` pairs, ``b`` increasing.
    """
    fwd_bytes = [node.bytes for node in graph.nodes if not node.backward]
    positive = [b for b in fwd_bytes if b > 0]
    aps = forward_articulation_points(graph)
    if not positive:
        return [(0, schedule_from_checkpoints(graph, _chen_greedy_keep(graph, aps, 0)))]
    lo, hi = min(positive), max(sum(positive), min(positive))
    if num < 2 or hi == lo:
        thresholds = [lo]
    else:
        ratio = (hi / lo) ** (1.0 / (num - 1))
        thresholds = sorted({int(lo * ratio**i) for i in range(num)} | {0, hi})
    seen: set[frozenset[int]] = set()
    out: list[tuple[int, Schedule]] = []
    for b in thresholds:
        keep = frozenset(_chen_greedy_keep(graph, aps, b))
        if keep in seen:
            continue
        seen.add(keep)
        out.append((b, schedule_from_checkpoints(graph, keep)))
    return out


# -- Griewank & Walther's revolve on chains ---------------------------------------------------


def is_chain(graph: Graph) -> bool:
    """Whether ``graph`` has the structure of :meth:`Graph.chain` (names, costs, bytes aside).

    That is ``2n`` nodes: forward ``f_0..f_{n-1}`` with ``f_i`` reading ``f_{i-1}``, then
    backward ``b_{n-1}..b_0`` with ``b_i`` reading ``f_i``, ``b_{i+1}`` and ``f_{i-1}``.
    """
    size = len(graph)
    if size < 2 or size % 2:
        return False
    n = size // 2
    if any(node.backward != (i >= n) for i, node in enumerate(graph.nodes)):
        return False
    return graph.preds == Graph.chain(n).preds


def revolve_cost(n: int, slots: int) -> int:
    """The minimal number of forward steps to reverse ``n`` steps with ``slots`` checkpoints.

    Griewank and Walther, "Algorithm 799: revolve", ACM TOMS 26(1), 2000, Prop. 1 (and
    Griewank, Optim. Methods Softw. 1, 1992): with ``beta(s, r) = C(s + r, s)`` and ``r`` the
    repetition number such that ``beta(s, r - 1) < n <= beta(s, r)``, the minimum is
    ``t(n, s) = r * n - beta(s + 1, r - 1)``. As in revolve, the ``s`` checkpoints include
    the one holding the initial state, and the forward step taped inside each reverse step
    is not counted; ``t(n, 1) = n (n - 1) / 2`` and ``t(n, s) = n - 1`` once ``s >= n - 1``.

    It satisfies the dynamic program ``t(1, s) = 0``,
    ``t(n, s) = min_{0<m<n} m + t(n - m, s - 1) + t(m, s)`` that :func:`griewank_revolve`
    follows. See :func:`revolve_recomputes` for what it means on :meth:`Graph.chain`.

    Raises:
        ValueError: ``n < 1``, or ``slots < 1`` with ``n > 1``.
    """
    if n < 1:
        raise ValueError(f"n (number of steps) must be >= 1, got {n}.")
    if n == 1:
        return 0
    if slots < 1:
        raise ValueError(f"slots must be >= 1 to reverse {n} steps, got {slots}.")
    if slots == 1:
        return n * (n - 1) // 2
    r = 0
    while comb(slots + r, slots) < n:
        r += 1
    return r * n - (comb(slots + r, slots + 1) if r >= 1 else 0)


def revolve_recomputes(n_layers: int, slots: int) -> int:
    """Recomputations of ``griewank_revolve(Graph.chain(n_layers), slots)``: the optimum.

    The schedule runs revolve on the ``n_layers - 1`` steps between ``f_0`` and
    ``f_{n-1}`` (see :func:`griewank_revolve`), computes ``f_{n-2}`` and ``f_{n-1}`` once, so
    it computes forward nodes ``revolve_cost(n_layers - 1, slots) + 2`` times in all; each
    backward node runs once.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
    if n_layers == 1:
        return 0
    return revolve_cost(n_layers - 1, slots) + 2 - n_layers


def _revolve_split(steps: int, slots: int) -> int:
    """An optimal first checkpoint distance ``m`` for ``steps`` steps and ``slots >= 2``."""

    def f(m: int) -> int:
        return m + revolve_cost(steps - m, slots - 1) + revolve_cost(m, slots)

    # f is convex in m (a sum of convex piecewise-linear functions): bisect on its slope.
    lo, hi = 1, steps - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if f(mid + 1) < f(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _revolve_computes(n: int, slots: int) -> list[int]:
    """The compute order of revolve on ``Graph.chain(n)`` (node indices)."""
    if n == 1:
        return [0, 1]
    # State k (k >= 1) is f_{k-1}, node index k - 1; state 0 is the chain's input (free).
    # Reverse step j (1 <= j <= n - 1) is b_{j-1}, node index 2n - j; it reads state j - 1
    # (restored or advanced to) and state j (held from the reverse step before it).
    seq: list[int] = []
    first = True

    def reverse(j: int) -> None:
        nonlocal first
        if first:  # the top of the chain: f_{n-2}, f_{n-1}, then b_{n-1} (no incoming grad)
            assert j == n - 1
            seq.extend((n - 2, n - 1, n))
            first = False
        seq.append(2 * n - j)

    # Tasks (base state c, steps l, slots s): state c is resident (a checkpoint or the input);
    # reverse steps c + l, ..., c + 1 remain.
    tasks = [(0, n - 1, slots)]
    while tasks:
        c, steps, s = tasks.pop()
        if steps == 1:
            reverse(c + 1)
        elif s == 1:
            for j in range(c + steps, c, -1):
                seq.extend(range(c, j - 1))  # advance c -> j - 1 (states c+1..j-1)
                reverse(j)
        else:
            m = _revolve_split(steps, s)
            seq.extend(range(c, c + m))  # advance c -> c + m and keep state c + m
            tasks.append((c, m, s))  # runs second
            tasks.append((c + m, steps - m, s - 1))  # runs first
    return seq


def griewank_revolve(graph: Graph, slots: int) -> Schedule:
    """Binomial checkpointing (revolve) on a linear chain: the fewest recomputations.

    Griewank and Walther, "Algorithm 799: revolve: an implementation of checkpointing for the
    reverse or adjoint mode of computational differentiation", ACM TOMS 26(1):19-45, 2000.
    Revolve recursively places the next checkpoint at an optimal distance ``m`` and reverses
    the right part with one checkpoint fewer, then the left part; a forward node may be
    recomputed many times. Its forward-step count is :func:`revolve_cost`.

    Mapping onto this package's graph and memory model (:meth:`Graph.chain` with ``n``
    layers): backward node ``b_i`` reads ``f_i``, ``f_{i-1}`` and ``b_{i+1}``, so the
    revolve states are the chain's input (free, not a node) and ``f_0..f_{n-2}``, and its
    ``n - 1`` steps are the layers 1..n-1; the reverse step of layer ``i`` is ``b_i``, which
    reuses the ``f_i`` it shares with ``b_{i+1}`` instead of re-taping it, while ``f_{n-2}``,
    ``f_{n-1}`` and ``b_{n-1}`` (which has no incoming gradient) run once at the top. So:

    * forward computations: ``revolve_cost(n - 1, slots) + 2`` (see
      :func:`revolve_recomputes`), each backward node once;
    * memory: ``slots`` counts revolve's checkpoints, one of which holds the chain's input,
      so at most ``slots - 1`` forward outputs are checkpointed; besides them, the simulator
      holds at most four outputs (the incoming gradient ``b_{i+1}``, ``f_i``, and two forward
      outputs while advancing, or ``f_{i-1}`` and ``b_i`` while reversing). With ``B`` bytes
      per node the peak is ``min(slots + 3, n + 1) * B`` for ``n >= 2`` (``2 * B`` for
      ``n == 1``); ``n + 1`` is the checkpoint-all peak, reached once ``slots >= n - 2``.

    Brute force over every schedule of chains up to 8 layers confirms that no schedule with
    that peak recomputes less. Frees are placed by :func:`schedule_from_computes`. With
    unequal node bytes or costs the schedule stays valid but is optimal only in step counts.

    Args:
        graph: a chain as built by :meth:`Graph.chain` (see :func:`is_chain`).
        slots: revolve's number of checkpoints, ``>= 1`` (the input's included).

    Raises:
        ValueError: ``graph`` is not a linear chain, or ``slots < 1``.
    """
    if not is_chain(graph):
        raise ValueError(
            f"griewank_revolve needs a linear chain graph as built by Graph.chain(n) "
            f"(f_i reads f_(i-1); b_i reads f_i, b_(i+1) and f_(i-1)); {graph.name!r} with "
            f"{len(graph)} nodes is not one. Use chen_sqrtn, chen_greedy or "
            "articulation_points on general graphs."
        )
    if slots < 1:
        raise ValueError(
            f"slots must be >= 1 (revolve's checkpoints, the chain input's included), got {slots}."
        )
    return schedule_from_computes(graph, _revolve_computes(len(graph) // 2, slots))


# -- sweeps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineRun:
    """One setting of one baseline and what it costs in the simulator.

    Attributes:
        name: the baseline ("checkpoint_all", "chen_sqrtn", "chen_greedy", "revolve",
            "articulation").
        setting: its parameter (``b`` for chen_greedy, ``slots`` for revolve, ``k`` for
            articulation, ``None`` otherwise).
        schedule: the schedule.
        result: :func:`simulate` of it.
    """

    name: str
    setting: Any
    schedule: Schedule
    result: SimResult


def _spacings(top: int, dense: int = 64, factor: float = 1.125) -> list[int]:
    """``1, 2, ..., dense``, then geometric steps up to ``top`` (included)."""
    out = list(range(1, min(top, dense) + 1))
    x = float(dense)
    while out[-1] < top:
        x = max(x * factor, out[-1] + 1)
        out.append(min(top, int(x)))
    return out


def sweep_baselines(graph: Graph) -> list[BaselineRun]:
    """Every applicable baseline over its parameter sweep, simulated.

    ``checkpoint_all``; ``chen_sqrtn``; ``chen_greedy`` over :func:`chen_greedy_sweep`;
    ``revolve`` (chains only, :func:`is_chain`) over ``slots = 1, 2, ...`` up to the first
    count with no recomputation; ``articulation`` over spacings ``k = 1, 2, ...`` up to the
    number of articulation points (distinct checkpoint sets only). Beyond 64 the slot counts
    and spacings step geometrically (factor 1.125), which keeps long chains fast.
    """
    runs: list[BaselineRun] = []

    def add(name: str, setting: Any, schedule: Schedule) -> None:
        runs.append(BaselineRun(name, setting, schedule, simulate(graph, schedule)))

    add("checkpoint_all", None, checkpoint_all(graph))
    add("chen_sqrtn", None, chen_sqrtn(graph))
    for b, schedule in chen_greedy_sweep(graph):
        add("chen_greedy", b, schedule)
    if is_chain(graph):
        n = len(graph) // 2
        for slots in _spacings(max(1, n - 2)):  # n - 2 slots: no recomputation
            add("revolve", slots, schedule_from_computes(graph, _revolve_computes(n, slots)))
    aps = forward_articulation_points(graph)
    seen: set[frozenset[int]] = set()
    for k in _spacings(max(1, len(aps))):
        keep = frozenset(_every_kth(aps, k))
        if keep in seen:
            continue
        seen.add(keep)
        add("articulation", k, schedule_from_checkpoints(graph, keep))
    return runs


def baseline_schedules(
    graph: Graph, budget_bytes: int | None = None
) -> dict[str, tuple[Schedule, SimResult]]:
    """The best setting of each baseline for a memory budget.

    Runs :func:`sweep_baselines` and keeps, per baseline name ("checkpoint_all",
    "chen_sqrtn", "chen_greedy", "revolve", "articulation"), the setting with the lowest cost
    whose simulated ``peak_bytes <= budget_bytes`` (ties: lower peak); with ``budget_bytes``
    None, the lowest-peak setting (ties: lower cost). A baseline with no setting that fits is
    left out; "revolve" appears only for chains (:func:`is_chain`).

    Returns:
        name -> (schedule, simulated result).
    """
    best: dict[str, BaselineRun] = {}
    for run in sweep_baselines(graph):
        res = run.result
        if budget_bytes is None:
            key = (res.peak_bytes, res.cost)
        elif res.peak_bytes <= budget_bytes:
            key = (res.cost, res.peak_bytes)
        else:
            continue
        cur = best.get(run.name)
        if cur is None:
            best[run.name] = run
            continue
        cur_key = (
            (cur.result.peak_bytes, cur.result.cost)
            if budget_bytes is None
            else (cur.result.cost, cur.result.peak_bytes)
        )
        if key < cur_key:
            best[run.name] = run
    return {name: (run.schedule, run.result) for name, run in best.items()}
