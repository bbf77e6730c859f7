"""Develop: many experiments under a deadline (HyperSched on Ray Tune).

HyperSched (Liaw et al., SoCC 2019) finds the best model by a deadline on a fixed pool of
atoms: it explores with ASHA-style pause-and-promote, stops admitting trials once a new one
could not reach the top rung in time, and gives the freed atoms to the best trials, which
resume from their checkpoints with more data-parallel workers when the speedup beats the
restart overhead.

- :class:`HyperSched`: the Ray Tune ``TrialScheduler``;
- :func:`run_tune`: one experiment on local Ray (or a cluster) -> :class:`TuneReport`;
- :func:`simulate`: the same schedulers in virtual time, no Ray runtime;
- the pure policy: :func:`rung_milestones`, :func:`admits_new_trial`, :func:`resize_gain`,
  :func:`plan_allocation` over :class:`TrialView`;
- :func:`demo_tune`: what ``mlcycle demo`` runs.

Ray and torch are imported only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = [
    "SCHEDULERS",
    "WORKLOADS",
    "HyperSched",
    "OverheadEstimator",
    "ScalingModel",
    "SimCosts",
    "TrialView",
    "TuneReport",
    "admits_new_trial",
    "amdahl_speedup",
    "demo_tune",
    "make_scheduler",
    "plan_allocation",
    "plot_report",
    "resize_gain",
    "rung_milestones",
    "run_tune",
    "simulate",
    "workload_spec",
]

_LAZY = {
    "HyperSched": "mlcycle.develop.hypersched",
    "OverheadEstimator": "mlcycle.develop._estimate",
    "ScalingModel": "mlcycle.develop._estimate",
    "SimCosts": "mlcycle.develop._sim",
    "simulate": "mlcycle.develop._sim",
    "TrialView": "mlcycle.develop._policy",
    "admits_new_trial": "mlcycle.develop._policy",
    "amdahl_speedup": "mlcycle.develop._policy",
    "plan_allocation": "mlcycle.develop._policy",
    "resize_gain": "mlcycle.develop._policy",
    "rung_milestones": "mlcycle.develop._policy",
    "SCHEDULERS": "mlcycle.develop._runner",
    "TuneReport": "mlcycle.develop._runner",
    "make_scheduler": "mlcycle.develop._runner",
    "plot_report": "mlcycle.develop._runner",
    "run_tune": "mlcycle.develop._runner",
    "WORKLOADS": "mlcycle.develop._workloads",
    "workload_spec": "mlcycle.develop._workloads",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlcycle.develop' has no attribute {name!r}")


def demo_tune(
    deadline_s: float = 20.0,
    *,
    atoms: int | None = None,
    seed: int = 0,
    plot_path: str | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """HyperSched on the digits CNN for ``deadline_s`` seconds: what ``mlcycle demo`` runs.

    Args:
        deadline_s: wall-clock budget of the search (Ray's start-up comes on top).
        atoms: CPUs to use; None: two, or one on a one-core machine.
        seed: seeds the searched configurations.
        plot_path: where to write the accuracy-vs-time PNG; None writes none.
        console: a ``rich`` console for live progress; None is silent.

    Returns:
        ``best_config`` (the searched ``lr``, ``momentum``, ``weight_decay`` and ``seed``
        plus the workload's fixed ``width`` and ``batch_size``: everything
        :func:`mlcycle.develop._digits.build_model` and its SGD need to train the same model
        again; None when no trial reported in time), ``best_accuracy`` (validation accuracy
        at the deadline),
        ``trials_run``, ``atom_utilisation``, ``resizes``, ``deadline_s``, ``atoms``,
        ``wall_s`` and ``summary`` (one line for a table).
    """
    from mlcycle.develop._runner import run_tune
    from mlcycle.develop._workloads import workload_spec

    atoms = atoms if atoms is not None else max(1, min(2, os.cpu_count() or 1))
    report = run_tune(
        workload="digits",
        scheduler="hypersched",
        deadline_s=deadline_s,
        atoms=atoms,
        seed=seed,
        plot_path=plot_path,
        console=console,
    )
    if report.best_accuracy is None:
        summary = f"no trial reported within {deadline_s:g} s on {atoms} atoms"
    else:
        lr = report.best_config.get("lr") if report.best_config else None
        summary = (
            f"digits CNN, {report.trials_run} trials in {deadline_s:g} s on {atoms} atoms: "
            f"best validation accuracy {report.best_accuracy:.3f} "
            f"(lr {lr:.3g}, {report.best_iterations} epochs, {report.resizes} resizes)"
        )
    best_config = None
    if report.best_config is not None:
        best_config = {**workload_spec("digits").constants, **report.best_config}
    return {
        "best_config": best_config,
        "best_accuracy": report.best_accuracy,
        "best_iterations": report.best_iterations,
        "trials_run": report.trials_run,
        "atom_utilisation": report.atom_utilisation,
        "resizes": report.resizes,
        "deadline_s": deadline_s,
        "atoms": atoms,
        "wall_s": report.wall_s,
        "plot": report.plot,
        "summary": summary,
    }
