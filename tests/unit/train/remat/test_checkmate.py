"""Checkmate's MILP and LP relaxation, judged by the simulator and by an exact DP."""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mlcycle.train.remat._checkmate import (
    _build_model,
    lp_lower_bound,
    solve_checkmate_milp,
)
from mlcycle.train.remat.baselines import checkpoint_all
from mlcycle.train.remat.graph import COMPUTE, FREE, Graph, Node
from mlcycle.train.remat.simulate import simulate

GRAPHS = Path("/work/shared/remat-graphs")
EPS = 1e-6


def _peak(graph: Graph) -> int:
    return simulate(graph, checkpoint_all(graph)).peak_bytes


def _random_graph(seed: int, n: int) -> Graph:
    """A random DAG: each node reads one or two earlier nodes, mostly recent ones."""
    rng = random.Random(seed)
    nodes = []
    preds: list[tuple[int, ...]] = []
    for i in range(n):
        output = i == n - 1 or rng.random() < 0.15
        nodes.append(Node(f"v{i}", float(rng.choice([1, 2, 3])), rng.randint(1, 4), output=output))
        if i == 0:
            preds.append(())
            continue
        k = rng.randint(1, min(2, i))
        window = list(range(max(0, i - 3), i))
        ps = set(rng.sample(window, min(k, len(window))))
        if rng.random() < 0.3:
            ps.add(rng.randrange(i))
        preds.append(tuple(sorted(ps)))
    return Graph(nodes=nodes, preds=preds, name=f"random{seed}")


def _random_training_graph(seed: int, m: int) -> Graph:
    """A random forward DAG of ``m`` nodes (a chain with skips) and its mirrored backward.

    Backward node ``b_i`` reads ``f_i``, the inputs of ``f_i`` and the gradients ``b_s`` of
    the forward consumers ``s`` of ``f_i``; sometimes one gradient is marked ``output``.
    """
    rng = random.Random(seed)
    fwd_preds: list[tuple[int, ...]] = []
    for i in range(m):
        ps = {i - 1} if i else set()
        if i >= 2 and rng.random() < 0.4:
            ps.add(rng.randrange(i - 1))
        fwd_preds.append(tuple(sorted(ps)))
    nodes = [Node(f"f{i}", float(rng.choice([1, 2, 3])), rng.choice([1, 1, 2])) for i in range(m)]
    preds = list(fwd_preds)
    fwd_succs = [[s for s in range(m) if i in fwd_preds[s]] for i in range(m)]
    grad = {}
    out = rng.randrange(m) if rng.random() < 0.3 else -1
    for i in reversed(range(m)):
        grad[i] = len(nodes)
        ins = {i, *fwd_preds[i], *(grad[s] for s in fwd_succs[i])}
        nodes.append(
            Node(
                f"b{i}",
                float(rng.choice([1, 2, 3])),
                1,
                backward=True,
                output=i == out,
            )
        )
        preds.append(tuple(sorted(ins)))
    return Graph(nodes=nodes, preds=preds, name=f"train{seed}")


def _dp_optimum(graph: Graph, budget: int) -> float:
    """Cheapest frontier-advancing schedule within ``budget``, frees anywhere, by exact DP.

    Positions ``(t, k)``, ``k <= t``, are visited in order; at each one node ``k`` is computed
    (always when ``k == t``) or skipped. Before a compute any resident outputs but its inputs
    may be dropped. The state is the resident set; a state is dropped when a superset is
    reachable at no more cost (dropping is free). Memory follows the simulator: the kept set
    plus the new output, its transient bytes and the stash allocated so far (node ``t``'s at
    ``(t, t)``, its first computation) must fit.
    """
    n = len(graph)
    mem = [node.bytes for node in graph.nodes]
    cost = [node.cost for node in graph.nodes]
    stash_before = [sum(node.stash for node in graph.nodes[:t]) for t in range(n)]
    pmask = [sum(1 << p for p in graph.preds[k]) for k in range(n)]
    omask = sum(1 << i for i, node in enumerate(graph.nodes) if node.output)

    def size(mask: int) -> int:
        return sum(mem[i] for i in range(n) if mask >> i & 1)

    states = {0: 0.0}
    for t in range(n):
        for k in range(t + 1):
            new = {} if k == t else dict(states)
            for resident, c in states.items():
                if resident >> k & 1 or resident & pmask[k] != pmask[k]:
                    continue
                room = budget - mem[k] - size(pmask[k]) - graph.nodes[k].transient
                room -= stash_before[t] + (graph.nodes[k].stash if k == t else 0)
                optional = resident & ~pmask[k]
                sub = optional
                while True:  # every subset of the optional residents to keep
                    if size(sub) <= room:
                        after = pmask[k] | sub | (1 << k)
                        if c + cost[k] < new.get(after, math.inf):
                            new[after] = c + cost[k]
                    if sub == 0:
                        break
                    sub = (sub - 1) & optional
            states = {}
            for mask, c in sorted(new.items(), key=lambda item: item[1]):
                if not any(other & mask == mask for other in states):
                    states[mask] = c
    return min((c for mask, c in states.items() if mask & omask == omask), default=math.inf)


