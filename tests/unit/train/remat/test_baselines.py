"""Property tests of the rematerialization baselines against the simulator."""

from __future__ import annotations

import heapq
from functools import cache
from pathlib import Path

import networkx as nx
import pytest
from _strategies import chains, training_graphs
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcycle.train.remat.baselines import (
    articulation_points,
    baseline_schedules,
    checkpoint_all,
    chen_greedy,
    chen_greedy_sweep,
    chen_sqrtn,
    forward_articulation_points,
    griewank_revolve,
    is_chain,
    revolve_cost,
    revolve_recomputes,
    schedule_from_checkpoints,
    schedule_from_computes,
    sweep_baselines,
)
from mlcycle.train.remat.graph import Graph, Node
from mlcycle.train.remat.simulate import simulate

GRAPHS_DIR = Path(__file__).parents[4].parent / "shared" / "remat-graphs"
NAMES = {"checkpoint_all", "chen_sqrtn", "chen_greedy", "revolve", "articulation"}
PROPS = settings(max_examples=40, deadline=None)
any_graph = st.one_of(training_graphs(), chains())


# -- every baseline is a valid schedule ----------------------------------------------------


@PROPS
@given(g=any_graph, k=st.integers(1, 6), b=st.integers(0, 2000))
def test_every_baseline_is_valid(g: Graph, k: int, b: int) -> None:
    for schedule in (
        checkpoint_all(g),
        chen_sqrtn(g),
        chen_greedy(g, b),
        articulation_points(g, k),
        *(s for _, s in chen_greedy_sweep(g)),
    ):
        simulate(g, schedule)  # raises InvalidScheduleError when invalid
    if is_chain(g):
        for slots in range(1, 6):
            simulate(g, griewank_revolve(g, slots))
    else:
        with pytest.raises(ValueError, match="linear chain"):
            griewank_revolve(g, 2)


@PROPS
@given(g=any_graph)
def test_checkpoint_all_has_no_recomputation(g: Graph) -> None:
    res = simulate(g, checkpoint_all(g))
    assert res.cost_ratio == 1.0
    assert res.recomputes == 0
    # the same plan, with frees placed by schedule_from_computes
    assert simulate(g, schedule_from_computes(g, range(len(g)))) == res


@PROPS
@given(g=any_graph, frac=st.floats(0.15, 1.2))
def test_baseline_schedules_fit_the_budget(g: Graph, frac: float) -> None:
    full = simulate(g, checkpoint_all(g)).peak_bytes
    budget = int(frac * full)
    chosen = baseline_schedules(g, budget)
    assert set(chosen) <= NAMES
    assert ("checkpoint_all" in chosen) == (full <= budget)
    assert ("revolve" in chosen) <= is_chain(g)
    runs = sweep_baselines(g)
    for name, (schedule, res) in chosen.items():
        assert simulate(g, schedule) == res
        assert res.peak_bytes <= budget
        fitting = [r.result.cost for r in runs if r.name == name and r.result.peak_bytes <= budget]
        assert res.cost == min(fitting)
    # a baseline is left out only when none of its settings fits
    for name in NAMES - set(chosen):
        assert all(r.result.peak_bytes > budget for r in runs if r.name == name)


@PROPS
@given(g=any_graph)
def test_baseline_schedules_without_budget_is_lowest_peak(g: Graph) -> None:
    chosen = baseline_schedules(g)
    runs = sweep_baselines(g)
    assert {"checkpoint_all", "chen_sqrtn", "chen_greedy", "articulation"} <= set(chosen)
    assert ("revolve" in chosen) == is_chain(g)
    for name, (schedule, res) in chosen.items():
        assert simulate(g, schedule) == res
        assert res.peak_bytes == min(r.result.peak_bytes for r in runs if r.name == name)


def test_chen_sqrtn_lowers_the_peak_of_a_chain() -> None:
    g = Graph.chain(16)
    full = simulate(g, checkpoint_all(g))
    sqrtn = simulate(g, chen_sqrtn(g))
    assert sqrtn.peak_bytes < full.peak_bytes
    assert 1.0 < sqrtn.cost_ratio <= 1.5  # at most one extra forward pass


@PROPS
@given(g=training_graphs())
def test_chen_greedy_thresholds(g: Graph) -> None:
    # b = 0 closes a segment at every articulation point, a huge b at none.
    everything = simulate(g, chen_greedy(g, 0))
    assert everything == simulate(g, articulation_points(g, 1))
    nothing = schedule_from_checkpoints(g, set())
    assert simulate(g, chen_greedy(g, 10**12)) == simulate(g, nothing)


# -- articulation points -------------------------------------------------------------------


@PROPS
@given(g=any_graph)
def test_articulation_points_match_networkx(g: Graph) -> None:
    fwd = [i for i, node in enumerate(g.nodes) if not node.backward]
    und = nx.Graph()
    und.add_nodes_from(fwd + ["source", "sink"])
    und.add_edges_from((p, i) for p, i in g.edges if p in fwd and i in fwd)
    for v in fwd:
        if not any(p in fwd for p in g.preds[v]):
            und.add_edge("source", v)
        if not any(s in fwd for s in g.succs[v]):
            und.add_edge("sink", v)
    expected = sorted(v for v in nx.articulation_points(und) if isinstance(v, int))
    assert forward_articulation_points(g) == expected


