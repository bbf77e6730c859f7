"""The schedulers through the virtual-time controller: invariants over whole runs, fast."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("ray.tune")

from mlcycle.develop._sim import SimCosts, simulate  # noqa: E402
from mlcycle.develop._workloads import synthetic_accuracy, workload_spec  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(
    atoms=st.integers(1, 8),
    deadline_s=st.floats(20, 150),
    start_s=st.floats(0.5, 20),
    save_s=st.floats(0, 3),
    iter_s=st.floats(0.5, 4),
    seed=st.integers(0, 1000),
)
def test_hypersched_never_commits_more_atoms_than_the_pool(
    atoms: int, deadline_s: float, start_s: float, save_s: float, iter_s: float, seed: int
) -> None:
    report = simulate(
        "hypersched",
        deadline_s=deadline_s,
        atoms=atoms,
        seed=seed,
        costs=SimCosts(start_s=start_s, save_s=save_s),
        spec=workload_spec("synthetic", iter_s=iter_s),
        check_invariants=True,  # raises the moment committed or used atoms exceed the pool
    )
    assert report.last_result_s <= deadline_s
    assert 0.0 <= report.atom_utilisation <= 1.0


def test_every_peer_runs_in_the_simulator_on_the_same_configurations() -> None:
    reports = {
        name: simulate(name, deadline_s=60, atoms=4, seed=3, costs=SimCosts(start_s=2.0))
        for name in ("hypersched", "asha", "rcs")
    }
    first = {name: r.configs[min(r.configs)] for name, r in reports.items()}
    assert first["hypersched"] == first["asha"] == first["rcs"]
    assert all(r.trials_run >= 4 for r in reports.values())
    assert reports["hypersched"].scheduler_summary["events"]["admission_closed"] == 1


def test_no_resizes_when_a_restart_costs_more_than_the_time_left() -> None:
    report = simulate(
        "hypersched", deadline_s=60, atoms=8, seed=0, costs=SimCosts(start_s=40.0, jitter=0.0)
    )
    assert report.resizes == 0


def test_hypersched_beats_asha_on_a_tight_deadline() -> None:
    """Regression guard for the simulated regime of the benchmark's quick run: a deadline
    shorter than one trial on one atom, restarts of 4 iterations (deterministic, seeded)."""
    best = {
        name: statistics.mean(
            simulate(
                name, deadline_s=60, atoms=8, seed=s, costs=SimCosts(start_s=8.0)
            ).best_accuracy
            for s in range(5)
        )
        for name in ("hypersched", "asha")
    }
    assert best["hypersched"] >= best["asha"]


def test_synthetic_curves_cross_as_real_ones_do() -> None:
    fast, best = {"lr": 0.3, "seed": 1}, {"lr": 0.03, "seed": 1}
    assert synthetic_accuracy(fast, 1) > synthetic_accuracy(best, 1)  # early rungs mislead
    assert synthetic_accuracy(best, 27) > synthetic_accuracy(fast, 27)
    assert synthetic_accuracy(best, 5) == synthetic_accuracy(best, 5)  # deterministic