def _check(graph: Graph, budget: int, **kwargs):
    res = solve_checkmate_milp(graph, budget, time_limit_s=20, **kwargs)
    if res.status == "infeasible":
        assert res.schedule is None and res.cost is None and res.lower_bound == math.inf
        return res
    assert res.status == "optimal", res
    sim = simulate(graph, res.schedule)  # raises if invalid (outputs checked too)
    assert sim.peak_bytes <= budget
    assert sim.cost == pytest.approx(res.cost)
    assert res.cost >= res.lower_bound - EPS * graph.total_cost
    assert res.lower_bound >= graph.total_cost - EPS
    return res


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_chain_budgets(n):
    g = Graph.chain(n)
    peak = _peak(g)
    full = _check(g, peak)
    assert full.cost / g.total_cost == pytest.approx(1.0)
    last_cost = full.cost
    for budget in range(peak - 1, 0, -1):
        res = _check(g, budget)
        if res.status == "infeasible":
            break
        assert res.cost >= last_cost - EPS  # less memory never costs less
        last_cost = res.cost
        lp = lp_lower_bound(g, budget)
        assert g.total_cost - EPS <= lp <= res.cost + EPS
    assert solve_checkmate_milp(g, 1).status == "infeasible"


_EXACT_CASES = [
    Graph.chain(5),
    _random_graph(5, 10),
    *(_random_training_graph(seed, 5) for seed in range(4)),
    _random_training_graph(7, 6),
]


def _with_stash_and_transient(graph: Graph, seed: int) -> Graph:
    """``graph`` with random transient bytes on some nodes and a stash on some backward ones."""
    rng = random.Random(seed)
    nodes = [
        replace(
            node,
            transient=rng.choice([0, 0, 1, 3]),
            stash=rng.choice([0, 1, 2]) if node.backward else 0,
        )
        for node in graph.nodes
    ]
    return Graph(nodes=nodes, preds=graph.preds, name=f"{graph.name}-stash{seed}")


_EXACT_CASES += [
    _with_stash_and_transient(Graph.chain(4), 1),
    # Seeds whose budgets below the peak force recomputation before they become infeasible.
    *(
        _with_stash_and_transient(_random_training_graph(seed, m), seed)
        for seed, m in ((0, 5), (4, 4), (6, 5))
    ),
]


@pytest.mark.parametrize("graph", _EXACT_CASES, ids=[g.name for g in _EXACT_CASES])
def test_milp_matches_exact_dp(graph):
    """The MILP is exact over frontier-advancing schedules judged by the simulator: it neither
    misses a schedule nor over-counts memory, under all three FREE linearizations."""
    recomputes = 0
    for budget in range(_peak(graph), 0, -1):
        expected = _dp_optimum(graph, budget)
        res = _check(graph, budget)
        if expected == math.inf:
            assert res.status == "infeasible"
            break
        assert res.cost == pytest.approx(expected)
        recomputes += expected > graph.total_cost
        lps = {}
        for linearization in ("paper", "paper-upper", "tight"):
            if linearization != "paper":
                other = _check(graph, budget, linearization=linearization)
                assert other.cost == pytest.approx(expected)
            lps[linearization] = lp_lower_bound(graph, budget, linearization=linearization)
            assert graph.total_cost - EPS <= lps[linearization] <= expected + EPS
        assert lps["paper-upper"] <= lps["tight"] + EPS
    assert recomputes  # the budgets below the peak did force recomputation


