"""HyperSched's decisions as pure functions over plain data (no Ray, no clock, no torch).

HyperSched (Liaw et al., "HyperSched: Dynamic Resource Reallocation for Model Development on a
Deadline", SoCC 2019) maximises the accuracy of the best trial at a global deadline on a fixed
pool of resource *atoms* (CPUs or GPUs). Its policy has three parts, each a function here:

- **Pause and promote** (Sec. 4.1, after ASHA, Li et al. 2018): trials are compared at rungs
  ``grace * eta**k``; a trial in the top ``1/eta`` of the highest rung it reached may go on,
  the others are *paused*, not killed, so that a later, fuller rung can promote them again.
  The rule is reapplied retrospectively: every decision looks at the rungs as they are now,
  not as they were when the trial passed them (:func:`in_top_fraction`, :func:`promotable`).
- **Admission control** (Sec. 4.2): a new trial is admitted only while the remaining time can
  take it to the top rung, even with the most atoms it could get (:func:`admits_new_trial`).
- **Reallocation** (Sec. 4.3): atoms freed by paused and finished trials go to the best trials.
  More atoms make a trial faster by the scaling curve ``speedup(atoms)``; a resize costs a
  checkpoint, a restart and a restore (``overhead_s``). A trial is resized only when the
  iterations it gains by the deadline beat what the overhead costs it
  (:func:`resize_gain`, :func:`plan_allocation`).

Units: time in seconds (``*_s``), progress in *iterations* (the trainable's reporting unit,
e.g. one epoch), resources in whole atoms. Scores are "higher is better"; the scheduler flips
the sign of a metric to be minimised before calling in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Speedup = Callable[[int], float]
"""Throughput with ``n`` atoms relative to one atom: ``speedup(1) == 1``."""

__all__ = [
    "Speedup",
    "TrialView",
    "admits_new_trial",
    "amdahl_speedup",
    "highest_rung",
    "in_top_fraction",
    "iterations_by_deadline",
    "keep_count",
    "plan_allocation",
    "promotable",
    "resize_gain",
    "rung_milestones",
    "speedup_from_table",
]


def _check_positive(name: str, value: float, hint: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}; {hint}")


def rung_milestones(grace_t: int, max_t: int, eta: float) -> tuple[int, ...]:
    """The iterations at which trials are compared: ``grace_t * eta**k``, capped by ``max_t``.

    The top rung is always ``max_t`` (a trial there has finished). ASHA (Li et al. 2018,
    Sec. 3) and HyperSched (Sec. 4.1) use the same geometric ladder.

    Args:
        grace_t: iterations before the first comparison (>= 1).
        max_t: iterations of a complete trial (>= grace_t).
        eta: reduction factor (> 1); about ``1/eta`` of a rung goes on to the next.

    Returns:
        Increasing milestones, e.g. ``(1, 3, 9, 27, 81)`` for ``(1, 81, 3)``.
    """
    if not isinstance(grace_t, int) or grace_t < 1:
        raise ValueError(f"grace_t must be an int >= 1, got {grace_t!r}; try grace_t=1.")
    if not isinstance(max_t, int) or max_t < grace_t:
        raise ValueError(
            f"max_t must be an int >= grace_t ({grace_t}), got {max_t!r}; "
            "set max_t to the iterations of a complete trial."
        )
    if not (isinstance(eta, (int, float)) and eta > 1):
        raise ValueError(f"eta must be > 1, got {eta!r}; ASHA's usual values are 3 or 4.")
    milestones: list[int] = []
    rung = float(grace_t)
    while rung < max_t:
        value = int(round(rung))
        if not milestones or value > milestones[-1]:
            milestones.append(value)
        rung *= eta
    if not milestones or milestones[-1] != max_t:
        milestones.append(max_t)
    return tuple(milestones)


def highest_rung(milestones: Sequence[int], iteration: int) -> int:
    """Index of the highest milestone ``<= iteration``, or -1 before the first one."""
    index = -1
    for k, milestone in enumerate(milestones):
        if iteration >= milestone:
            index = k
        else:
            break
    return index


def keep_count(n_recorded: int, eta: float) -> int:
    """How many of ``n_recorded`` trials at a rung may go on: ``ceil(n / eta)``, at least one.

    ASHA's promotion rule keeps the top ``floor(n / eta)``; rounding up lets the first trial
    at a rung go on instead of stalling the search while the rung fills. The rule is
    reapplied as the rung grows (retrospectively), so early leniency is corrected later.
    """
    if n_recorded <= 0:
        return 0
    return max(1, math.ceil(n_recorded / eta))


def in_top_fraction(score: float, rung_scores: Sequence[float], eta: float) -> bool:
    """Whether ``score`` is among the top :func:`keep_count` of ``rung_scores``.

    ``rung_scores`` holds every score recorded at the rung, the trial's own included. Ties
    are kept (a trial is out only when ``keep_count`` others are strictly better).
    """
    better = sum(1 for s in rung_scores if s > score)
    return better < keep_count(len(rung_scores), eta)


def promotable(
    paused: Mapping[str, tuple[int, float]],
    rungs: Sequence[Mapping[str, float]],
    eta: float,
) -> list[str]:
    """Paused trials that the current rungs would let go on, best first.

    Args:
        paused: ``trial_id -> (highest rung index reached, score recorded there)``; trials
            below the first rung (index -1) are never promotable here.
        rungs: per rung, ``trial_id -> score`` of every trial recorded there.
        eta: reduction factor.

    Returns:
        Trial ids ordered by rung (higher first), then score (higher first).
    """
    out: list[tuple[int, float, str]] = []
    for trial_id, (rung, score) in paused.items():
        if rung < 0 or rung >= len(rungs):
            continue
        if in_top_fraction(score, list(rungs[rung].values()), eta):
            out.append((rung, score, trial_id))
    out.sort(key=lambda x: (-x[0], -x[1], x[2]))
    return [trial_id for _, _, trial_id in out]


def amdahl_speedup(serial_fraction: float) -> Speedup:
    """``speedup(n) = n / (1 + serial_fraction * (n - 1))`` (Amdahl's law).

    ``serial_fraction`` 0 is linear scaling; 1 is no gain from more atoms; above 1 more atoms
    are slower (communication dominates).
    """
    if not (math.isfinite(serial_fraction) and serial_fraction >= 0):
        raise ValueError(
            f"serial_fraction must be finite and >= 0, got {serial_fraction!r}; "
            "0.1 means 90% of an iteration parallelises."
        )

    def speedup(n: int) -> float:
        return n / (1.0 + serial_fraction * (n - 1)) if n >= 1 else 0.0

    return speedup


def speedup_from_table(table: Mapping[int, float]) -> Speedup:
    """A speedup curve from measured points ``{atoms: speedup}``, linear in between.

    ``table`` must hold atoms >= 1 with positive speedups; ``1: 1.0`` is added when missing.
    Beyond the largest measured count the last value is kept (no extrapolated gain).
    """
    points = {1: 1.0, **{int(k): float(v) for k, v in table.items()}}
    for n, s in points.items():
        if n < 1 or not (math.isfinite(s) and s > 0):
            raise ValueError(
                f"scaling table entries must be atoms >= 1 -> speedup > 0, got {n}: {s}; "
                "e.g. {1: 1.0, 2: 1.8, 4: 3.1}."
            )
    xs = sorted(points)

    def speedup(n: int) -> float:
        if n < 1:
            return 0.0
        if n >= xs[-1]:
            return points[xs[-1]]
        for lo, hi in zip(xs, xs[1:], strict=False):
            if lo <= n <= hi:
                w = (n - lo) / (hi - lo)
                return points[lo] * (1 - w) + points[hi] * w
        return points[xs[0]]

    return speedup


@dataclass(frozen=True)
class TrialView:
    """What the allocator needs to know about one trial.

    Attributes:
        trial_id: the trial's id.
        score: latest score, higher is better.
        iteration: iterations done.
        atoms: atoms held now; 0 while paused or not started.
        iter_s_one_atom: seconds per iteration on one atom (measured, or a prior).
    """

    trial_id: str
    score: float
    iteration: int
    atoms: int
    iter_s_one_atom: float


def iterations_by_deadline(
    remaining_s: float,
    iter_s_one_atom: float,
    atoms: int,
    speedup: Speedup,
    overhead_s: float,
    iterations_left: int,
) -> int:
    """Whole iterations a trial completes before the deadline on ``atoms`` atoms.

    The trial first spends ``overhead_s`` (0 when it keeps running as it is; a restart,
    checkpoint restore and worker start-up otherwise), then runs at
    ``speedup(atoms) / iter_s_one_atom`` iterations per second. An iteration cut by the
    deadline does not count, and no trial goes past ``iterations_left``.
    """
    if atoms <= 0 or iterations_left <= 0:
        return 0
    run_s = remaining_s - overhead_s
    if run_s <= 0 or iter_s_one_atom <= 0:
        return 0
    rate = speedup(atoms) / iter_s_one_atom
    return int(min(iterations_left, math.floor(run_s * rate + 1e-9)))


def resize_gain(
    trial: TrialView,
    new_atoms: int,
    *,
    remaining_s: float,
    speedup: Speedup,
    overhead_s: float,
    max_t: int,
) -> int:
    """Iterations by the deadline with ``new_atoms`` (after paying ``overhead_s``) minus
    iterations by the deadline if the trial keeps its atoms and runs on (Sec. 4.3).

    A paused trial (``atoms == 0``) keeps nothing, so its gain is what it would complete
    after a restart. The gain is negative when the overhead costs more than the speedup
    brings; HyperSched resizes only on a positive gain (at least ``min_gain_iters``).
    """
    left = max_t - trial.iteration
    stay = iterations_by_deadline(
        remaining_s, trial.iter_s_one_atom, trial.atoms, speedup, 0.0, left
    )
    move = iterations_by_deadline(
        remaining_s, trial.iter_s_one_atom, new_atoms, speedup, overhead_s, left
    )
    return move - stay


def admits_new_trial(
    remaining_s: float,
    *,
    max_t: int,
    iter_s_one_atom: float | None,
    speedup: float,
    start_overhead_s: float,
) -> bool:
    """Admission control (Sec. 4.2): can a trial started now still reach the top rung?

    A new trial needs ``start_overhead_s + max_t * iter_s_one_atom / speedup`` seconds, where
    ``speedup`` is that of the atoms it is assumed to run on (HyperSched's
    ``admission_atoms``: by default the atoms it starts with). When that does not fit in
    ``remaining_s`` the trial cannot reach the top rung by the deadline, and its atoms are
    better spent on the trials that can.

    Args:
        remaining_s: seconds to the deadline.
        max_t: iterations to the top rung.
        iter_s_one_atom: seconds per iteration on one atom; None before any measurement
            (then only ``start_overhead_s`` is required).
        speedup: the speedup of the atoms the new trial is assumed to run on.
        start_overhead_s: seconds from admission to the first iteration (actor start).
    """
    if remaining_s <= start_overhead_s:
        return False
    if iter_s_one_atom is None:
        return True
    need_s = start_overhead_s + max_t * iter_s_one_atom / max(speedup, 1e-9)
    return remaining_s >= need_s


def plan_allocation(
    trials: Sequence[TrialView],
    *,
    pool_atoms: int,
    remaining_s: float,
    speedup: Speedup,
    overhead_s: float,
    max_t: int,
    max_atoms_per_trial: int | None = None,
    min_gain_iters: int = 1,
) -> dict[str, int]:
    """Target atoms per trial for the exploitation phase (Sec. 4.3), best trial first.

    Trials are served in order of score. Each takes the atom count that completes the most
    iterations by the deadline (the fewest atoms among equals, so that a trial which will
    reach ``max_t`` anyway leaves the rest to the next one); it changes its current count
    only when that gains at least ``min_gain_iters`` iterations *after* paying
    ``overhead_s`` for the restart. Trials left without atoms get 0 (paused).

    Invariants: every target is in ``[0, min(pool_atoms, max_atoms_per_trial)]`` and the
    targets sum to at most ``pool_atoms``.

    Args:
        trials: running and paused trials (finished ones excluded).
        pool_atoms: atoms in the pool.
        remaining_s: seconds to the deadline.
        speedup: the scaling curve.
        overhead_s: seconds a resize or a restart costs.
        max_t: iterations to the top rung.
        max_atoms_per_trial: cap per trial; None means the pool.
        min_gain_iters: the least gain, in iterations, that justifies a change.

    Returns:
        ``trial_id -> atoms`` for every trial given.
    """
    if not isinstance(pool_atoms, int) or pool_atoms < 1:
        raise ValueError(f"pool_atoms must be an int >= 1, got {pool_atoms!r}.")
    if min_gain_iters < 1:
        raise ValueError(
            f"min_gain_iters must be >= 1, got {min_gain_iters!r}; a resize must gain at "
            "least one iteration over running on as is."
        )
    cap = pool_atoms if max_atoms_per_trial is None else min(pool_atoms, max_atoms_per_trial)
    ranked = sorted(trials, key=lambda t: (-t.score, -t.iteration, t.trial_id))
    available = pool_atoms
    plan: dict[str, int] = {}
    for trial in ranked:
        left = max_t - trial.iteration
        limit = min(available, cap)
        current = trial.atoms if 0 < trial.atoms <= limit else 0
        best_n = current
        stay = iterations_by_deadline(
            remaining_s, trial.iter_s_one_atom, current, speedup, 0.0, left
        )
        threshold = stay + min_gain_iters
        for n in range(1, limit + 1):
            if n == current:
                continue
            value = iterations_by_deadline(
                remaining_s, trial.iter_s_one_atom, n, speedup, overhead_s, left
            )
            if value >= threshold:
                best_n = n
                threshold = value + 1  # a larger n must bring a further whole iteration
        plan[trial.trial_id] = best_n
        available -= best_n
    return plan
