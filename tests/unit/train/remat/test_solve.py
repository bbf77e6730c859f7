"""The Plan API: valid, within budget, never worse than a baseline, bounded from below."""

from __future__ import annotations

import math

import pytest
from _strategies import chains, training_graphs
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcycle.train.remat import Graph, InfeasibleBudgetError, simulate, solve
from mlcycle.train.remat._bounds import cut_knapsack_bound, min_feasible_bytes
from mlcycle.train.remat._checkmate import solve_checkmate_milp
from mlcycle.train.remat.baselines import baseline_schedules, checkpoint_all, griewank_revolve


def _budget(graph: Graph, t: float) -> int:
    lo = min_feasible_bytes(graph)
    hi = simulate(graph, checkpoint_all(graph)).peak_bytes
    return int(lo + t * (hi - lo))


@settings(max_examples=40, deadline=None)
@given(graph=training_graphs(max_forward=10), t=st.floats(0.0, 1.0))
def test_plan_is_valid_within_budget_and_beats_every_baseline(graph: Graph, t: float) -> None:
    budget = _budget(graph, t)
    try:
        plan = solve(graph, budget_bytes=budget, time_limit_s=2)
    except InfeasibleBudgetError as exc:
        # Only allowed when nothing at all fits: no baseline does either.
        assert not baseline_schedules(graph, budget)
        assert exc.min_feasible_bytes <= budget
        return
    sim = simulate(graph, plan.schedule)  # raises on an invalid schedule
    assert sim.peak_bytes == plan.peak_bytes <= budget
    assert math.isclose(sim.cost_ratio, plan.cost_ratio)
    for name, (_, base) in baseline_schedules(graph, budget).items():
        assert plan.cost_ratio <= base.cost_ratio + 1e-9, name
    assert 1.0 <= plan.lower_bound <= plan.cost_ratio + 1e-9


@settings(max_examples=25, deadline=None)
@given(graph=training_graphs(max_forward=8, stash=True), t=st.floats(0.0, 1.0))
def test_plans_with_stashed_gradients_are_valid_and_bounded(graph: Graph, t: float) -> None:
    budget = _budget(graph, t)
    try:
        plan = solve(graph, budget_bytes=budget, time_limit_s=2)
    except InfeasibleBudgetError:
        assert not baseline_schedules(graph, budget)
        return
    assert simulate(graph, plan.schedule).peak_bytes <= budget
    assert 1.0 <= plan.lower_bound <= plan.cost_ratio + 1e-9


@settings(max_examples=25, deadline=None)
@given(graph=training_graphs(max_forward=6), t=st.floats(0.0, 1.0))
def test_cut_bound_never_exceeds_the_exact_optimum(graph: Graph, t: float) -> None:
    budget = _budget(graph, t)
    res = solve_checkmate_milp(graph, budget, time_limit_s=20)
    if res.status != "optimal":
        return
    assert cut_knapsack_bound(graph, budget) <= res.cost + 1e-6 * graph.total_cost


@settings(max_examples=20, deadline=None)
@given(graph=chains(min_layers=3, max_layers=9), slots=st.integers(1, 6))
def test_chain_plan_matches_or_beats_revolve(graph: Graph, slots: int) -> None:
    revolve = simulate(graph, griewank_revolve(graph, slots))
    plan = solve(graph, budget_bytes=revolve.peak_bytes, time_limit_s=3)
    assert plan.peak_bytes <= revolve.peak_bytes
    assert plan.cost_ratio <= revolve.cost_ratio + 1e-9


def test_below_the_least_feasible_budget_names_it() -> None:
    graph = Graph.chain(6)
    least = min_feasible_bytes(graph)
    with pytest.raises(InfeasibleBudgetError, match=str(least)) as info:
        solve(graph, budget_bytes=least - 1)
    assert info.value.min_feasible_bytes == least
    solve(graph, budget_bytes=least)  # the stated budget does work


def test_bad_arguments_say_what_is_valid() -> None:
    graph = Graph.chain(4)
    with pytest.raises(ValueError, match="choose one of"):
        solve(graph, budget_fraction=0.5, solver="magic")
    with pytest.raises(ValueError, match="exactly one"):
        solve(graph)
    with pytest.raises(ValueError, match="exactly one"):
        solve(graph, budget_bytes=10, budget_fraction=0.5)


def test_full_budget_needs_no_recomputation() -> None:
    graph = Graph.chain(8)
    plan = solve(graph, budget_fraction=1.0)
    assert plan.cost_ratio == 1.0 and plan.status == "optimal"


@settings(max_examples=40, deadline=None)
@given(
    graph=training_graphs(max_forward=12), t=st.floats(0.0, 1.0), alpha=st.sampled_from([0.5, 1, 2])
)
def test_eviction_schedules_are_valid_and_within_budget(
    graph: Graph, t: float, alpha: float
) -> None:
    from mlcycle.train.remat._heuristic import evict_schedule

    budget = _budget(graph, t)
    schedule = evict_schedule(graph, budget, alpha=alpha)
    if schedule is not None:
        assert simulate(graph, schedule).peak_bytes <= budget