@pytest.mark.parametrize("seed", range(8))
def test_random_graphs(seed):
    g = _random_graph(100 + seed, 9) if seed < 2 else _random_training_graph(100 + seed, 6)
    peak = _peak(g)
    full = _check(g, peak)
    assert full.cost == pytest.approx(g.total_cost)
    for frac in (0.85, 0.7, 0.55):
        res = _check(g, int(frac * peak))
        expected = _dp_optimum(g, int(frac * peak))
        if res.status == "infeasible":
            assert expected == math.inf
            break
        assert res.cost == pytest.approx(expected)
        relaxed = solve_checkmate_milp(g, int(frac * peak), relax=True)
        assert relaxed.status == "optimal"
        assert g.total_cost - EPS <= relaxed.lower_bound <= res.cost + EPS


def test_outputs_stay_resident_and_const_bytes():
    base = Graph.chain(4)
    nodes = [
        Node(nd.name, nd.cost, nd.bytes, backward=nd.backward, output=nd.backward)
        for nd in base.nodes
    ]
    g = Graph(nodes=nodes, preds=base.preds, const_bytes=100)
    peak = _peak(g)
    assert peak > 100
    for budget in range(peak, 100, -1):
        res = _check(g, budget)
        if res.status == "infeasible":
            break
        ops = res.schedule.ops
        for i, node in enumerate(g.nodes):
            if node.output:
                assert (FREE, i) not in ops[ops.index((COMPUTE, i)) :]
    assert solve_checkmate_milp(g, 100).status == "infeasible"


def test_infeasible_found_by_solver():
    # Both outputs are resident while the second is computed: needs 4 bytes, each op alone 2.
    g = Graph(
        nodes=[Node("a", 1.0, 2, output=True), Node("b", 1.0, 2, output=True)], preds=[(), ()]
    )
    res = solve_checkmate_milp(g, 3)
    assert res.status == "infeasible" and res.schedule is None
    assert _check(g, 4).cost == 2.0


def test_build_is_fast():
    g = Graph.from_node_link(GRAPHS / "vgg_unet_32_train.json")
    start = time.perf_counter()
    _build_model(g, 0.5 * _peak(g))
    assert time.perf_counter() - start < 1.0


def test_time_limit_reports_timeout_or_feasible():
    g = Graph.from_node_link(GRAPHS / "vgg_unet_32_train.json")
    budget = int(0.5 * _peak(g))
    res = solve_checkmate_milp(g, budget, time_limit_s=0.05)
    assert res.status in {"timeout", "feasible", "optimal"}
    if res.schedule is not None:
        assert simulate(g, res.schedule).peak_bytes <= budget
        assert res.cost >= res.lower_bound - EPS * g.total_cost


@pytest.mark.slow
def test_vgg16_at_90_percent():
    g = Graph.from_node_link(GRAPHS / "VGG16_256_train.json")
    budget = int(0.9 * _peak(g))
    res = solve_checkmate_milp(g, budget, time_limit_s=30)
    assert res.schedule is not None
    sim = simulate(g, res.schedule)
    assert sim.peak_bytes <= budget
    assert sim.cost_ratio <= 1.02
    assert res.cost >= res.lower_bound - EPS * g.total_cost


def test_overshoot_is_resolved_with_a_tighter_budget(monkeypatch):
    """Should a rounded solution exceed the budget (solver tolerance), the model is re-solved."""
    from mlcycle.train.remat import _checkmate

    g = Graph.chain(5)
    budget = _peak(g) - 1
    calls = []

    def pessimistic(graph, schedule, **kwargs):
        sim = simulate(graph, schedule, **kwargs)
        calls.append(sim.peak_bytes)
        return replace(sim, peak_bytes=sim.peak_bytes + 1) if len(calls) == 1 else sim

    monkeypatch.setattr(_checkmate, "simulate", pessimistic)
    with pytest.warns(RuntimeWarning, match="exceeded the budget"):
        res = solve_checkmate_milp(g, budget)
    assert len(calls) == 2
    if res.schedule is not None:
        assert simulate(g, res.schedule).peak_bytes <= budget
