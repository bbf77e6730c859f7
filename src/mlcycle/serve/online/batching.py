"""Batch-size controllers for the per-replica batching loops (pure classes, no server needed).

Clipper (Crankshaw et al., "Clipper: A Low-Latency Online Prediction Serving System",
NSDI 2017, Sec. 4.3) batches the queries queued at a model replica and adapts the batch size
to the latency objective, because the best batch size depends on the model, the hardware and
the load. Two adaptive schemes from the paper are here, beside two fixed ones:

- :class:`AIMDBatcher`: additive increase while a full batch finishes within the target,
  multiplicative back-off (10% by default) when one does not.
- :class:`LatencyModelBatcher`: fits batch latency against batch size (``a + b * n``) and
  picks the largest batch whose predicted p99 latency fits the time that the oldest queued
  query has left.
- :class:`NoBatching` (one query per call) and :class:`FixedBatcher` (whatever is queued, up
  to a maximum), the baselines.

Every controller answers ``batch_size(remaining_s)`` before a batch and hears
``observe(batch_size, latency_s)`` after it. :class:`LatencyModel` is shared: the server also
uses it to predict the queueing delay of a new query (admission control). Delayed batching
(waiting ``wait_s`` for more queries when the queue is thin) is done by the batching loop,
not by the controllers.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

__all__ = [
    "AIMDBatcher",
    "BatchController",
    "FixedBatcher",
    "LatencyModel",
    "LatencyModelBatcher",
    "NoBatching",
    "make_controller",
]

POLICIES = ("aimd", "latency", "fixed", "none")


class BatchController(Protocol):
    """What a batching loop asks of a controller."""

    max_batch_size: int

    def batch_size(self, remaining_s: float | None = None) -> int:
        """How many queued queries to take for the next batch (at least 1)."""
        ...

    def observe(self, batch_size: int, latency_s: float) -> None:
        """Record that a batch of ``batch_size`` queries took ``latency_s`` seconds."""
        ...


def _check_max(max_batch_size: int) -> int:
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
        raise TypeError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}; use 1 for none")
    return max_batch_size


class LatencyModel:
    """Batch latency as a linear function of batch size, robust to outliers, with a tail margin.

    Fits ``latency_s ~ a + b * n`` by least squares over the last ``window`` batches and adds
    the ``quantile`` of the residuals, so that :meth:`predict_s` estimates a tail latency (p99
    by default) and :meth:`mean_s` a typical one (Clipper Sec. 4.3 fits a model of latency
    against batch size; we use least squares plus an empirical residual quantile). With a single
    distinct batch size seen, the fit assumes latency proportional to size (no fixed cost),
    which over-estimates larger batches and so errs on the safe side until they are observed.

    The line is robust: batches slower than the line by more than a cutoff (five robust
    standard deviations of the residuals, from their interquartile range, and at least a
    quarter of the mean latency) are left out of it. On a busy machine a batch descheduled for
    a time slice can take ten times its usual latency; a few of those would otherwise pull the
    mean of a window far above what most batches take. The outliers still count in the tail
    margin, so :meth:`predict_s` keeps covering them.

    The line is refitted after every batch from running sums over the inliers (O(1)); the
    cutoff and the residual quantile, which need sorts, every ``refit_every`` batches, when the
    sums are also recomputed exactly so that float error cannot build up.

    Args:
        window: how many recent batches the fit uses.
        quantile: the residual quantile added to the mean fit, in (0, 1).
        refit_every: recompute the cutoff and the residual quantile after this many batches.
    """

    def __init__(self, window: int = 256, quantile: float = 0.99, refit_every: int = 64) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2 batches, got {window}")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}; e.g. 0.99 for p99")
        self.window = window
        self.quantile = quantile
        self.refit_every = max(1, refit_every)
        self._n: list[int] = []
        self._lat: list[float] = []
        self._in: list[bool] = []  # whether each batch in the window is in the line's sums
        self._k_in = 0
        self._next = 0  # ring-buffer position once the window is full
        self._dirty = 0
        self._sums = [0.0, 0.0, 0.0, 0.0]  # over inliers: n, latency, n^2, n * latency
        self._cut_s = math.inf  # a batch slower than the line by more is an outlier
        self.count = 0
        self.outliers = 0
        self.resets = 0
        self.a_s = 0.0  # fixed cost per batch
        self.b_s = 0.0  # cost per query in the batch
        self.margin_s = 0.0  # residual quantile
        self.fast_margin_s = 0.0  # the residuals' 10th percentile (<= 0)

    def observe(self, batch_size: int, latency_s: float) -> None:
        """Add one measured batch."""
        if len(self._n) >= 8 and latency_s < 0.5 * self.mean_s(batch_size):
            self._forget()  # the model is faster than the window says: start afresh
        sums = self._sums
        inlier = latency_s <= self.a_s + self.b_s * batch_size + self._cut_s
        if len(self._n) < self.window:
            self._n.append(batch_size)
            self._lat.append(latency_s)
            self._in.append(inlier)
        else:
            i = self._next
            if self._in[i]:
                old_n, old_l = self._n[i], self._lat[i]
                sums[0] -= old_n
                sums[1] -= old_l
                sums[2] -= old_n * old_n
                sums[3] -= old_n * old_l
                self._k_in -= 1
            self._n[i] = batch_size
            self._lat[i] = latency_s
            self._in[i] = inlier
            self._next = (i + 1) % self.window
        if inlier:
            sums[0] += batch_size
            sums[1] += latency_s
            sums[2] += batch_size * batch_size
            sums[3] += batch_size * latency_s
            self._k_in += 1
        else:
            self.outliers += 1
        self.count += 1
        self._dirty += 1
        if len(self._n) <= 8 or self._dirty >= self.refit_every or 4 * self._k_in < len(self._n):
            self._refit()
        else:
            self._line()

    def _forget(self) -> None:
        """Drop the window (not the counters): a batch took under half its fitted latency.

        Contention, descheduling and cold caches only ever slow a batch down, so a batch much
        faster than the fit means the fit is stale (it was learned in a slow spell, or on
        batch sizes that extrapolate badly), and its window would take hundreds of batches
        to wash out, during which admission and late drops would refuse what the model can do.
        """
        self._n, self._lat, self._in = [], [], []
        self._k_in = 0
        self._next = 0
        self._sums = [0.0, 0.0, 0.0, 0.0]
        self._cut_s = math.inf
        self.a_s = self.b_s = self.margin_s = self.fast_margin_s = 0.0
        self.resets += 1
        self._dirty = 0

    @property
    def fitted(self) -> bool:
        """Whether at least one batch was observed."""
        return self.count > 0

    def _line(self) -> None:
        """Least squares from the running sums (inliers only)."""
        k = self._k_in
        if k == 0:
            return
        sn, sl, snn, snl = self._sums
        var_n = snn - sn * sn / k
        if var_n <= 1e-9 * max(snn, 1.0):  # one batch size seen: latency proportional to size
            a, b = 0.0, sl / max(sn, 1.0)
        else:
            b = max((snl - sn * sl / k) / var_n, 0.0)
            a = (sl - b * sn) / k
            if a < 0.0:  # a negative fixed cost is noise; fit through the origin
                a, b = 0.0, snl / snn
        self.a_s, self.b_s = a, b

    def _set_sums(self, keep: list[bool]) -> None:
        ns, ls = self._n, self._lat
        pairs = [(x, y) for x, y, k in zip(ns, ls, keep, strict=True) if k]
        self._in = keep
        self._k_in = len(pairs)
        self._sums = [
            float(sum(x for x, _ in pairs)),
            sum(y for _, y in pairs),
            float(sum(x * x for x, _ in pairs)),
            sum(x * y for x, y in pairs),
        ]
        self._line()

    def _refit(self) -> None:
        """Exact sums, the outlier cutoff, the robust line, and the residual quantiles.

        Residuals are taken from the current robust line (from the line through every batch
        while the window is young); the cutoff is their median plus five robust standard
        deviations (from the interquartile range); the line is refitted through the batches
        within it. Two sorts of the window in all.
        """
        self._dirty = 0
        ns, ls = self._n, self._lat
        k = len(ns)
        if k <= 8 or self._k_in == 0:
            self._set_sums([True] * k)  # a young window: start from the line through all
        a, b = self.a_s, self.b_s
        residuals = [y - (a + b * x) for x, y in zip(ns, ls, strict=True)]
        ordered = sorted(residuals)
        med = ordered[k // 2]
        spread = (ordered[(3 * k) // 4] - ordered[k // 4]) / 1.349  # a normal's IQR in SDs
        self._cut_s = med + max(5.0 * spread, 0.25 * sum(ls) / k, 2e-5)
        self._set_sums([r <= self._cut_s for r in residuals])
        a, b = self.a_s, self.b_s
        ordered = sorted(y - (a + b * x) for x, y in zip(ns, ls, strict=True))
        idx = min(k - 1, int(math.ceil(self.quantile * k)) - 1)
        self.margin_s = max(ordered[max(idx, 0)], 0.0)
        self.fast_margin_s = min(ordered[k // 10], 0.0)

    def predict_s(self, batch_size: int) -> float:
        """Predicted tail latency of a batch of ``batch_size`` (0.0 before any observation)."""
        if self.count == 0:
            return 0.0
        return self.a_s + self.b_s * batch_size + self.margin_s

    def mean_s(self, batch_size: int) -> float:
        """Predicted mean latency of a batch of ``batch_size`` (the fit without the margin)."""
        if self.count == 0:
            return 0.0
        return self.a_s + self.b_s * batch_size

    def fast_s(self, batch_size: int) -> float:
        """Latency of a batch of ``batch_size`` when the machine is quick: the line plus the
        residuals' 10th percentile, and at least half the line (0.0 before any batch)."""
        mean = self.mean_s(batch_size)
        return max(mean + self.fast_margin_s, 0.5 * mean)

    def largest_fitting(self, remaining_s: float, max_batch_size: int, *, tail: bool = True) -> int:
        """The largest batch in ``[1, max_batch_size]`` whose predicted latency fits: the
        tail latency (:meth:`predict_s`), or with ``tail=False`` the typical one."""
        if self.count == 0:
            return 1
        if self.b_s <= 0.0:
            return max_batch_size
        margin = self.margin_s if tail else 0.0
        n = int((remaining_s - self.a_s - margin) / self.b_s + 1e-9)  # float noise
        return max(1, min(max_batch_size, n))

    def to_dict(self) -> dict[str, Any]:
        """The current fit, for /admin and metrics."""
        return {
            "batches": self.count,
            "a_ms": self.a_s * 1e3,
            "b_ms": self.b_s * 1e3,
            "margin_ms": self.margin_s * 1e3,
            "fast_margin_ms": self.fast_margin_s * 1e3,
            "outliers": self.outliers,
            "resets": self.resets,
        }


