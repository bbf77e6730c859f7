"""HyperSched's pure decisions: rungs, admission, resize gain, allocation (no Ray)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcycle.develop._estimate import OverheadEstimator, ScalingModel
from mlcycle.develop._policy import (
    TrialView,
    admits_new_trial,
    amdahl_speedup,
    in_top_fraction,
    iterations_by_deadline,
    keep_count,
    plan_allocation,
    promotable,
    resize_gain,
    rung_milestones,
    speedup_from_table,
)

LINEAR = amdahl_speedup(0.0)


def test_rungs_are_geometric_and_end_at_max_t() -> None:
    assert rung_milestones(1, 27, 3) == (1, 3, 9, 27)
    assert rung_milestones(1, 81, 3) == (1, 3, 9, 27, 81)
    assert rung_milestones(2, 10, 2) == (2, 4, 8, 10)
    assert rung_milestones(5, 5, 3) == (5,)


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 27, 3), "grace_t"), ((4, 2, 3), "max_t"), ((1, 27, 1.0), "eta")],
)
def test_rungs_reject_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rung_milestones(*args)


def test_top_fraction_keeps_ceil_n_over_eta() -> None:
    assert [keep_count(n, 3) for n in range(0, 8)] == [0, 1, 1, 1, 2, 2, 2, 3]
    rung = [0.9, 0.8, 0.7, 0.6]  # keep 2 of 4
    assert in_top_fraction(0.8, rung, 3)
    assert not in_top_fraction(0.7, rung, 3)
    assert in_top_fraction(0.5, [0.5], 3)  # the first trial at a rung goes on


def test_a_paused_trial_is_promoted_once_the_rung_fills_with_worse_trials() -> None:
    rungs = [{"a": 0.9, "b": 0.8}, {}]
    assert promotable({"b": (0, 0.8)}, rungs, 3) == []  # 1 of 2 may go on: "a"
    rungs[0].update({"c": 0.1, "d": 0.2})  # four at the rung now: two may go on
    assert promotable({"b": (0, 0.8)}, rungs, 3) == ["b"]


def test_admission_stops_when_the_remaining_time_cannot_reach_the_top_rung() -> None:
    # 27 iterations of 2 s on one atom plus a 10 s start: 64 s are needed.
    kwargs = {"max_t": 27, "iter_s_one_atom": 2.0, "speedup": 1.0, "start_overhead_s": 10.0}
    assert admits_new_trial(64.0, **kwargs)
    assert not admits_new_trial(63.9, **kwargs)
    assert not admits_new_trial(5.0, **{**kwargs, "iter_s_one_atom": None})
    assert admits_new_trial(11.0, **{**kwargs, "iter_s_one_atom": None})  # nothing measured


@given(
    remaining=st.floats(0, 1e4),
    extra=st.floats(0, 1e4),
    iter_s=st.floats(0.01, 100),
    overhead=st.floats(0, 100),
    max_t=st.integers(1, 200),
)
def test_admission_is_monotone_in_remaining_time(
    remaining: float, extra: float, iter_s: float, overhead: float, max_t: int
) -> None:
    kwargs = {
        "max_t": max_t,
        "iter_s_one_atom": iter_s,
        "speedup": 1.0,
        "start_overhead_s": overhead,
    }
    if admits_new_trial(remaining, **kwargs):
        assert admits_new_trial(remaining + extra, **kwargs)


def test_iterations_by_deadline_counts_whole_iterations_after_the_overhead() -> None:
    assert iterations_by_deadline(100.0, 2.0, 1, LINEAR, 0.0, 1000) == 50
    assert iterations_by_deadline(100.0, 2.0, 4, LINEAR, 20.0, 1000) == 160
    assert iterations_by_deadline(100.0, 2.0, 4, LINEAR, 20.0, 30) == 30  # capped by max_t
    assert iterations_by_deadline(10.0, 2.0, 4, LINEAR, 20.0, 30) == 0


def test_a_resize_pays_off_only_when_the_gain_beats_the_overhead() -> None:
    trial = TrialView("t", score=0.9, iteration=0, atoms=1, iter_s_one_atom=2.0)
    kwargs = {"remaining_s": 100.0, "speedup": LINEAR, "max_t": 1000}
    # 4 atoms after 75 s of restart: 25 s * 4 / 2 = 50 iterations, as many as staying put.
    assert resize_gain(trial, 4, overhead_s=75.0, **kwargs) == 0
    assert resize_gain(trial, 4, overhead_s=10.0, **kwargs) == 180 - 50
    plan = dict(pool_atoms=4, min_gain_iters=1, **kwargs)
    assert plan_allocation([trial], overhead_s=75.0, **plan) == {"t": 1}
    assert plan_allocation([trial], overhead_s=74.0, **plan) == {"t": 4}


def test_allocation_leaves_atoms_to_the_next_trial_when_the_best_finishes_anyway() -> None:
    best = TrialView("best", score=0.9, iteration=20, atoms=1, iter_s_one_atom=2.0)
    next_ = TrialView("next", score=0.8, iteration=0, atoms=1, iter_s_one_atom=2.0)
    plan = plan_allocation(
        [next_, best],
        pool_atoms=8,
        remaining_s=100.0,
        speedup=LINEAR,
        overhead_s=10.0,
        max_t=27,
    )
    assert plan["best"] == 1  # 7 iterations left: it reaches max_t on its one atom
    assert plan["next"] == 1  # 27 iterations in 100 s: one atom is enough too
    short = plan_allocation(
        [next_, best], pool_atoms=8, remaining_s=40.0, speedup=LINEAR, overhead_s=10.0, max_t=27
    )
    assert short == {"best": 1, "next": 2}  # 2 atoms after 10 s: 30 >= 27 iterations


trial_views = st.builds(
    TrialView,
    trial_id=st.text("abcdef", min_size=1, max_size=4),
    score=st.floats(0, 1),
    iteration=st.integers(0, 30),
    atoms=st.integers(0, 8),
    iter_s_one_atom=st.floats(0.1, 50),
)


@settings(max_examples=200, deadline=None)
@given(
    trials=st.lists(trial_views, max_size=12, unique_by=lambda t: t.trial_id),
    pool=st.integers(1, 16),
    cap=st.one_of(st.none(), st.integers(1, 16)),
    remaining=st.floats(0, 500),
    overhead=st.floats(0, 100),
    serial=st.floats(0, 2),
    min_gain=st.integers(1, 5),
)
def test_allocation_never_exceeds_the_pool_and_changes_only_for_a_gain(
    trials: list[TrialView],
    pool: int,
    cap: int | None,
    remaining: float,
    overhead: float,
    serial: float,
    min_gain: int,
) -> None:
    speedup = amdahl_speedup(serial)
    plan = plan_allocation(
        trials,
        pool_atoms=pool,
        remaining_s=remaining,
        speedup=speedup,
        overhead_s=overhead,
        max_t=30,
        max_atoms_per_trial=cap,
        min_gain_iters=min_gain,
    )
    assert set(plan) == {t.trial_id for t in trials}
    assert sum(plan.values()) <= pool
    limit = pool if cap is None else min(pool, cap)
    assert all(0 <= n <= limit for n in plan.values())
    ranked = sorted(trials, key=lambda t: (-t.score, -t.iteration, t.trial_id))
    for i, trial in enumerate(ranked):
        new = plan[trial.trial_id]
        if new == trial.atoms:
            continue
        left = 30 - trial.iteration
        taken = sum(plan[t.trial_id] for t in ranked[:i])
        forced = min(pool - taken, limit) < trial.atoms  # better trials took its atoms
        if new == 0:
            assert forced  # paused only to make room
            continue
        keep = 0 if forced else trial.atoms
        stay = iterations_by_deadline(remaining, trial.iter_s_one_atom, keep, speedup, 0.0, left)
        move = iterations_by_deadline(
            remaining, trial.iter_s_one_atom, new, speedup, overhead, left
        )
        assert move >= stay + min_gain  # a (re)start must gain, net of the overhead


def test_scaling_model_fits_amdahl_from_a_trial_run_at_two_sizes() -> None:
    model = ScalingModel(None, prior_serial_fraction=0.5)
    assert model.speedup(4) == pytest.approx(4 / 2.5)
    truth = amdahl_speedup(0.2)
    model.observe("t", 1, 2.0)
    model.observe("t", 4, 2.0 / truth(4))
    assert model.serial_fraction_ == pytest.approx(0.2, abs=0.01)
    assert model.iter_s_one_atom("t") == pytest.approx(2.0, rel=0.02)
    given = ScalingModel({2: 1.5, 4: 2.0})
    assert given.speedup(3) == pytest.approx(1.75)
    assert given.speedup(8) == pytest.approx(2.0)  # no extrapolated gain


def test_bad_scaling_and_overhead_arguments_say_what_is_valid() -> None:
    with pytest.raises(TypeError, match="function atoms -> speedup"):
        ScalingModel("linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="atoms >= 1 -> speedup > 0"):
        speedup_from_table({0: 1.0})
    with pytest.raises(ValueError, match="resize_overhead_s"):
        OverheadEstimator(-1.0)


def test_overhead_estimate_is_the_recent_median_and_the_pessimistic_one_is_higher() -> None:
    est = OverheadEstimator(10.0, window=5)
    assert est.estimate_s == est.pessimistic_s == 10.0
    for value in (1, 2, 3, 4, 100, 5):
        est.observe(value)
    assert est.estimate_s == 4  # median of 2, 3, 4, 100, 5
    assert est.pessimistic_s == 5  # 80th percentile of the same window
