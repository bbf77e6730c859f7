"""HyperSched as a Ray Tune ``TrialScheduler``: the best model by the deadline, on fixed atoms.

Liaw et al., "HyperSched: Dynamic Resource Reallocation for Model Development on a Deadline",
SoCC 2019. The scheduler has two phases:

- **Exploration** (Sec. 4.1-4.2): ASHA's rungs with pause-and-promote. A trial is judged when
  it reaches a rung: in the top ``1/eta`` of the trials recorded there it goes on, otherwise it
  is *paused* (checkpointed, atoms freed), not killed. The rule is reapplied retrospectively
  to every paused trial against the rung as it is now, so a trial paused against an early,
  thin rung is promoted once the rung fills with worse trials; promotions go before new
  trials. New trials are admitted while one could still reach the top rung by the deadline
  (:func:`~mlcycle.develop._policy.admits_new_trial`).
- **Exploitation** (Sec. 4.3), once admission has closed for good: the allocation plan
  (:func:`~mlcycle.develop._policy.plan_allocation`) decides alone. Trials are ranked by
  score; each in turn gets the atoms that complete the most iterations by the deadline, and a
  trial changes its atom count only when the iterations it gains beat the restart overhead.
  A trial the plan leaves without atoms is paused (preempted); a paused one the plan gives
  atoms to resumes; a trial that should grow is paused and resumes from its checkpoint with
  more data-parallel workers once the atoms are free.

Tune's event interface: ``on_trial_result`` returns CONTINUE, PAUSE (rung loser, preempted, or
to be resized) or STOP (top rung reached, or its next iteration would end after the deadline);
``choose_trial_to_run`` resumes resized trials with their new resources first, then ASHA
promotions or the plan's picks. New trials are gated at creation by
:meth:`HyperSched.admits_new_trial`, which a searcher asks before suggesting one
(:class:`mlcycle.develop._searcher.GatedSearcher`), because Tune starts every pending trial
it holds by itself. The decisions are the pure functions of :mod:`mlcycle.develop._policy`;
this module keeps the state.

Atoms are one resource (``atom_resource``, "CPU" by default): a trial on ``n`` atoms holds one
bundle with ``n`` of it, and its trainable starts ``n`` data-parallel workers.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import TrialScheduler

from mlcycle.develop._estimate import OverheadEstimator, ScalingModel
from mlcycle.develop._policy import (
    Speedup,
    TrialView,
    admits_new_trial,
    highest_rung,
    in_top_fraction,
    plan_allocation,
    promotable,
    rung_milestones,
)

__all__ = ["HyperSched"]

_PENDING, _RUNNING, _PAUSED, _DONE = "pending", "running", "paused", "done"


@dataclass
class _TrialState:
    trial_id: str
    status: str = _PENDING
    atoms: int = 0  # atoms held or committed (pending and running); 0 when paused or done
    resize_to: int | None = None  # atoms reserved for the restart after a PAUSE-to-resize
    iteration: int = 0
    score: float = -math.inf
    rung: int = -1  # highest rung recorded
    requested_at: float | None = None  # when its (re)start was decided, until its 1st result
    last_iter_s: float | None = None
    restarts: int = 0
    history: list[tuple[float, int, float, int]] = field(default_factory=list)


class HyperSched(TrialScheduler):
    """Deadline-aware trial scheduler with pause-and-promote, admission control and
    reallocation of atoms (Liaw et al., SoCC 2019, Sec. 4; see the module docstring).

    Use it with a searcher that asks :meth:`admits_new_trial` (as ``run_tune`` does),
    ``reuse_actors=False``, and a trainable that checkpoints and reads its atom count from
    its resources (``mlcycle.develop._searcher`` has the searcher and the stopper)::

        t0 = time.time()
        sched = HyperSched(deadline_s=600, atoms=8, metric="accuracy", mode="max",
                           max_t=27, start_time=t0)
        searcher = GatedSearcher(sample, seed=0, gate=sched.admits_new_trial,
                                 closed=sched.admission_closed)
        tune.Tuner(tune.with_resources(MyTrainable, {"CPU": 1}),
                   tune_config=tune.TuneConfig(scheduler=sched, search_alg=searcher,
                                               num_samples=100_000),
                   run_config=tune.RunConfig(stop=DeadlineStopper(t0 + 600))).fit()

    Args:
        deadline_s: seconds from the start of the experiment to the deadline. The clock
            starts at ``start_time`` when given, else at the first event the scheduler sees.
        atoms: atoms in the pool (CPUs or GPUs the trials share).
        metric: the result key to optimise (or set through ``tune.TuneConfig``).
        mode: "max" or "min" (or set through ``tune.TuneConfig``).
        time_attr: the result key that counts iterations.
        max_t: iterations of a complete trial (the top rung).
        grace_period: iterations before the first rung.
        reduction_factor: ASHA's eta; about 1/eta of a rung goes on.
        base_atoms: atoms a new or promoted trial starts with.
        max_atoms_per_trial: cap per trial (None: the pool).
        admission_atoms: the atoms a new trial is assumed to run on when admission control
            asks whether it can still reach the top rung by the deadline (None:
            ``base_atoms``, the atoms it starts on). Larger values explore longer.
        backfill: after admission has closed, still admit a new trial onto atoms the
            allocation plan gives no existing trial (they would otherwise sit idle), while
            it can reach the first rung. False: strictly no new trials once closed.
        scaling: speedup curve, a function ``atoms -> speedup`` or a table ``{atoms:
            speedup}``; None measures it from the trials' iteration times.
        prior_serial_fraction: Amdahl serial fraction assumed before measurements (when
            ``scaling`` is None).
        resize_overhead_s: prior for the seconds a restart costs, replaced by measurements.
        min_gain_iters: the fewest iterations a resize must gain, net of its overhead.
        atom_resource: the Ray resource that is an atom ("CPU", "GPU" or a custom one).
        clock: seconds since the epoch (``time.time``); a simulator passes its own.
        start_time: the experiment's start on ``clock``; None: the first event.

    Raises:
        ValueError: on an invalid argument, naming the valid range.
    """

    _supports_buffered_results = False  # one decision per iteration

    def __init__(
        self,
        *,
        deadline_s: float,
        atoms: int,
        metric: str | None = None,
        mode: str | None = None,
        time_attr: str = "training_iteration",
        max_t: int = 81,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
        base_atoms: int = 1,
        max_atoms_per_trial: int | None = None,
        admission_atoms: int | None = None,
        backfill: bool = True,
        scaling: Speedup | Mapping[int, float] | None = None,
        prior_serial_fraction: float = 0.1,
        resize_overhead_s: float = 10.0,
        min_gain_iters: int = 1,
        atom_resource: str = "CPU",
        clock: Callable[[], float] = time.time,
        start_time: float | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s)):
            raise ValueError(f"deadline_s must be a finite number of seconds, got {deadline_s!r}.")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}; e.g. deadline_s=120.")
        if not isinstance(atoms, int) or atoms < 1:
            raise ValueError(f"atoms must be an int >= 1, got {atoms!r}; e.g. atoms=8.")
        if mode not in (None, "max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        if not isinstance(base_atoms, int) or not 1 <= base_atoms <= atoms:
            raise ValueError(
                f"base_atoms must be an int in [1, atoms={atoms}], got {base_atoms!r}."
            )
        cap = atoms if max_atoms_per_trial is None else max_atoms_per_trial
        if not isinstance(cap, int) or not base_atoms <= cap <= atoms:
            raise ValueError(
                f"max_atoms_per_trial must be an int in [base_atoms={base_atoms}, "
                f"atoms={atoms}] or None, got {max_atoms_per_trial!r}."
            )
        admit = base_atoms if admission_atoms is None else admission_atoms
        if not isinstance(admit, int) or not 1 <= admit <= cap:
            raise ValueError(
                f"admission_atoms must be an int in [1, max_atoms_per_trial={cap}] or None, "
                f"got {admission_atoms!r}."
            )
        if not isinstance(min_gain_iters, int) or min_gain_iters < 1:
            raise ValueError(f"min_gain_iters must be an int >= 1, got {min_gain_iters!r}.")
        self.deadline_s = float(deadline_s)
        self.atoms = atoms
        self._metric = metric
        self._mode = mode
        self._time_attr = time_attr
        self.max_t = max_t
        self.eta = float(reduction_factor)
        self.milestones = rung_milestones(grace_period, max_t, reduction_factor)
        self.base_atoms = base_atoms
        self.max_atoms_per_trial = cap
        self.admission_atoms = admit
        self.backfill = bool(backfill)
        self.scaling = ScalingModel(scaling, prior_serial_fraction=prior_serial_fraction)
        self.overhead = OverheadEstimator(resize_overhead_s)
        self.min_gain_iters = min_gain_iters
        self.atom_resource = atom_resource
        self._clock = clock
        self._start = start_time
        self._states: dict[str, _TrialState] = {}
        self._trials: dict[str, Any] = {}
        self._rungs: list[dict[str, float]] = [{} for _ in self.milestones]
        self.admission_open = True
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ Tune's interface

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if self._metric and metric and metric != self._metric:
            return False
        if self._mode and mode and mode != self._mode:
            return False
        if mode not in (None, "max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not self._metric or not self._mode:
            raise ValueError(
                "HyperSched needs a metric and a mode: pass HyperSched(metric='accuracy', "
                "mode='max', ...) or tune.TuneConfig(metric=..., mode=...)."
            )
        now = self._now()
        state = _TrialState(trial.trial_id, atoms=self._atoms_of(trial), requested_at=now)
        self._states[trial.trial_id] = state
        self._trials[trial.trial_id] = trial
        self._log(now, "admit", trial.trial_id, atoms=state.atoms)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._finish(trial.trial_id, "error")

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result and self._time_attr in result and self._metric in result:
            self._record(trial.trial_id, result)
        self._finish(trial.trial_id, "complete")

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._finish(trial.trial_id, "remove")

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """STOP at the top rung or when the next iteration would end after the deadline;
        while exploring, PAUSE a trial that reaches a rung outside its top ``1/eta``; while
        exploiting, PAUSE it when the plan preempts or resizes it; else CONTINUE."""
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        now = self._now()
        known = self._states.get(trial.trial_id)
        rung_before = known.rung if known is not None else -1
        state = self._record(trial.trial_id, result)
        self._trials[trial.trial_id] = trial
        self._update_admission(now)
        remaining_s = self.deadline_at - now
        if state.iteration >= self.max_t:
            self._finish(trial.trial_id, "complete")
            return TrialScheduler.STOP
        if state.last_iter_s is not None and remaining_s < state.last_iter_s:
            self._finish(trial.trial_id, "deadline")
            return TrialScheduler.STOP
        if self.admission_open and state.rung > rung_before:
            rung = self._rungs[state.rung]
            if not in_top_fraction(rung[trial.trial_id], list(rung.values()), self.eta):
                self._pause(state, now, "pause")
                return TrialScheduler.PAUSE
        if not self.admission_open:
            target = self._plan(now).get(trial.trial_id, state.atoms)
            if target == 0:
                self._pause(state, now, "preempt")
                return TrialScheduler.PAUSE
            if target != state.atoms and target - state.atoms <= self.free_atoms:
                old = state.atoms
                self._pause(state, now, "resize", resize_to=target)
                self._log(now, "resize", trial.trial_id, atoms=target, from_atoms=old)
                return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE

    def choose_trial_to_run(self, tune_controller: Any) -> Any | None:
        """Resized trials first, then promotions (exploring) or the plan's picks (exploiting).

        New trials are not started here: Tune starts every pending trial itself, so they
        are gated at creation (:meth:`admits_new_trial`).
        """
        now = self._now()
        self._update_admission(now)
        for state in self._states.values():
            if state.resize_to is not None and self._tune_status(state) == Trial.PAUSED:
                atoms, state.resize_to = state.resize_to, None
                return self._resume(state, atoms, keep_request_time=True)
        free = self.free_atoms
        if free <= 0:
            return None
        if self.admission_open:
            if free < self.base_atoms:
                return None
            for trial_id in self._promotable():
                state = self._states[trial_id]
                self._log(now, "promote", trial_id, atoms=self.base_atoms)
                return self._resume(state, self.base_atoms)
            return None
        plan = self._plan(now)
        for state in self._ranked(_PAUSED):
            target = plan.get(state.trial_id, 0)
            if 0 < target <= free and self._tune_status(state) == Trial.PAUSED:
                self._log(now, "resume", state.trial_id, atoms=target)
                return self._resume(state, target)
        return None

    def debug_string(self) -> str:
        counts: dict[str, int] = {}
        for state in self._states.values():
            counts[state.status] = counts.get(state.status, 0) + 1
        phase = "exploring" if self.admission_open else "exploiting"
        return (
            f"HyperSched ({phase}): {self.committed_atoms}/{self.atoms} atoms committed, "
            f"trials {counts}, overhead {self.overhead.estimate_s:.1f} s, "
            f"speedup({self.max_atoms_per_trial}) {self.scaling(self.max_atoms_per_trial):.2f}"
        )

    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_clock", "_trials")}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    # ------------------------------------------------------------------ admission gate

    def admits_new_trial(self) -> bool:
        """Whether a searcher may create a new trial now.

        While admission is open (:func:`~mlcycle.develop._policy.admits_new_trial`): when
        ``base_atoms`` are free and no paused trial is waiting for promotion (ASHA promotes
        before it grows the bottom rung). Once it has closed, only with ``backfill``: onto
        atoms the allocation plan gives no existing trial (they would sit idle), while a new
        trial can still reach the first rung.
        """
        now = self._now()
        self._update_admission(now)
        if self.free_atoms < self.base_atoms:
            return False
        if self.admission_open:
            return not self._promotable()
        if not self._can_backfill(now):
            return False
        plan = self._plan(now)
        wanted = sum(
            max(0, plan.get(s.trial_id, 0) - (s.atoms if s.status in (_PENDING, _RUNNING) else 0))
            for s in self._states.values()
        )
        if self.free_atoms - wanted < self.base_atoms:
            return False
        self._log(now, "backfill")
        return True

    def admission_closed(self) -> bool:
        """True once no trial will ever be admitted again: admission control has closed and
        backfill is off, or not even the first rung can be reached any more."""
        now = self._now()
        self._update_admission(now)
        return not self.admission_open and not self._can_backfill(now)

    def _can_backfill(self, now: float) -> bool:
        if not self.backfill:
            return False
        typical = self.scaling.typical_iter_s_one_atom() or 0.0
        first_rung_s = self.milestones[0] * typical / max(self.scaling(self.base_atoms), 1e-9)
        return self.deadline_at - now >= self.overhead.estimate_s + first_rung_s

    # ------------------------------------------------------------------ accounting

    @property
    def deadline_at(self) -> float:
        """The deadline on the scheduler's clock."""
        if self._start is None:
            self._start = self._clock()
        return self._start + self.deadline_s

    @property
    def committed_atoms(self) -> int:
        """Atoms held by running trials and promised to starting and resizing ones."""
        held = sum(s.atoms for s in self._states.values() if s.status in (_PENDING, _RUNNING))
        reserved = sum(s.resize_to or 0 for s in self._states.values())
        return held + reserved

    @property
    def free_atoms(self) -> int:
        """Atoms of the pool not committed (never negative while the invariant holds)."""
        return self.atoms - self.committed_atoms

    def summary(self) -> dict[str, Any]:
        """Counts of what the scheduler decided, for reports."""
        kinds: dict[str, int] = {}
        for event in self.events:
            kinds[event["kind"]] = kinds.get(event["kind"], 0) + 1
        closed = [e["t_s"] for e in self.events if e["kind"] == "admission_closed"]
        return {
            "events": kinds,
            "admission_closed_at_s": closed[0] if closed else None,
            "overhead_s": self.overhead.estimate_s,
            "overhead_observations": len(self.overhead.observations_s),
            "serial_fraction": None if not self.scaling.measured else self.scaling.serial_fraction_,
        }

    # ------------------------------------------------------------------ internals

    def _now(self) -> float:
        now = self._clock()
        if self._start is None:
            self._start = now
        return now

    def _log(self, now: float, kind: str, trial_id: str | None = None, **extra: Any) -> None:
        start = now if self._start is None else self._start
        self.events.append({"t_s": now - start, "kind": kind, "trial_id": trial_id, **extra})

    def _atoms_of(self, trial: Any) -> int:
        pgf = trial.placement_group_factory
        return int(round(pgf.required_resources.get(self.atom_resource, 0)))

    def _tune_status(self, state: _TrialState) -> str | None:
        trial = self._trials.get(state.trial_id)
        return None if trial is None else trial.status

    def _record(self, trial_id: str, result: dict) -> _TrialState:
        """Fold one result into the trial's state, the rungs and the estimators."""
        now = self._now()
        state = self._states.setdefault(trial_id, _TrialState(trial_id, status=_RUNNING))
        sign = 1.0 if self._mode == "max" else -1.0
        iteration = int(result[self._time_attr])
        score = sign * float(result[self._metric])
        iter_s = result.get("time_this_iter_s")
        iter_s = float(iter_s) if iter_s is not None else None
        if state.requested_at is not None:
            overhead_s = now - state.requested_at - (iter_s or 0.0)
            self.overhead.observe(overhead_s)
            state.requested_at = None
        if state.status == _PENDING:
            state.status = _RUNNING
        if iter_s is not None and state.atoms > 0:
            state.last_iter_s = iter_s
            self.scaling.observe(trial_id, state.atoms, iter_s)
        state.iteration = iteration
        state.score = score
        state.history.append((now, iteration, score, state.atoms))
        for k, milestone in enumerate(self.milestones):
            if iteration >= milestone and trial_id not in self._rungs[k]:
                self._rungs[k][trial_id] = score
        state.rung = highest_rung(self.milestones, iteration)
        return state

    def _pause(
        self, state: _TrialState, now: float, kind: str, resize_to: int | None = None
    ) -> None:
        state.status = _PAUSED
        state.atoms = 0
        state.resize_to = resize_to
        if resize_to is not None:
            state.requested_at = now  # save + stop + restart + restore all count as overhead
        else:
            self._log(now, kind, state.trial_id)

    def _resume(self, state: _TrialState, atoms: int, keep_request_time: bool = False) -> Any:
        trial = self._trials[state.trial_id]
        if self._atoms_of(trial) != atoms:
            trial.update_resources(self._resources(trial, atoms))
        state.status = _PENDING
        state.atoms = atoms
        state.restarts += 1
        if not keep_request_time or state.requested_at is None:
            state.requested_at = self._now()
        return trial

    def _resources(self, trial: Any, atoms: int) -> PlacementGroupFactory:
        pgf = trial.placement_group_factory
        bundle = dict(pgf.bundles[0]) if pgf.bundles else {}
        bundle[self.atom_resource] = float(atoms)
        return PlacementGroupFactory([bundle], strategy=pgf.strategy)

    def _finish(self, trial_id: str, kind: str) -> None:
        state = self._states.get(trial_id)
        if state is None or state.status == _DONE:
            return
        state.status = _DONE
        state.atoms = 0
        state.resize_to = None
        state.requested_at = None
        self._log(self._now(), kind, trial_id)

    def _update_admission(self, now: float) -> None:
        if not self.admission_open:
            return
        remaining_s = self.deadline_at - now
        if not admits_new_trial(
            remaining_s,
            max_t=self.max_t,
            iter_s_one_atom=self.scaling.typical_iter_s_one_atom(),
            speedup=self.scaling(self.admission_atoms),
            start_overhead_s=self.overhead.estimate_s,
        ):
            self.admission_open = False
            self._log(now, "admission_closed", remaining_s=remaining_s)

    def _promotable(self) -> list[str]:
        paused = {
            s.trial_id: (s.rung, self._rungs[s.rung][s.trial_id])
            for s in self._states.values()
            if s.status == _PAUSED
            and s.resize_to is None
            and s.rung >= 0
            and self._tune_status(s) == Trial.PAUSED
        }
        return promotable(paused, self._rungs, self.eta)

    def _ranked(self, status: str) -> list[_TrialState]:
        chosen = [s for s in self._states.values() if s.status == status]
        return sorted(chosen, key=lambda s: (-s.score, -s.iteration, s.trial_id))

    def _plan(self, now: float) -> dict[str, int]:
        typical = self.scaling.typical_iter_s_one_atom()
        if typical is None:
            return {}
        views = []
        for state in self._states.values():
            if state.status == _DONE or state.resize_to is not None:
                continue
            iter_s = self.scaling.iter_s_one_atom(state.trial_id) or typical
            held = state.atoms if state.status in (_PENDING, _RUNNING) else 0
            views.append(TrialView(state.trial_id, state.score, state.iteration, held, iter_s))
        reserved = sum(s.resize_to or 0 for s in self._states.values())
        pool = self.atoms - reserved
        if pool < 1 or not views:
            return {}
        return plan_allocation(
            views,
            pool_atoms=pool,
            remaining_s=self.deadline_at - now,
            speedup=self.scaling,
            overhead_s=self.overhead.pessimistic_s,
            max_t=self.max_t,
            max_atoms_per_trial=self.max_atoms_per_trial,
            min_gain_iters=self.min_gain_iters,
        )