class NoBatching:
    """One query per model call: the no-batching baseline."""

    def __init__(self, max_batch_size: int = 1) -> None:
        self.max_batch_size = 1

    def batch_size(self, remaining_s: float | None = None) -> int:
        return 1

    def observe(self, batch_size: int, latency_s: float) -> None:
        pass


class FixedBatcher:
    """Take whatever is queued, up to ``max_batch_size`` (no adaptation)."""

    def __init__(self, max_batch_size: int = 64) -> None:
        self.max_batch_size = _check_max(max_batch_size)

    def batch_size(self, remaining_s: float | None = None) -> int:
        return self.max_batch_size

    def observe(self, batch_size: int, latency_s: float) -> None:
        pass


class AIMDBatcher:
    """Additive-increase / multiplicative-decrease on the batch size (Clipper Sec. 4.3).

    The limit grows by ``increase`` each time a batch that used the whole limit finishes
    within ``target_s``; when a batch takes longer than ``target_s`` the limit is cut to
    ``backoff`` times its value (Clipper backs off by 10%). Batches smaller than the limit
    (a thin queue) neither grow nor shrink it, so a quiet period does not inflate the limit
    before a burst.

    Args:
        target_s: the batch latency objective, in seconds. A query can wait for the batch in
            flight and then for its own, so the server passes about half the SLO.
        max_batch_size: upper bound on the limit.
        increase: additive step, in queries.
        backoff: multiplicative factor on a miss, in (0, 1).
        initial: the starting limit.
    """

    def __init__(
        self,
        target_s: float,
        max_batch_size: int = 64,
        *,
        increase: float = 1.0,
        backoff: float = 0.9,
        initial: int = 1,
    ) -> None:
        if not target_s > 0:
            raise ValueError(f"target_s must be > 0 seconds, got {target_s}")
        if not 0.0 < backoff < 1.0:
            raise ValueError(f"backoff must be in (0, 1), got {backoff}; Clipper uses 0.9")
        if increase <= 0:
            raise ValueError(f"increase must be > 0 queries, got {increase}")
        self.max_batch_size = _check_max(max_batch_size)
        self.target_s = target_s
        self.increase = increase
        self.backoff = backoff
        self.limit = float(max(1, min(initial, self.max_batch_size)))
        self.misses = 0

    def batch_size(self, remaining_s: float | None = None) -> int:
        return int(self.limit)

    def calibrate(self, model: LatencyModel) -> None:
        """Start from the largest batch whose typical fitted latency meets the target.

        Additive increase from one query takes a batch per step to find the batch size that a
        loaded replica needs (60 batches to reach 60), and a burst that comes before then
        meets batches far smaller than the model could take. The server measures a few
        warm-up batches before a replica serves and starts the controller where they say;
        AIMD adjusts from there.
        """
        if model.count:  # typical latency, as the target is checked against each batch
            fit = model.largest_fitting(self.target_s, self.max_batch_size, tail=False)
            self.limit = float(fit)

    def observe(self, batch_size: int, latency_s: float) -> None:
        if latency_s > self.target_s:
            self.misses += 1
            self.limit = max(1.0, math.floor(self.limit * self.backoff))
        elif batch_size >= int(self.limit):
            self.limit = min(float(self.max_batch_size), self.limit + self.increase)