def test_articulation_points_of_a_chain_are_every_forward_node() -> None:
    assert forward_articulation_points(Graph.chain(7)) == list(range(7))


def test_articulation_points_rejects_bad_spacing() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        articulation_points(Graph.chain(4), 0)


# -- revolve -------------------------------------------------------------------------------


@cache
def _revolve_dp(steps: int, slots: int) -> int:
    if steps == 1:
        return 0
    if slots == 1:
        return steps * (steps - 1) // 2
    return min(
        m + _revolve_dp(steps - m, slots - 1) + _revolve_dp(m, slots) for m in range(1, steps)
    )


def test_revolve_cost_binomial_formula_matches_the_dp() -> None:
    for steps in range(1, 60):
        for slots in range(1, 7):
            assert revolve_cost(steps, slots) == _revolve_dp(steps, slots), (steps, slots)
    assert revolve_cost(10, 1) == 45
    assert revolve_cost(10, 9) == 9


@PROPS
@given(n=st.integers(3, 20), slots=st.integers(1, 5))
def test_revolve_reaches_the_binomial_optimum(n: int, slots: int) -> None:
    g = Graph.chain(n)
    schedule = griewank_revolve(g, slots)
    res = simulate(g, schedule)
    # revolve on the n - 1 steps between f_0 and f_{n-1}, plus f_{n-2}, f_{n-1} once
    assert res.recomputes == revolve_cost(n - 1, slots) + 2 - n == revolve_recomputes(n, slots)
    assert res.peak_bytes == min(slots + 3, n + 1)
    counts = schedule.compute_counts(len(g))
    assert counts[n:] == [1] * n  # every backward node runs once


def test_revolve_recomputes_a_node_more_than_twice() -> None:
    g = Graph.chain(10)
    counts = griewank_revolve(g, 2).compute_counts(len(g))
    assert max(counts) >= 3


def test_revolve_peak_scales_with_node_bytes() -> None:
    g = Graph.chain(12, nbytes=8)
    assert simulate(g, griewank_revolve(g, 3)).peak_bytes == (3 + 3) * 8


def _brute_force_min_computes(g: Graph, peak: int) -> int | None:
    """Fewest computations of any valid schedule of ``g`` within ``peak`` (unit bytes)."""
    n = len(g)
    need = [sum(1 << p for p in g.preds[v]) for v in range(n)]
    best = {(0, False): 0}
    heap = [(0, 0, False)]
    while heap:
        d, mask, done = heapq.heappop(heap)
        if done:
            return d
        if best[(mask, done)] < d:
            continue
        live = mask.bit_count()
        for v in range(n):
            bit = 1 << v
            if mask & bit:
                state, cost = (mask & ~bit, done), d
            elif mask & need[v] == need[v] and live < peak:
                state, cost = (mask | bit, done or v == n - 1), d + 1
            else:
                continue
            if cost < best.get(state, cost + 1):
                best[state] = cost
                heapq.heappush(heap, (cost, *state))
    return None


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_revolve_is_optimal_in_our_memory_model(n: int) -> None:
    g = Graph.chain(n)
    for slots in range(1, n):
        peak = min(slots + 3, n + 1)
        optimum = _brute_force_min_computes(g, peak)
        res = simulate(g, griewank_revolve(g, slots))
        assert res.peak_bytes <= peak
        assert res.cost == optimum, (n, slots)


def test_revolve_rejects_non_chains_and_bad_slots() -> None:
    g = Graph(
        nodes=[Node("a", 1, 1), Node("b", 1, 1), Node("c", 1, 1, backward=True)],
        preds=[(), (0,), (0, 1)],
    )
    assert not is_chain(g)
    with pytest.raises(ValueError, match="linear chain"):
        griewank_revolve(g, 2)
    with pytest.raises(ValueError, match="slots must be >= 1"):
        griewank_revolve(Graph.chain(5), 0)


def test_is_chain() -> None:
    for n in range(1, 8):
        assert is_chain(Graph.chain(n, cost=2.0, nbytes=5))
    g = Graph.chain(4)
    skip = Graph(nodes=g.nodes, preds=[*g.preds[:2], (0, 1), *g.preds[3:]])
    assert not is_chain(skip)


# -- published graphs ----------------------------------------------------------------------

PUBLISHED = sorted(GRAPHS_DIR.glob("*.json")) if GRAPHS_DIR.is_dir() else []


@pytest.mark.skipif(not PUBLISHED, reason=f"no published graphs at {GRAPHS_DIR}")
@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_baselines_on_published_graphs(path: Path) -> None:
    g = Graph.from_node_link(path)
    full = simulate(g, checkpoint_all(g)).peak_bytes
    lowest = baseline_schedules(g)
    assert {"checkpoint_all", "chen_sqrtn", "chen_greedy", "articulation"} <= set(lowest)
    assert min(res.peak_bytes for _, res in lowest.values()) < full
    for frac in (None, 0.9, 0.5, 0.3):
        budget = None if frac is None else int(frac * full)
        for schedule, res in baseline_schedules(g, budget).values():
            assert simulate(g, schedule) == res
            assert budget is None or res.peak_bytes <= budget
