"""Tune glue: a seeded random searcher with an admission gate, and a deadline stopper
(imported only when Ray runs).

Tune starts every pending trial it holds as soon as resources allow, whatever the scheduler
says, so admission control has to act where trials are created: :class:`GatedSearcher` asks
its gate (``HyperSched.admits_new_trial``) before it suggests a configuration and returns
None ("ask again later") while the gate is shut. Every scheduler in a comparison uses this
searcher with the same seed, so they see the same configurations in the same order; for
ASHA and ResourceChangingScheduler the gate is None (always open).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

__all__ = ["DeadlineStopper", "GatedSearcher"]


class DeadlineStopper(Stopper):
    """Ends the whole experiment at ``deadline_at`` (seconds since the epoch).

    Every scheduler in a comparison gets the same instant, the one that also starts
    HyperSched's clock, so the deadline is the same wall-clock budget for all.
    """

    def __init__(self, deadline_at: float) -> None:
        self.deadline_at = deadline_at

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return time.time() >= self.deadline_at


class GatedSearcher(Searcher):
    """Random search over ``sample`` with a seed and an optional admission gate.

    Args:
        sample: draws one configuration from a ``random.Random``.
        seed: seeds the draws; the i-th suggestion is the same for every scheduler.
        gate: called before each suggestion; False postpones it. None: always suggest.
        closed: True once no trial will ever be admitted again; the searcher then reports
            FINISHED, so that Tune ends the experiment when the last trial ends instead of
            waiting for a suggestion.
        constants: merged into every configuration (workload settings).
        metric, mode: passed to ``Searcher``.
    """

    def __init__(
        self,
        sample: Callable[[random.Random], dict[str, Any]],
        *,
        seed: int,
        gate: Callable[[], bool] | None = None,
        closed: Callable[[], bool] | None = None,
        constants: dict[str, Any] | None = None,
        metric: str | None = None,
        mode: str | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self._sample = sample
        self._rng = random.Random(seed)
        self._gate = gate
        self._closed = closed
        self._constants = dict(constants or {})
        self.suggested = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._closed is not None and self._closed():
            return Searcher.FINISHED
        if self._gate is not None and not self._gate():
            return None
        self.suggested += 1
        return {**self._constants, **self._sample(self._rng)}

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        return None
