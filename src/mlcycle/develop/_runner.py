"""Run one Tune experiment on a deadline and report it: `mlcycle tune`, the demo, the benchmark.

:func:`run_tune` starts a local Ray instance with ``atoms`` CPUs (logical ones may exceed the
machine's cores for the synthetic workload), or joins a cluster by address; runs one
scheduler (HyperSched, ASHA, or ResourceChangingScheduler around ASHA) on one workload with a
seeded searcher; stops every trial at the deadline; and always shuts down the Ray it started.

The deadline is wall-clock time from just before the ``Tuner`` is built: that instant starts
HyperSched's clock and the stopper that ends the experiment for every scheduler. The report
counts only results that arrived by the deadline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlcycle.develop._workloads import WORKLOADS, WorkloadSpec, workload_spec

__all__ = [
    "SCHEDULERS",
    "TuneReport",
    "build_report",
    "make_scheduler",
    "plot_report",
    "ray_session",
    "run_tune",
]

SCHEDULERS = ("hypersched", "asha", "rcs")


@dataclass
class TuneReport:
    """What one experiment achieved by its deadline.

    Attributes:
        scheduler, workload, deadline_s, atoms, seed: what ran.
        best_trial: the trial with the highest accuracy at the deadline (its last result).
        best_accuracy: that accuracy; None when no trial reported.
        best_config: its searched hyperparameters.
        best_iterations: iterations it completed.
        trials_run: trials that reported at least once by the deadline.
        atom_utilisation: atom-seconds spent inside training iterations by the deadline over
            ``atoms * deadline_s`` (start-up, checkpoints and idle atoms count as unused).
        resizes: changes of a trial's atom count between two of its results.
        results_after_deadline: results that arrived after the deadline (not counted).
        last_result_s: when the last counted result arrived, seconds from the start.
        wall_s: seconds from building the ``Tuner`` to the end of ``fit``, teardown included.
        curves: per trial, ``(t_s, iteration, accuracy, atoms)`` for each counted result.
        configs: per trial, its searched hyperparameters.
        scheduler_summary: HyperSched's decision counts and estimates (empty for peers).
        plot: path of the PNG, when one was written.
    """

    scheduler: str
    workload: str
    deadline_s: float
    atoms: int
    seed: int
    best_trial: str | None
    best_accuracy: float | None
    best_config: dict[str, Any] | None
    best_iterations: int
    trials_run: int
    atom_utilisation: float
    resizes: int
    results_after_deadline: int
    last_result_s: float
    wall_s: float
    curves: dict[str, list[tuple[float, int, float, int]]] = field(repr=False)
    configs: dict[str, dict[str, Any]] = field(repr=False)
    scheduler_summary: dict[str, Any] = field(default_factory=dict)
    plot: str | None = None

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; per-trial curves only when ``curves`` is True."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("curves", "configs")}
        if curves:
            out["curves"] = self.curves
            out["configs"] = self.configs
        return out


def make_scheduler(
    name: str,
    spec: WorkloadSpec,
    *,
    deadline_s: float,
    atoms: int,
    start_time: float | None = None,
    clock: Any = None,
    **hypersched_options: Any,
) -> Any:
    """The named scheduler, configured alike for every peer (same ladder, metric and mode).

    - ``hypersched``: :class:`mlcycle.develop.hypersched.HyperSched`;
    - ``asha``: Ray Tune's ``ASHAScheduler`` (stops losers; stops trials at ``max_t``);
    - ``rcs``: Ray Tune's ``ResourceChangingScheduler`` around that ASHA, with its default
      ``DistributeResources`` (free CPUs spread evenly over live trials; no deadline).

    ``hypersched_options`` override HyperSched's arguments (e.g. ``admission_atoms=8``).
    """
    from ray.tune.schedulers import ASHAScheduler, ResourceChangingScheduler

    if name not in SCHEDULERS:
        raise ValueError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} "
            "(rcs = Ray Tune's ResourceChangingScheduler wrapped around ASHA)."
        )
    if name == "hypersched":
        from mlcycle.develop.hypersched import HyperSched

        kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
        kwargs.update(hypersched_options)
        return HyperSched(
            deadline_s=deadline_s,
            atoms=atoms,
            metric=spec.metric,
            mode="max",
            max_t=spec.max_t,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
            scaling=spec.scaling,
            prior_serial_fraction=spec.prior_serial_fraction,
            **{"resize_overhead_s": spec.resize_overhead_s, "start_time": start_time, **kwargs},
        )
    asha = ASHAScheduler(
        time_attr="training_iteration",
        metric=spec.metric,
        mode="max",
        max_t=spec.max_t,
        grace_period=spec.grace_period,
        reduction_factor=spec.reduction_factor,
    )
    if name == "asha":
        return asha
    return ResourceChangingScheduler(base_scheduler=asha)


def _validate(scheduler: str, workload: str, deadline_s: float, atoms: int) -> None:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}.")
    if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s) and deadline_s > 0):
        raise ValueError(f"deadline must be a positive number of seconds, got {deadline_s!r}.")
    if not isinstance(atoms, int) or atoms < 1:
        raise ValueError(f"atoms must be an int >= 1, got {atoms!r}; e.g. --atoms 2.")


@contextlib.contextmanager
def ray_session(atoms: int, address: str | None = None) -> Iterator[None]:
    """A Ray instance for the block: joined at ``address``, or a local one with ``atoms``
    logical CPUs, no dashboard and quiet workers; shut down on exit (only if started here)."""
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:  # "local": a fresh instance, never another driver's cluster on this machine
        ray.init(address="local", num_cpus=atoms, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_tune(
    *,
    workload: str = "synthetic",
    scheduler: str = "hypersched",
    deadline_s: float = 60.0,
    atoms: int = 8,
    seed: int = 0,
    address: str | None = None,
    console: Any = None,
    plot_path: str | Path | None = None,
    storage_path: str | Path | None = None,
    **workload_options: Any,
) -> TuneReport:
    """Run ``scheduler`` on ``workload`` for ``deadline_s`` seconds on ``atoms`` atoms.

    Args:
        workload: "synthetic" (known curves, simulated work) or "digits" (a real CNN).
        scheduler: "hypersched", "asha" or "rcs".
        deadline_s: wall-clock seconds from building the ``Tuner`` to the deadline.
        atoms: CPUs in the pool (local Ray gets exactly this many logical CPUs).
        seed: seeds the searcher (and so every trial's configuration).
        address: a Ray cluster address; None starts a local instance.
        console: a ``rich.console.Console`` for live progress; None is silent.
        plot_path: where to write the accuracy-vs-time PNG; None writes none.
        storage_path: Tune's storage folder; None uses a temporary one, removed after.
        **workload_options: overrides of the workload (``max_t``, ``iter_s``, ...).

    Returns:
        The :class:`TuneReport`.

    Raises:
        ValueError: an unknown scheduler or workload, a bad deadline, or more atoms than the
            cluster has CPUs.
    """
    _validate(scheduler, workload, deadline_s, atoms)
    spec = workload_spec(workload, **workload_options)
    import ray

    with ray_session(atoms, address):
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < atoms:
            raise ValueError(
                f"the Ray cluster has {cpus:g} CPUs but atoms={atoms}; pass --atoms <= {cpus:g} "
                "or give the cluster more CPUs."
            )
        tmp = None
        if storage_path is None:
            tmp = tempfile.mkdtemp(prefix="mlcycle-tune-")
            storage_path = tmp
        try:
            report = _fit(spec, scheduler, deadline_s, atoms, seed, console, str(storage_path))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    if plot_path is not None:
        report.plot = str(plot_report(report, plot_path))
    return report


def _fit(
    spec: WorkloadSpec,
    scheduler_name: str,
    deadline_s: float,
    atoms: int,
    seed: int,
    console: Any,
    storage_path: str,
) -> TuneReport:
    import importlib

    from ray import tune
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    from mlcycle.develop._searcher import DeadlineStopper, GatedSearcher

    module_name, class_name = spec.trainable.split(":")
    trainable_cls = getattr(importlib.import_module(module_name), class_name)

    t0 = time.time()
    sched = make_scheduler(scheduler_name, spec, deadline_s=deadline_s, atoms=atoms, start_time=t0)
    gate = closed = None
    if scheduler_name == "hypersched":
        gate, closed = sched.admits_new_trial, sched.admission_closed
    searcher = GatedSearcher(
        spec.sample, seed=seed, gate=gate, closed=closed, constants=spec.constants
    )
    recorder_cls = type("Recorder", (_RecorderMixin, tune.Callback), {})
    recorder = recorder_cls(t0, deadline_s, atoms, scheduler_name, spec, console)
    tuner = tune.Tuner(
        tune.with_resources(trainable_cls, PlacementGroupFactory([{"CPU": 1}])),
        tune_config=tune.TuneConfig(  # metric and mode live in the scheduler
            search_alg=searcher,
            scheduler=sched,
            num_samples=100_000,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=f"{scheduler_name}-{spec.name}-{seed}",
            storage_path=storage_path,
            stop=DeadlineStopper(t0 + deadline_s),
            verbose=0,
            callbacks=[recorder],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    quiet = {"ray.tune": logging.ERROR, "ray.train": logging.ERROR, "ray": logging.ERROR}
    old_levels = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        with (
            _env(
                TUNE_MAX_PENDING_TRIALS_PG=str(atoms),
                TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1",
                RAY_AIR_NEW_OUTPUT="0",
                TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="100000",
            ),
            recorder.live(),
        ):
            tuner.fit()
    finally:
        for name, level in old_levels.items():
            logging.getLogger(name).setLevel(level)
    wall_s = time.time() - t0
    summary = sched.summary() if hasattr(sched, "summary") else {}
    return recorder.report(seed=seed, wall_s=wall_s, scheduler_summary=summary)


class _RecorderMixin:
    """Records every result and shows live progress; mixed into a ``tune.Callback`` in
    :func:`_fit` (so that importing this module does not import Ray)."""

    def __init__(
        self,
        t0: float,
        deadline_s: float,
        atoms: int,
        scheduler: str,
        spec: WorkloadSpec,
        console: Any,
    ) -> None:
        self.t0 = t0
        self.deadline_s = deadline_s
        self.atoms = atoms
        self.scheduler = scheduler
        self.spec = spec
        self.console = console
        self.curves: dict[str, list[tuple[float, int, float, int]]] = {}
        self.iter_atom_s: dict[str, float] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.late = 0
        self._progress: Any = None
        self._task: Any = None
        self._last_draw = 0.0

    def __getstate__(self) -> dict[str, Any]:  # Tune may pickle its callbacks
        return {k: v for k, v in self.__dict__.items() if k not in ("_progress", "console")}

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        if self.console is None:
            yield
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.fields[name]}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        with self._progress:
            self._task = self._progress.add_task(
                "starting Ray Tune ...", total=self.deadline_s, name=self.scheduler
            )
            yield
            self._draw([], final=True)
        self._progress = None

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        t_s = time.time() - self.t0
        if t_s > self.deadline_s:
            self.late += 1
            return
        atoms = int(result.get("atoms", 1))
        point = (t_s, int(result["training_iteration"]), float(result[self.spec.metric]), atoms)
        self.curves.setdefault(trial.trial_id, []).append(point)
        busy = float(result.get("time_this_iter_s", 0.0)) * atoms
        self.iter_atom_s[trial.trial_id] = self.iter_atom_s.get(trial.trial_id, 0.0) + busy
        if trial.trial_id not in self.configs:
            keys = set(self.spec.constants)
            self.configs[trial.trial_id] = {k: v for k, v in trial.config.items() if k not in keys}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._progress is not None and time.time() - self._last_draw > 0.25:
            self._draw(trials)

    def _draw(self, trials: list, final: bool = False) -> None:
        self._last_draw = time.time()
        counts: dict[str, int] = {}
        used = 0
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
            if trial.status == "RUNNING":
                used += int(trial.placement_group_factory.required_resources.get("CPU", 0))
        best = self._best()
        best_txt = f"best {best[1]:.4f}" if best else "best -"
        text = (
            f"{counts.get('RUNNING', 0)} running, {counts.get('PAUSED', 0)} paused, "
            f"{counts.get('TERMINATED', 0)} done | atoms {used}/{self.atoms} | {best_txt}"
        )
        if final:
            text = f"{len(self.curves)} trials | {best_txt}"
        elapsed = min(self.deadline_s, time.time() - self.t0)
        self._progress.update(self._task, completed=elapsed, description=text)

    def _best(self) -> tuple[str, float] | None:
        finals = {tid: pts[-1][2] for tid, pts in self.curves.items() if pts}
        if not finals:
            return None
        tid = max(finals, key=lambda k: (finals[k], k))
        return tid, finals[tid]

    def report(self, *, seed: int, wall_s: float, scheduler_summary: dict) -> TuneReport:
        return build_report(
            scheduler=self.scheduler,
            workload=self.spec.name,
            deadline_s=self.deadline_s,
            atoms=self.atoms,
            seed=seed,
            curves=self.curves,
            configs=self.configs,
            busy_atom_s=sum(self.iter_atom_s.values()),
            results_after_deadline=self.late,
            wall_s=wall_s,
            scheduler_summary=scheduler_summary,
        )


def build_report(
    *,
    scheduler: str,
    workload: str,
    deadline_s: float,
    atoms: int,
    seed: int,
    curves: dict[str, list[tuple[float, int, float, int]]],
    configs: dict[str, dict[str, Any]],
    busy_atom_s: float,
    results_after_deadline: int,
    wall_s: float,
    scheduler_summary: dict[str, Any],
) -> TuneReport:
    """A :class:`TuneReport` from the results counted by the deadline (real or simulated)."""
    finals = {tid: pts[-1][2] for tid, pts in curves.items() if pts}
    best = max(finals, key=lambda k: (finals[k], k)) if finals else None
    resizes = sum(
        sum(1 for a, b in zip(pts, pts[1:], strict=False) if a[3] != b[3])
        for pts in curves.values()
    )
    return TuneReport(
        scheduler=scheduler,
        workload=workload,
        deadline_s=deadline_s,
        atoms=atoms,
        seed=seed,
        best_trial=best,
        best_accuracy=finals[best] if best else None,
        best_config=configs.get(best) if best else None,
        best_iterations=curves[best][-1][1] if best else 0,
        trials_run=len(finals),
        atom_utilisation=busy_atom_s / (atoms * deadline_s),
        resizes=resizes,
        results_after_deadline=results_after_deadline,
        last_result_s=max((pts[-1][0] for pts in curves.values() if pts), default=0.0),
        wall_s=wall_s,
        curves=curves,
        configs=configs,
        scheduler_summary=scheduler_summary,
    )


def plot_report(report: TuneReport, path: str | Path) -> Path:
    """Accuracy against time for every trial; resizes marked with the new atom count, and
    pauses and restarts drawn dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 5))
    cmap = plt.get_cmap("tab20")
    for i, (tid, pts) in enumerate(sorted(report.curves.items())):
        if not pts:
            continue
        best = tid == report.best_trial
        color = "black" if best else cmap(i % 20)
        style = {"color": color, "lw": 2.2 if best else 0.9, "alpha": 1.0 if best else 0.7}
        gaps = [b[0] - a[0] for a, b in zip(pts, pts[1:], strict=False)]
        typical = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
        segment = [pts[0]]
        for a, b, gap in zip(pts, pts[1:], gaps, strict=False):
            if gap > max(3 * typical, 2.0):  # paused or restarting: a dotted bridge
                ax.plot([a[0], b[0]], [a[2], b[2]], ls=":", **{**style, "lw": 0.8})
                ax.plot([p[0] for p in segment], [p[2] for p in segment], **style)
                segment = []
            segment.append(b)
        ax.plot(
            [p[0] for p in segment],
            [p[2] for p in segment],
            marker="o" if len(pts) == 1 else None,
            ms=3,
            label=f"best: {tid}" if best else None,
            **style,
        )
        for a, b in zip(pts, pts[1:], strict=False):
            if a[3] != b[3]:
                ax.scatter([b[0]], [b[2]], marker="^", s=50, color="crimson", zorder=5)
                ax.annotate(f"{b[3]}", (b[0], b[2]), textcoords="offset points", xytext=(3, 4))
    ax.axvline(report.deadline_s, color="gray", ls="--", lw=1)
    ax.text(
        report.deadline_s,
        0.98,
        "deadline ",
        color="gray",
        ha="right",
        va="top",
        transform=ax.get_xaxis_transform(),
    )
    ax.scatter([], [], marker="^", color="crimson", label="resize (new atom count)")
    ax.plot([], [], ls=":", color="gray", label="paused or restarting")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("validation accuracy" if report.workload == "digits" else "accuracy")
    best = "-" if report.best_accuracy is None else f"{report.best_accuracy:.4f}"
    ax.set_title(
        f"{report.scheduler} on {report.workload}: {report.atoms} atoms, "
        f"deadline {report.deadline_s:g} s, {report.trials_run} trials, best {best}"
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
