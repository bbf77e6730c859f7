"""HyperSched's event interface driven by hand: a fake clock and fake trials, no Ray runtime."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("ray.tune")

from ray.tune.execution.placement_groups import PlacementGroupFactory  # noqa: E402

from mlcycle.develop.hypersched import HyperSched  # noqa: E402

CONTINUE, PAUSE, STOP = "CONTINUE", "PAUSE", "STOP"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeTrial:
    def __init__(self, trial_id: str, atoms: int = 1) -> None:
        self.trial_id = trial_id
        self.status = "PENDING"
        self.placement_group_factory = PlacementGroupFactory([{"CPU": atoms}])
        self.resized_to: list[int] = []

    def update_resources(self, pgf: PlacementGroupFactory) -> None:
        assert self.status != "RUNNING"
        self.placement_group_factory = pgf
        self.resized_to.append(int(pgf.required_resources["CPU"]))


def make(clock: Clock, **kwargs: Any) -> HyperSched:
    defaults = dict(
        deadline_s=100.0,
        atoms=4,
        metric="acc",
        mode="max",
        max_t=27,
        grace_period=1,
        reduction_factor=3,
        resize_overhead_s=10.0,
        scaling=lambda n: float(n),  # linear
        clock=clock,
        start_time=0.0,
    )
    return HyperSched(**{**defaults, **kwargs})


def report(sched: HyperSched, trial: FakeTrial, it: int, acc: float, iter_s: float) -> str:
    trial.status = "RUNNING"
    decision = sched.on_trial_result(
        None, trial, {"training_iteration": it, "acc": acc, "time_this_iter_s": iter_s}
    )
    if decision != CONTINUE:
        trial.status = "PAUSED" if decision == PAUSE else "TERMINATED"
    return decision


def test_admission_stops_when_a_new_trial_could_not_reach_the_top_rung() -> None:
    clock = Clock()
    sched = make(clock, backfill=False)
    a = FakeTrial("a")
    sched.on_trial_add(None, a)
    assert sched.admits_new_trial()  # nothing measured yet, 3 atoms free
    clock.t = 12.0
    assert report(sched, a, 1, 0.5, iter_s=2.0) == CONTINUE
    # A new trial needs 10 s to start + 27 iterations * 2 s = 64 s; 88 s remain.
    assert sched.admits_new_trial()
    clock.t = 36.5  # 63.5 s remain
    assert not sched.admits_new_trial()
    assert sched.admission_closed()
    clock.t = 37.0
    assert not sched.admits_new_trial()  # closed for good
    assert sched.summary()["admission_closed_at_s"] == pytest.approx(36.5)


def test_backfill_admits_only_onto_atoms_no_trial_can_use() -> None:
    clock = Clock()
    sched = make(clock, atoms=2, max_t=27)
    a = FakeTrial("a")
    sched.on_trial_add(None, a)
    sched.on_trial_add(None, FakeTrial("b"))
    clock.t = 4.0
    assert report(sched, a, 1, 0.5, iter_s=2.0) == CONTINUE
    sched.overhead.observations_s[:] = [10.0]
    clock.t = 50.0  # 50 s left: a new trial would need 10 s + 54 s to reach the top rung
    assert sched.admission_closed() is False  # closed to ordinary admission, not backfill
    assert not sched.admission_open
    sched.on_trial_remove(None, sched._trials["b"])  # b's atom is free
    # a needs 52 s on one atom for its 26 iterations left; on two, after a 10 s restart,
    # 40 s * 2 / 2 = 40 >= 26: the plan wants the free atom, so no backfill.
    assert not sched.admits_new_trial()
    clock.t = 4.0 + 24 * 2.0  # a at iteration 25: 2 left, one atom is plenty
    assert report(sched, a, 25, 0.9, iter_s=2.0) == CONTINUE
    assert sched.admits_new_trial()  # the free atom would idle: backfill
    assert sched.summary()["events"]["backfill"] == 1
    clock.t = 89.0  # 11 s left: 10 s to start + 2 s to the first rung do not fit
    assert not sched.admits_new_trial()
    assert sched.admission_closed()


def test_admission_waits_for_free_atoms_and_for_promotions() -> None:
    clock = Clock()
    sched = make(clock, atoms=2)
    a, b = FakeTrial("a"), FakeTrial("b")
    sched.on_trial_add(None, a)
    sched.on_trial_add(None, b)
    assert sched.free_atoms == 0 and not sched.admits_new_trial()
    clock.t = 5.0
    assert report(sched, a, 1, 0.9, 1.0) == CONTINUE  # first at rung 1: goes on
    assert report(sched, b, 1, 0.1, 1.0) == PAUSE  # 1 of 2 goes on: b is paused
    assert sched.free_atoms == 1 and sched.admits_new_trial()


def test_a_rung_loser_is_paused_and_promoted_once_the_rung_fills() -> None:
    clock = Clock()
    sched = make(clock, atoms=4)
    trials = {k: FakeTrial(k) for k in "abcd"}
    for t in trials.values():
        sched.on_trial_add(None, t)
    clock.t = 3.0
    assert report(sched, trials["a"], 1, 0.9, 1.0) == CONTINUE
    assert report(sched, trials["b"], 1, 0.8, 1.0) == PAUSE  # keep ceil(2/3) = 1
    assert sched.choose_trial_to_run(None) is None  # b is not in the top third yet
    assert report(sched, trials["c"], 1, 0.1, 1.0) == PAUSE
    assert report(sched, trials["d"], 1, 0.2, 1.0) == PAUSE
    # Four at rung 1 now: two may go on, so b is promoted (retrospectively), not c or d.
    assert sched.choose_trial_to_run(None) is trials["b"]
    assert [e["kind"] for e in sched.events if e["trial_id"] == "b"][-1] == "promote"


def test_a_trial_stops_when_its_next_iteration_would_end_after_the_deadline() -> None:
    clock = Clock()
    sched = make(clock, atoms=1, deadline_s=20.0)
    a = FakeTrial("a")
    sched.on_trial_add(None, a)
    clock.t = 17.0
    assert report(sched, a, 1, 0.5, iter_s=2.0) == CONTINUE  # 3 s left, 2 s iterations
    clock.t = 19.0
    assert report(sched, a, 2, 0.6, iter_s=2.0) == STOP  # 1 s left
    assert sched.free_atoms == 1


def test_the_top_rung_completes_a_trial() -> None:
    clock = Clock()
    sched = make(clock, atoms=1, max_t=3)
    a = FakeTrial("a")
    sched.on_trial_add(None, a)
    clock.t = 1.0
    assert report(sched, a, 3, 0.7, 0.1) == STOP
    assert sched.summary()["events"]["complete"] == 1


def exploiting(clock: Clock, overhead_s: float) -> tuple[HyperSched, FakeTrial, FakeTrial]:
    """Two trials on 4 atoms; admission closes at t=60; b finishes, freeing its atom."""
    sched = make(clock, atoms=4, resize_overhead_s=overhead_s)
    a, b = FakeTrial("a"), FakeTrial("b")
    sched.on_trial_add(None, a)
    sched.on_trial_add(None, b)
    clock.t = 4.0
    assert report(sched, a, 1, 0.5, 2.0) == CONTINUE
    assert report(sched, b, 1, 0.6, 2.0) == CONTINUE  # the better one is never paused
    sched.overhead.observations_s[:] = [overhead_s]  # as if restarts had been measured
    clock.t = 60.0
    assert report(sched, b, 27, 0.5, 2.0) == STOP  # top rung: done
    assert not sched.admission_open  # 40 s cannot take a new trial to the top rung
    return sched, a, b


def test_freed_atoms_go_to_the_best_trial_when_the_gain_beats_the_overhead() -> None:
    clock = Clock()
    sched, a, _ = exploiting(clock, overhead_s=5.0)
    # a: iteration 2 of 27 at 2 s per iteration, 40 s left: 20 iterations on its 1 atom.
    # On 2 atoms after a 5 s restart it does the 25 left (35 s * 2 / 2); more atoms add
    # nothing, so it asks for 2 and leaves 2 free.
    assert report(sched, a, 2, 0.9, 2.0) == PAUSE
    assert sched.committed_atoms == 2  # reserved for the restart
    assert sched.choose_trial_to_run(None) is a
    assert a.resized_to == [2]
    assert sched.free_atoms == 2


def test_no_resize_when_the_overhead_eats_the_gain() -> None:
    clock = Clock()
    sched, a, _ = exploiting(clock, overhead_s=30.0)
    # 1 atom: 20 iterations by the deadline; 4 atoms after 30 s: 10 s * 4 / 2 = 20. No gain.
    assert report(sched, a, 2, 0.9, 2.0) == CONTINUE
    assert sched.choose_trial_to_run(None) is None
    assert a.resized_to == []


def test_measured_overhead_replaces_the_prior() -> None:
    clock = Clock()
    sched = make(clock, atoms=1, resize_overhead_s=99.0)
    a = FakeTrial("a")
    sched.on_trial_add(None, a)
    clock.t = 7.0
    report(sched, a, 1, 0.5, iter_s=2.0)  # added at 0, first result at 7 after 2 s of work
    assert sched.overhead.estimate_s == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"deadline_s": 0}, "deadline_s must be > 0"),
        ({"atoms": 0}, "atoms must be an int >= 1"),
        ({"mode": "up"}, "mode must be 'max' or 'min'"),
        ({"base_atoms": 5}, r"base_atoms must be an int in \[1, atoms=4\]"),
        ({"max_atoms_per_trial": 9}, "max_atoms_per_trial must be an int"),
        ({"admission_atoms": 9}, "admission_atoms must be an int"),
        ({"min_gain_iters": 0}, "min_gain_iters must be an int >= 1"),
    ],
)
def test_bad_arguments_say_what_is_valid(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(Clock(), **kwargs)


def test_a_missing_metric_is_reported_with_the_fix() -> None:
    sched = make(Clock(), metric=None, mode=None)
    with pytest.raises(ValueError, match="metric='accuracy'"):
        sched.on_trial_add(None, FakeTrial("a"))
