"""A virtual-time stand-in for Tune's controller: the same scheduler objects, no Ray runtime.

:func:`simulate` drives a scheduler (HyperSched, Ray Tune's ASHAScheduler or its
ResourceChangingScheduler, unmodified) through the synthetic workload in simulated seconds.
It mimics the slice of ``TuneController`` that schedulers use (``get_trials``,
``get_live_trials``, ``_resource_updater``) and its loop: each step it starts the trial the
scheduler chooses, then pending trials in order, then asks the searcher for new trials while
fewer than ``max_pending`` are pending; each result goes to ``on_trial_result`` and the
decision is carried out (CONTINUE: next iteration; PAUSE: checkpoint, then free the atoms;
STOP: free them). A trial holds its atoms from its start to its pause or stop, and a start
only happens when the atoms are free, as Ray's placement groups enforce.

Costs are explicit: every (re)start takes ``start_s`` before the first iteration (actor
start, workers, restore), a pause ``save_s`` before its atoms are free, and every duration is
multiplied by a seeded log-normal jitter. Nothing is measured here: the simulator answers
"what would each policy do at paper scale (hour-long deadlines, second-scale overheads)" in
seconds, and drives the property tests. Real runs are :func:`mlcycle.develop.run_tune`.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

from mlcycle.develop._runner import TuneReport, build_report, make_scheduler
from mlcycle.develop._workloads import (
    WorkloadSpec,
    synthetic_accuracy,
    synthetic_iter_s,
    workload_spec,
)

__all__ = ["SimCosts", "simulate"]

PENDING, RUNNING, PAUSED, TERMINATED, ERROR = "PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR"


@dataclass(frozen=True)
class SimCosts:
    """Simulated costs in seconds.

    Attributes:
        start_s: from a trial's (re)start to its first iteration (actor, workers, restore).
        save_s: from a PAUSE decision to its atoms being free (checkpoint, actor stop).
        jitter: sd of the log-normal noise on every duration (0: deterministic).
    """

    start_s: float = 8.0
    save_s: float = 0.5
    jitter: float = 0.1


class _SimTrial:
    """Duck-types the parts of ``ray.tune.experiment.Trial`` schedulers read."""

    def __init__(self, trial_id: str, config: dict[str, Any], pgf: Any) -> None:
        self.trial_id = trial_id
        self.config = config
        self.status = PENDING
        self.placement_group_factory = pgf
        self.last_result: dict[str, Any] = {}
        self.iteration = 0
        self.atoms = 0  # atoms held while RUNNING
        self.epoch = 0  # invalidates events scheduled before a pause or stop
        self.iter_s = 0.0  # duration of the iteration in flight

    def update_resources(self, resources: Any) -> None:
        from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

        if self.status == RUNNING:
            raise ValueError("Cannot update resources while Trial is running.")
        if isinstance(resources, dict):
            resources = resource_dict_to_pg_factory(resources)
        self.placement_group_factory = resources

    def __repr__(self) -> str:
        return f"SimTrial({self.trial_id}, {self.status})"


class _ResourceUpdater:
    def __init__(self, atoms: int) -> None:
        self._atoms = atoms

    def get_num_cpus(self) -> int:
        return self._atoms

    def get_num_gpus(self) -> int:
        return 0


class _Controller:
    """The part of ``TuneController`` a scheduler may call."""

    _reuse_actors = False

    def __init__(self, trials: list[_SimTrial], atoms: int) -> None:
        self._trials = trials
        self._resource_updater = _ResourceUpdater(atoms)

    def get_trials(self) -> list[_SimTrial]:
        return list(self._trials)

    def get_live_trials(self) -> list[_SimTrial]:
        return [t for t in self._trials if t.status not in (TERMINATED, ERROR)]


def simulate(
    scheduler: str,
    *,
    deadline_s: float,
    atoms: int,
    seed: int = 0,
    costs: SimCosts | None = None,
    spec: WorkloadSpec | None = None,
    max_pending: int | None = None,
    check_invariants: bool = False,
    hypersched_options: dict[str, Any] | None = None,
) -> TuneReport:
    """Run ``scheduler`` on the synthetic workload in virtual time.

    Args:
        scheduler: "hypersched", "asha" or "rcs".
        deadline_s: simulated seconds to the deadline.
        atoms: atoms in the pool.
        seed: seeds the searcher (same configurations for every scheduler) and the jitter.
        costs: simulated overheads (:class:`SimCosts`).
        spec: the workload; the synthetic one by default (its ``iter_s`` is the one-atom
            iteration time in simulated seconds).
        max_pending: trials Tune keeps pending at once (default: ``atoms``, as ``run_tune``
            sets ``TUNE_MAX_PENDING_TRIALS_PG``).
        check_invariants: raise AssertionError when HyperSched commits more atoms than the
            pool or the simulated atoms in use exceed it (for tests).
        hypersched_options: HyperSched arguments to override (e.g. ``admission_atoms``).

    Returns:
        A :class:`~mlcycle.develop.TuneReport` (``wall_s`` is the simulated end time).
    """
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    from mlcycle.develop._searcher import GatedSearcher

    spec = spec or workload_spec("synthetic")
    if spec.name != "synthetic":
        raise ValueError(
            f"the simulator runs the synthetic workload only, got {spec.name!r}; run the "
            "digits workload on Ray with run_tune(workload='digits')."
        )
    costs = costs or SimCosts()
    if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s) and deadline_s > 0):
        raise ValueError(f"deadline_s must be a positive number, got {deadline_s!r}.")
    if not isinstance(atoms, int) or atoms < 1:
        raise ValueError(f"atoms must be an int >= 1, got {atoms!r}.")
    max_pending = atoms if max_pending is None else max_pending
    rng = random.Random(f"sim-jitter-{seed}")
    now = 0.0

    def clock() -> float:
        return now

    options = hypersched_options if scheduler == "hypersched" else None
    sched = make_scheduler(
        scheduler,
        spec,
        deadline_s=deadline_s,
        atoms=atoms,
        start_time=0.0,
        clock=clock,
        **(options or {}),
    )
    sched.set_search_properties(spec.metric, "max")
    gate = sched.admits_new_trial if scheduler == "hypersched" else None
    searcher = GatedSearcher(spec.sample, seed=seed, gate=gate, constants=spec.constants)
    trials: list[_SimTrial] = []
    controller = _Controller(trials, atoms)
    events: list[tuple[float, int, str, _SimTrial, int]] = []
    order = itertools.count()
    curves: dict[str, list[tuple[float, int, float, int]]] = {}
    configs: dict[str, dict[str, Any]] = {}
    busy_atom_s = 0.0
    held = 0

    def jittered(value: float) -> float:
        return value * math.exp(rng.gauss(0.0, costs.jitter)) if costs.jitter else value

    def push(at: float, kind: str, trial: _SimTrial) -> None:
        heapq.heappush(events, (at, next(order), kind, trial, trial.epoch))

    def atoms_of(trial: _SimTrial) -> int:
        return int(round(trial.placement_group_factory.required_resources.get("CPU", 0)))

    def try_start(trial: _SimTrial) -> bool:
        nonlocal held
        need = atoms_of(trial)
        if trial.status == RUNNING or held + need > atoms:
            return False
        trial.status = RUNNING
        trial.atoms = need
        trial.epoch += 1
        held += need
        trial.iter_s = jittered(synthetic_iter_s(trial.config, need))
        push(now + jittered(costs.start_s) + trial.iter_s, "result", trial)
        return True

    def release(trial: _SimTrial, status: str) -> None:
        nonlocal held
        if trial.status == RUNNING:
            held -= trial.atoms
        trial.atoms = 0
        trial.status = status
        trial.epoch += 1

    def check() -> None:
        if not check_invariants:
            return
        if held > atoms:
            raise AssertionError(f"{held} atoms in use > pool {atoms} at t={now:.1f}")
        committed = getattr(sched, "committed_atoms", 0)
        if committed > atoms:
            raise AssertionError(f"scheduler committed {committed} > pool {atoms} at t={now:.1f}")

    def step() -> None:
        for _ in range(len(trials) + 1):  # the scheduler's choice (Tune: once per step)
            chosen = sched.choose_trial_to_run(controller)
            if chosen is None or chosen.status == RUNNING:
                break
            chosen.status = PENDING
            if not try_start(chosen):
                break
            check()
        for trial in trials:  # every pending trial, in order
            if trial.status == PENDING:
                try_start(trial)
        while sum(t.status == PENDING for t in trials) < max_pending:
            trial_id = f"{len(trials):05d}"
            config = searcher.suggest(trial_id)
            if config is None:
                break
            trial = _SimTrial(trial_id, config, PlacementGroupFactory([{"CPU": 1}]))
            trials.append(trial)
            sched.on_trial_add(controller, trial)
            configs[trial_id] = {k: v for k, v in config.items() if k not in spec.constants}
            try_start(trial)
            check()

    step()
    while events:
        at, _, kind, trial, epoch = heapq.heappop(events)
        if at > deadline_s:
            break
        now = at
        if epoch != trial.epoch:
            continue  # the trial was paused or stopped since this was scheduled
        if kind == "paused":
            release(trial, PAUSED)
        elif kind == "result":
            busy_atom_s += trial.iter_s * trial.atoms
            trial.iteration += 1
            result = {
                "training_iteration": trial.iteration,
                spec.metric: synthetic_accuracy(trial.config, trial.iteration),
                "time_this_iter_s": trial.iter_s,
                "atoms": trial.atoms,
            }
            trial.last_result = result
            curves.setdefault(trial.trial_id, []).append(
                (now, trial.iteration, result[spec.metric], trial.atoms)
            )
            decision = sched.on_trial_result(controller, trial, result)
            if decision == "PAUSE":
                trial.epoch += 1
                push(now + jittered(costs.save_s), "paused", trial)
            elif decision == "STOP":
                release(trial, TERMINATED)
            else:
                trial.iter_s = jittered(synthetic_iter_s(trial.config, trial.atoms))
                push(now + trial.iter_s, "result", trial)
        step()
        check()
    summary = sched.summary() if hasattr(sched, "summary") else {}
    return build_report(
        scheduler=scheduler,
        workload="synthetic (simulated time)",
        deadline_s=float(deadline_s),
        atoms=atoms,
        seed=seed,
        curves=curves,
        configs=configs,
        busy_atom_s=busy_atom_s,
        results_after_deadline=0,
        wall_s=min(now, float(deadline_s)),
        scheduler_summary=summary,
    )
