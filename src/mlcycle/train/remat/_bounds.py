"""Cheap proven lower bounds on the cost of any schedule within a memory budget.

The *cut knapsack bound*. Take any backward node ``b`` and the moment it is first computed.
Every forward output read by ``b`` or by a descendant of ``b`` is then either resident, or it
is computed again later (descendants run after ``b``). The outputs ``b`` itself reads and
``b``'s own output must be resident. So the resident bytes of that set, plus ``b``'s inputs
and output, fit in the budget, and what does not fit must be paid for once more. The cheapest
way to drop enough bytes is a 0/1 knapsack; its LP relaxation (drop in order of cost per byte,
the last item fractionally) is a valid lower bound on the extra cost. The bound holds for every
schedule, with any number of recomputations and any order, under the simulator's memory model.
The maximum over ``b`` is reported.
"""

from __future__ import annotations

import math

from mlcycle.train.remat.graph import Graph


def _descendants(graph: Graph) -> list[int]:
    """For each node, the bitset (a Python int) of itself and all its descendants."""
    desc = [0] * len(graph)
    for v in range(len(graph) - 1, -1, -1):
        bits = 1 << v
        for s in graph.succs[v]:
            bits |= desc[s]
        desc[v] = bits
    return desc


def _ancestor_stash(graph: Graph, desc: list[int]) -> list[int]:
    """For each node, the stash bytes of itself and its ancestors: allocated before it runs in
    every schedule, and never freed."""
    stashed = [(u, graph.nodes[u].stash) for u in range(len(graph)) if graph.nodes[u].stash]
    return [sum(s for u, s in stashed if desc[u] >> v & 1) for v in range(len(graph))]


def _resident_at(graph: Graph, v: int, desc: list[int]) -> set[int]:
    """Nodes whose outputs are surely live while ``v`` is computed: ``v``, its inputs, and the
    ``output`` nodes among its ancestors (computed before ``v`` and never freed)."""
    live = set(graph.preds[v]) | {v}
    live |= {u for u in range(v) if graph.nodes[u].output and desc[u] >> v & 1}
    return live


def min_feasible_bytes(graph: Graph) -> int:
    """A peak no schedule can go below: at every node, what :func:`_resident_at` must hold,
    plus the constant part."""
    desc = _descendants(graph)
    stash = _ancestor_stash(graph, desc)
    worst = max(
        graph.nodes[v].transient
        + stash[v]
        + sum(graph.nodes[u].bytes for u in _resident_at(graph, v, desc))
        for v in range(len(graph))
    )
    return worst + graph.const_bytes


def cut_knapsack_bound(graph: Graph, budget_bytes: int) -> float:
    """A proven lower bound on the total cost of any valid schedule within ``budget_bytes``.

    Returns ``math.inf`` when some cut cannot fit at all (the budget is infeasible).
    """
    n = len(graph)
    cap = budget_bytes - graph.const_bytes
    best_extra = 0.0
    desc = _descendants(graph)
    stash = _ancestor_stash(graph, desc)
    forward = [not node.backward for node in graph.nodes]
    for b in range(n):
        if forward[b]:
            continue
        must = _resident_at(graph, b, desc)
        needed: set[int] = set()
        bits = desc[b]
        while bits:
            low = bits & -bits
            w = low.bit_length() - 1
            bits ^= low
            needed.update(p for p in graph.preds[w] if forward[p])
        must_bytes = graph.nodes[b].transient + stash[b] + sum(graph.nodes[u].bytes for u in must)
        if must_bytes > cap:
            return math.inf
        items = sorted(
            (graph.nodes[v].cost / max(graph.nodes[v].bytes, 1), v) for v in needed - must
        )
        excess = sum(graph.nodes[v].bytes for _, v in items) + must_bytes - cap
        extra = 0.0
        for _, v in items:
            if excess <= 0:
                break
            size = graph.nodes[v].bytes
            take = min(1.0, excess / size) if size else 1.0
            extra += take * graph.nodes[v].cost
            excess -= size
        best_extra = max(best_extra, extra)
    return graph.total_cost + best_extra
