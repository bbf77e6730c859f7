"""HyperSched on a real local Ray instance: the experiment ends at the deadline."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")

from mlcycle.develop import run_tune  # noqa: E402

DEADLINE_S = 20.0
MARGIN_S = 6.0  # Tune's teardown after the stopper fires: actors stop, state is written


@pytest.mark.slow
def test_hypersched_on_local_ray_ends_by_the_deadline(tmp_path) -> None:
    """Two logical atoms, the synthetic trainable at 0.5 s per iteration, a 20 s deadline:
    every result arrives by the deadline, fit returns within a few seconds of it, and the
    Ray instance the run started is shut down."""
    assert not ray.is_initialized()
    report = run_tune(
        workload="synthetic",
        scheduler="hypersched",
        deadline_s=DEADLINE_S,
        atoms=2,
        seed=0,
        iter_s=0.5,
        plot_path=tmp_path / "curves.png",
    )
    assert not ray.is_initialized()
    assert report.trials_run >= 1 and report.best_accuracy is not None
    assert report.results_after_deadline == 0  # no iteration ran past the deadline
    assert all(t_s <= DEADLINE_S for pts in report.curves.values() for t_s, *_ in pts)
    assert report.wall_s <= DEADLINE_S + MARGIN_S
    assert 0.0 < report.atom_utilisation <= 1.0
    assert report.scheduler_summary["admission_closed_at_s"] is not None  # it exploited
    assert (tmp_path / "curves.png").stat().st_size > 0
