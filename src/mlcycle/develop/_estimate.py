"""What HyperSched learns while it runs: the scaling curve and the restart overhead.

Both are plain Python over observations the scheduler feeds in, so tests drive them directly.

- :class:`ScalingModel`: the speedup of ``n`` atoms over one. Given (a function or a table of
  measured points), it is used as is. Otherwise it is *measured*: every trial that ran at two
  atom counts contributes the ratio of its iteration times, and Amdahl's serial fraction is
  fitted to all such ratios (before the first resize the prior fraction is used).
- :class:`OverheadEstimator`: seconds from deciding to (re)start a trial to its first
  iteration, minus that iteration: actor start, worker start-up, checkpoint save and restore.
  The median of the recent observations, or the prior before any.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from mlcycle.develop._policy import Speedup, amdahl_speedup, speedup_from_table

__all__ = ["OverheadEstimator", "ScalingModel"]

_SERIAL_GRID = [i / 100 for i in range(0, 301)]  # candidate Amdahl serial fractions, 0 .. 3


class ScalingModel:
    """Speedup of ``n`` atoms over one atom: given, or fitted to measured iteration times.

    Args:
        given: a speedup function or a table ``{atoms: speedup}``; None to measure.
        prior_serial_fraction: Amdahl's serial fraction assumed until a trial has run at two
            atom counts (only when measuring).
        smoothing: weight of a new iteration time in the per-trial running average.
    """

    def __init__(
        self,
        given: Speedup | Mapping[int, float] | None = None,
        *,
        prior_serial_fraction: float = 0.1,
        smoothing: float = 0.5,
    ) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}.")
        if isinstance(given, Mapping):
            given = speedup_from_table(given)
        elif given is not None and not callable(given):
            raise TypeError(
                "scaling must be a function atoms -> speedup, a dict {atoms: speedup} or None "
                f"(to measure it), got {type(given).__name__}."
            )
        self.given = given
        self.serial_fraction_ = float(prior_serial_fraction)
        self._prior = amdahl_speedup(prior_serial_fraction)  # validates the fraction
        self._smoothing = smoothing
        self._iter_s: dict[str, dict[int, float]] = {}

    @property
    def measured(self) -> bool:
        """True when the curve is fitted to observations rather than given."""
        return self.given is None

    def speedup(self, atoms: int) -> float:
        """Throughput on ``atoms`` atoms relative to one atom."""
        if atoms < 1:
            return 0.0
        if self.given is not None:
            return float(self.given(atoms))
        return amdahl_speedup(self.serial_fraction_)(atoms)

    def __call__(self, atoms: int) -> float:
        return self.speedup(atoms)

    def observe(self, trial_id: str, atoms: int, iter_s: float) -> None:
        """Record that ``trial_id`` took ``iter_s`` seconds for one iteration on ``atoms``."""
        if atoms < 1 or not (math.isfinite(iter_s) and iter_s > 0):
            return
        per_trial = self._iter_s.setdefault(trial_id, {})
        old = per_trial.get(atoms)
        w = self._smoothing
        per_trial[atoms] = iter_s if old is None else (1 - w) * old + w * iter_s
        if self.measured and len(per_trial) >= 2:
            self._fit()

    def iter_s_one_atom(self, trial_id: str) -> float | None:
        """The trial's seconds per iteration on one atom: its own time on its most recent
        atom count, times the speedup of that count. None before its first iteration."""
        per_trial = self._iter_s.get(trial_id)
        if not per_trial:
            return None
        estimates = [s * self.speedup(n) for n, s in per_trial.items()]
        return statistics.median(estimates)

    def typical_iter_s_one_atom(self) -> float | None:
        """Median over trials of :meth:`iter_s_one_atom`; None before any observation."""
        values = [v for t in self._iter_s if (v := self.iter_s_one_atom(t)) is not None]
        return statistics.median(values) if values else None

    def _fit(self) -> None:
        pairs: list[tuple[int, int, float]] = []  # (a, b, log(t_a / t_b)) for a < b
        for per_trial in self._iter_s.values():
            counts = sorted(per_trial)
            for i, a in enumerate(counts):
                for b in counts[i + 1 :]:
                    pairs.append((a, b, math.log(per_trial[a] / per_trial[b])))
        if not pairs:
            return

        def loss(f: float) -> float:
            s = amdahl_speedup(f)
            return sum((math.log(s(b) / s(a)) - obs) ** 2 for a, b, obs in pairs)

        self.serial_fraction_ = min(_SERIAL_GRID, key=loss)


class OverheadEstimator:
    """Seconds a (re)start costs before the first iteration: median of recent observations.

    Args:
        prior_s: the estimate before any observation.
        window: how many recent observations the median covers.
    """

    def __init__(self, prior_s: float, *, window: int = 8) -> None:
        if not (math.isfinite(prior_s) and prior_s >= 0):
            raise ValueError(
                f"resize_overhead_s must be finite and >= 0, got {prior_s!r}; it is the "
                "prior for the seconds a trial restart costs (e.g. 10.0)."
            )
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}.")
        self.prior_s = float(prior_s)
        self._window = window
        self.observations_s: list[float] = []

    def observe(self, overhead_s: float) -> None:
        """Record one measured restart overhead (negative values are clipped to 0)."""
        if math.isfinite(overhead_s):
            self.observations_s.append(max(0.0, float(overhead_s)))

    @property
    def estimate_s(self) -> float:
        """The median of the recent observations (the prior before any), in seconds."""
        recent = self.observations_s[-self._window :]
        return statistics.median(recent) if recent else self.prior_s

    @property
    def pessimistic_s(self) -> float:
        """The 80th percentile of the recent observations (the prior before any): what a
        resize is charged, so that a marginal gain does not vanish in a slow restart."""
        recent = sorted(self.observations_s[-self._window :])
        if not recent:
            return self.prior_s
        return recent[min(len(recent) - 1, int(math.ceil(0.8 * len(recent))) - 1)]