def test_transient_bytes_count_only_while_a_node_computes() -> None:
    from mlcycle.train.remat.graph import Node, Schedule

    nodes = [Node("a", 1.0, 10), Node("b", 1.0, 10, transient=25), Node("c", 1.0, 10)]
    graph = Graph(nodes=nodes, preds=[(), (0,), (1,)])
    ops = [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1)]  # a; b (a live); free a; c; free b
    assert simulate(graph, Schedule.from_ops(ops)).peak_bytes == 10 + 10 + 25
    least = min_feasible_bytes(graph)
    assert least == 45  # b's input, output and intermediates
    with pytest.raises(InfeasibleBudgetError):
        solve(graph, budget_bytes=least - 1)
    plan = solve(graph, budget_bytes=least)
    assert plan.peak_bytes <= least


def test_stash_is_allocated_once_and_kept_to_the_end() -> None:
    from mlcycle.train.remat._heuristic import evict_schedule
    from mlcycle.train.remat.graph import Node, Schedule

    # a -> b (backward, stashes 7 bytes: a weight gradient) -> c
    nodes = [Node("a", 1.0, 10), Node("b", 1.0, 10, backward=True, stash=7), Node("c", 1.0, 10)]
    graph = Graph(nodes=nodes, preds=[(), (0,), (1,)])
    once = [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1)]
    assert simulate(graph, Schedule.from_ops(once)).peak_bytes == 10 + 10 + 7
    # Recomputing b allocates no second stash: a, b, free b, b again, free a, c.
    twice = [(0, 0), (0, 1), (1, 1), (0, 1), (1, 0), (0, 2), (1, 1)]
    assert simulate(graph, Schedule.from_ops(twice)).peak_bytes == 27
    assert min_feasible_bytes(graph) == 27  # at b: a, b and its stash; at c: b, stash, c
    assert cut_knapsack_bound(graph, 26) == math.inf
    assert evict_schedule(graph, 26) is None
    assert simulate(graph, evict_schedule(graph, 27)).peak_bytes <= 27


@settings(max_examples=30, deadline=None)
@given(graph=training_graphs(max_forward=10, stash=True), t=st.floats(0.0, 1.0))
def test_eviction_search_is_valid_and_never_worse_than_its_starts(graph: Graph, t: float) -> None:
    from mlcycle.train.remat._heuristic import evict_schedule, evict_search
    from mlcycle.train.remat.solve import EVICT_SCORES

    budget = _budget(graph, t)
    starts = [
        evict_schedule(graph, budget, alpha=a, beta=b, chain=c) for a, b, c in EVICT_SCORES[:2]
    ]
    found = evict_search(graph, budget, EVICT_SCORES[:2], time_limit_s=5)
    if found is None:
        assert starts == [None, None]
        return
    sim = simulate(graph, found)  # raises on an invalid schedule
    assert sim.peak_bytes <= budget
    assert sim.cost <= min(simulate(graph, s).cost for s in starts if s is not None) + 1e-9


def test_eviction_search_with_no_changed_choice_is_plain_eviction() -> None:
    from mlcycle.train.remat._heuristic import _evict, _Scores, evict_schedule

    graph = Graph.chain(12)
    for budget in (5, 7, 10):
        run = _evict(graph, budget, _Scores(1.0, 1.0, True), {})
        assert run is not None
        assert run.schedule == evict_schedule(graph, budget, alpha=1.0, beta=1.0, chain=True)
        assert run.cost == simulate(graph, run.schedule).cost


def test_eviction_search_beats_greedy_eviction_on_a_tight_chain() -> None:
    # A 16-layer chain in 5 slots: every eviction score recomputes 53 nodes or more; changing a
    # few eviction choices saves at least 7 of them.
    from mlcycle.train.remat._heuristic import evict_schedule, evict_search
    from mlcycle.train.remat.solve import EVICT_SCORES

    graph = Graph.chain(16)
    greedy = min(
        simulate(graph, s).cost
        for a, b, c in EVICT_SCORES
        if (s := evict_schedule(graph, 5, alpha=a, beta=b, chain=c)) is not None
    )
    found = evict_search(graph, 5, EVICT_SCORES, time_limit_s=20)
    assert found is not None
    sim = simulate(graph, found)
    assert sim.peak_bytes <= 5
    assert sim.cost <= greedy - 7
    # Revolve is optimal on a chain; with 2 slots its peak is the same 5 bytes.
    revolve = simulate(graph, griewank_revolve(graph, 2))
    assert revolve.peak_bytes == 5
    assert sim.cost >= revolve.cost
