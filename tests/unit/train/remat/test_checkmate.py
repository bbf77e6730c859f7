"""Checkmate's MILP and LP relaxation, judged by the simulator and by exhaustive search."""

from __future__ import annotations

import itertools
import math
import random
import time
from pathlib import Path

import pytest

from mlcycle.train.remat._checkmate import (
    _build_model,
    lp_lower_bound,
    solve_checkmate_milp,
)
from mlcycle.train.remat.baselines import checkpoint_all
from mlcycle.train.remat.graph import COMPUTE, FREE, Graph, Node, Schedule
from mlcycle.train.remat.simulate import InvalidScheduleError, simulate

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


def _earliest_free_schedule(graph: Graph, stages: list[list[int]]) -> Schedule:
    """Compute the stages in order; free each output right after its last read before the
    node is computed again (outputs that are never recomputed stay to the end)."""
    seq = [k for stage in stages for k in stage]
    free_after: dict[int, list[int]] = {}
    for pos, u in enumerate(seq):
        last = pos
        keep = False
        for q in range(pos + 1, len(seq)):
            if seq[q] == u:
                break
            if u in graph.preds[seq[q]]:
                last = q
        else:
            keep = graph.nodes[u].output
        if not keep:
            free_after.setdefault(last, []).append(u)
    ops = []
    for pos, u in enumerate(seq):
        ops.append((COMPUTE, u))
        ops.extend((FREE, v) for v in sorted(free_after.get(pos, [])))
    return Schedule.from_ops(ops)


def _all_frontier_schedules(graph: Graph) -> list[tuple[float, int]]:
    """(cost, simulated peak) of every valid frontier-advancing schedule, frees earliest."""
    n = len(graph)
    costs = [node.cost for node in graph.nodes]
    found = []
    for masks in itertools.product(*[range(2**t) for t in range(n)]):
        stages = [[i for i in range(t) if m >> i & 1] + [t] for t, m in enumerate(masks)]
        try:
            sim = simulate(graph, _earliest_free_schedule(graph, stages))
        except InvalidScheduleError:
            continue
        found.append((sum(costs[i] for stage in stages for i in stage), sim.peak_bytes))
    return found


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
    feasible = []
    for budget in range(peak - 1, 0, -1):
        res = _check(g, budget)
        if res.status == "infeasible":
            break
        assert res.cost >= last_cost - EPS  # less memory never costs less
        last_cost = res.cost
        feasible.append(budget)
        lp = lp_lower_bound(g, budget)
        assert g.total_cost - EPS <= lp <= res.cost + EPS
    assert solve_checkmate_milp(g, 1).status == "infeasible"


@pytest.mark.parametrize(
    "graph",
    [Graph.chain(2), Graph.chain(3), _random_graph(1, 5), _random_graph(2, 6), _random_graph(3, 6)],
    ids=["chain2", "chain3", "rand1", "rand2", "rand3"],
)
def test_milp_matches_exhaustive_search(graph):
    """The MILP is exact: it neither misses a schedule nor over-counts memory."""
    schedules = _all_frontier_schedules(graph)
    for budget in range(_peak(graph), 0, -1):
        expected = min((c for c, peak in schedules if peak <= budget), default=math.inf)
        res = _check(graph, budget)
        if expected == math.inf:
            assert res.status == "infeasible"
            break
        assert res.cost == pytest.approx(expected)
        tight = _check(graph, budget, linearization="tight")
        assert tight.cost == pytest.approx(expected)
        for linearization in ("paper", "tight"):
            lp = lp_lower_bound(graph, budget, linearization=linearization)
            assert graph.total_cost - EPS <= lp <= expected + EPS


@pytest.mark.parametrize("seed", range(6))
def test_random_graphs(seed):
    g = _random_graph(100 + seed, 12)
    peak = _peak(g)
    full = _check(g, peak)
    assert full.cost == pytest.approx(g.total_cost)
    for frac in (0.8, 0.65, 0.5):
        res = _check(g, int(frac * peak))
        if res.status == "infeasible":
            break
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