class LatencyModelBatcher:
    """The largest batch whose predicted p99 latency fits the time left (Clipper Sec. 4.3).

    Args:
        max_batch_size: upper bound.
        target_s: used when the caller gives no remaining time (e.g. no query queued yet).
        model: a latency model that its owner updates; by default the batcher keeps its own.
    """

    def __init__(
        self, max_batch_size: int = 64, target_s: float = 0.025, model: LatencyModel | None = None
    ) -> None:
        if not target_s > 0:
            raise ValueError(f"target_s must be > 0 seconds, got {target_s}")
        self.max_batch_size = _check_max(max_batch_size)
        self.target_s = target_s
        self._owns_model = model is None  # a shared model is fed by its owner
        self.model = model if model is not None else LatencyModel()

    def batch_size(self, remaining_s: float | None = None) -> int:
        budget = self.target_s if remaining_s is None else min(remaining_s, self.target_s)
        return self.model.largest_fitting(budget, self.max_batch_size)

    def observe(self, batch_size: int, latency_s: float) -> None:
        if self._owns_model:
            self.model.observe(batch_size, latency_s)


def make_controller(
    policy: str, *, max_batch_size: int, target_s: float, model: LatencyModel | None = None
) -> BatchController:
    """Build the controller a model config names.

    Args:
        policy: "aimd", "latency", "fixed" or "none".
        max_batch_size: the largest batch allowed.
        target_s: the batch latency objective (about half the tightest SLO of the apps).
        model: a shared latency model (the latency policy reads it; others ignore it).
    """
    if policy == "aimd":
        return AIMDBatcher(target_s, max_batch_size)
    if policy == "latency":
        return LatencyModelBatcher(max_batch_size, target_s, model)
    if policy == "fixed":
        return FixedBatcher(max_batch_size)
    if policy == "none":
        return NoBatching()
    raise ValueError(f"batching policy must be one of {', '.join(POLICIES)}; got {policy!r}")
