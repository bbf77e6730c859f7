"""Load generator for HTTP prediction servers: open-loop and closed-loop, SLO-aware statistics.

Claim: the latencies it reports are free of coordinated omission, so a server that stalls is
charged for every query that arrived during the stall, and a default answer never passes for a
real one. Open-loop runs measure each query from its *scheduled* arrival time, not from when the
client managed to send it (Schroeder et al., "Open versus closed: a cautionary tale", NSDI 2006;
Tene's coordinated omission); goodput counts only real answers, not the marked defaults a
Clipper-style server gives when it cannot meet the SLO (Crankshaw et al., NSDI 2017, Sec. 4).

Arrival patterns:

- open-loop Poisson: exponential inter-arrival times at ``rate_rps``
  (:func:`poisson_arrivals`);
- bursty open-loop: gamma inter-arrival times with a coefficient of variation ``cv`` (4 by
  default: shape ``1 / cv**2``), the same mean rate, so queries come in clumps
  (:func:`gamma_arrivals`; the bursty traces of Clipper and InferLine use this model);
- closed-loop: ``concurrency`` clients, each sending its next query when the last is answered
  (:func:`closed_loop`); a sweep over concurrencies finds the peak a server sustains.

Each query yields a :class:`Sample` (scheduled time, send time, latency, HTTP status, whether
the answer was a marked default); :func:`summarize` turns samples into a :class:`LoadSummary`:
throughput, p50/p99, SLO attainment and goodput (answers within the SLO per second, defaults
excluded). :func:`max_throughput_within_slo` picks the highest-throughput point of a sweep whose
p99 stays within the SLO with (almost) no defaults.

The client is a minimal HTTP/1.1 keep-alive client on asyncio (``_loadgen_http``; uvloop when
installed), stdlib only, with its connections opened ahead of a run: a burst of hundreds of
queries must leave the client within a few ms, and aiohttp's ~0.2 ms of CPU per query would
charge the client's own lag to the server. ``client="aiohttp"`` cross-checks it. Pin the client
and the server to different cores (:func:`pin_to_cores`) when measuring.

Example::

    from mlcycle.serve.online import loadgen

    body = b'{"input": [0.0, 1.0]}'
    samples, span_s = loadgen.open_loop(
        "http://127.0.0.1:8000/mlp/predict", [body], loadgen.gamma_arrivals(500, 5.0, seed=0)
    )
    print(loadgen.summarize(samples, slo_ms=50, span_s=span_s))
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import re
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

__all__ = [
    "STATUS_ERROR",
    "STATUS_TIMEOUT",
    "LoadSummary",
    "Sample",
    "closed_loop",
    "closed_loop_async",
    "gamma_arrivals",
    "max_throughput_within_slo",
    "open_loop",
    "open_loop_async",
    "percentile",
    "pin_to_cores",
    "poisson_arrivals",
    "run_async",
    "summarize",
]

STATUS_ERROR = 0
"""``Sample.status`` of a query that failed without an HTTP status (connection refused, reset)."""
STATUS_TIMEOUT = -1
"""``Sample.status`` of a query cut off by the client (its timeout, or the end of the drain)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One query as the client saw it. Times in seconds from the start of the run.

    Attributes:
        scheduled_s: when the query was due (open loop: its arrival time; closed loop: when the
            client was free to send it).
        sent_s: when the client actually sent it (``sent_s - scheduled_s`` is client lag).
        latency_s: from ``scheduled_s`` to the whole response read (or to the failure).
        status: the HTTP status; :data:`STATUS_ERROR` or :data:`STATUS_TIMEOUT` without one.
        default: the server marked the answer as its default (``"default": true`` in the JSON
            body; for a batch body, any element true).
    """

    scheduled_s: float
    sent_s: float
    latency_s: float
    status: int
    default: bool = False

    @property
    def answered(self) -> bool:
        """A 2xx response came back (a default answer included)."""
        return 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class LoadSummary:
    """Statistics of one load point. Latencies in ms; rates in queries per second.

    Attributes:
        n: queries sent (scheduled).
        answered: 2xx responses, default answers included.
        defaults: 2xx responses marked as the server's default.
        failed: queries without a 2xx response (HTTP errors, connection errors, timeouts).
        span_s: the time the rates are taken over: the measured window, or until the last
            response when that came later.
        throughput_rps: ``answered / span_s``.
        goodput_rps: real (non-default) answers within the SLO per second.
        p50_ms, p99_ms, mean_ms, max_ms: latency over *all* queries; a failed query counts
            with the time it took to fail (a lower bound for timeouts), so an overloaded
            server's percentiles are never flattered by leaving its failures out.
        within_slo: fraction of queries answered (default or not) within the SLO: the
            "answered within the SLO or given the marked default inside it" figure.
        real_within_slo: fraction of queries given a real (non-default) answer within the SLO:
            SLO attainment in the strict sense.
        within_slo_from_send: as ``within_slo`` but timed from when the client sent each query;
            far above ``within_slo`` means the client's own lag cost the misses (a busy core).
        default_share: ``defaults / n``.
        client_lag_p99_ms: p99 of ``sent_s - scheduled_s``; more than a few ms means the client
            could not keep up and the point measures the client as much as the server.
        slo_ms: the SLO these fractions are against.
        offered_rps: the open-loop arrival rate (``n`` over the arrival window); None for
            closed loop.
        concurrency: the closed-loop concurrency; None for open loop.
    """

    n: int
    answered: int
    defaults: int
    failed: int
    span_s: float
    throughput_rps: float
    goodput_rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    within_slo: float
    real_within_slo: float
    within_slo_from_send: float
    default_share: float
    client_lag_p99_ms: float
    slo_ms: float
    offered_rps: float | None = None
    concurrency: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-able)."""
        return asdict(self)


# ------------------------------------------------------------------------------------------
# Arrival processes


def _check_rate(rate_rps: float, duration_s: float) -> None:
    if not (isinstance(rate_rps, (int, float)) and math.isfinite(rate_rps) and rate_rps > 0):
        raise ValueError(
            f"rate_rps must be a finite number > 0 (queries per second), got {rate_rps!r}"
        )
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number > 0 (seconds), got {duration_s!r}")


def _arrivals_from_gaps(gaps: Any, duration_s: float) -> list[float]:
    import numpy as np

    times = np.cumsum(gaps)
    return times[times < duration_s].tolist()


def poisson_arrivals(rate_rps: float, duration_s: float, *, seed: int | None = 0) -> list[float]:
    """Arrival times (s, ascending, in ``[0, duration_s)``) of a Poisson process at ``rate_rps``.

    Inter-arrival gaps are exponential with mean ``1 / rate_rps`` (coefficient of variation 1).
    """
    _check_rate(rate_rps, duration_s)
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(rate_rps * duration_s * 1.2 + 10 * math.sqrt(rate_rps * duration_s) + 16)
    times = _arrivals_from_gaps(rng.exponential(1.0 / rate_rps, size=n), duration_s)
    while times and len(times) == n:  # extremely unlikely: the draw fell short of duration_s
        n *= 2
        times = _arrivals_from_gaps(rng.exponential(1.0 / rate_rps, size=n), duration_s)
    return times


def gamma_arrivals(
    rate_rps: float, duration_s: float, *, cv: float = 4.0, seed: int | None = 0
) -> list[float]:
    """Arrival times of a bursty renewal process: gamma inter-arrival gaps with mean
    ``1 / rate_rps`` and coefficient of variation ``cv`` (shape ``1 / cv**2``).

    ``cv = 1`` is Poisson; ``cv = 4`` (the default) packs most queries into short bursts
    separated by long gaps, at the same mean rate. Over a short window the realized rate varies
    much more than Poisson's: use a few seconds of arrivals at least.
    """
    _check_rate(rate_rps, duration_s)
    if not (isinstance(cv, (int, float)) and math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a finite number > 0 (std / mean of the gaps), got {cv!r}")
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = 1.0 / cv**2
    scale = 1.0 / (rate_rps * shape)
    expected = rate_rps * duration_s
    n = int(expected * 1.5 + 10 * cv * math.sqrt(expected) + 16)
    gaps = rng.gamma(shape, scale, size=n)
    times = _arrivals_from_gaps(gaps, duration_s)
    while len(times) == n:  # the draw fell short of duration_s: draw more
        gaps = np.concatenate([gaps, rng.gamma(shape, scale, size=n)])
        n = len(gaps)
        times = _arrivals_from_gaps(gaps, duration_s)
    return times


# ------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation; nan when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(
    samples: Sequence[Sample],
    *,
    slo_ms: float,
    span_s: float,
    offered_rps: float | None = None,
    concurrency: int | None = None,
) -> LoadSummary:
    """Throughput, goodput, latency percentiles and SLO attainment of ``samples``.

    Args:
        samples: the queries of one load point (warm-up already left out).
        slo_ms: the latency SLO; an answer within it has ``latency_s * 1000 <= slo_ms``.
        span_s: the time over which rates are taken (the arrival window or the closed-loop
            measuring window); the span of the responses is used instead when longer, so a
            server that answers late is not credited with answers after the window.
        offered_rps, concurrency: carried into the summary to label the point.
    """
    if not (isinstance(slo_ms, (int, float)) and slo_ms > 0):
        raise ValueError(f"slo_ms must be a number > 0, got {slo_ms!r}")
    if not (isinstance(span_s, (int, float)) and span_s > 0):
        raise ValueError(f"span_s must be a number > 0 (seconds), got {span_s!r}")
    n = len(samples)
    slo_s = slo_ms / 1000.0
    answered = [s for s in samples if s.answered]
    defaults = sum(1 for s in answered if s.default)
    in_slo = sum(1 for s in answered if s.latency_s <= slo_s)
    in_slo_sent = sum(1 for s in answered if s.latency_s - (s.sent_s - s.scheduled_s) <= slo_s)
    real_in_slo = sum(1 for s in answered if s.latency_s <= slo_s and not s.default)
    end_s = max((s.scheduled_s + s.latency_s for s in answered), default=0.0)
    span = max(span_s, end_s - min((s.scheduled_s for s in samples), default=0.0))
    lat_ms = [s.latency_s * 1000.0 for s in samples]
    lag_ms = [max(0.0, s.sent_s - s.scheduled_s) * 1000.0 for s in samples]
    return LoadSummary(
        n=n,
        answered=len(answered),
        defaults=defaults,
        failed=n - len(answered),
        span_s=span,
        throughput_rps=len(answered) / span,
        goodput_rps=real_in_slo / span,
        p50_ms=percentile(lat_ms, 50),
        p99_ms=percentile(lat_ms, 99),
        mean_ms=sum(lat_ms) / n if n else math.nan,
        max_ms=max(lat_ms, default=math.nan),
        within_slo=in_slo / n if n else math.nan,
        real_within_slo=real_in_slo / n if n else math.nan,
        within_slo_from_send=in_slo_sent / n if n else math.nan,
        default_share=defaults / n if n else math.nan,
        client_lag_p99_ms=percentile(lag_ms, 99),
        slo_ms=float(slo_ms),
        offered_rps=offered_rps,
        concurrency=concurrency,
    )


def max_throughput_within_slo(
    points: Sequence[LoadSummary], *, min_real_within_slo: float = 0.99
) -> LoadSummary | None:
    """The point of a load sweep with the highest throughput among those that meet the SLO.

    A point meets the SLO when its p99 latency is within ``slo_ms`` *and* at least
    ``min_real_within_slo`` of its queries got a real (non-default) answer within it: a
    server that meets its p99 by answering defaults does not get credit for the throughput.
    None when no point qualifies.
    """
    if not 0 <= min_real_within_slo <= 1:
        raise ValueError(f"min_real_within_slo must be in [0, 1], got {min_real_within_slo!r}")
    ok = [
        p
        for p in points
        if p.n and p.p99_ms <= p.slo_ms and p.real_within_slo >= min_real_within_slo
    ]
    return max(ok, key=lambda p: p.throughput_rps, default=None)


# ------------------------------------------------------------------------------------------
# The client


_DEFAULT_TRUE = re.compile(rb'"default"\s*:\s*(?:true|\[[^\]]*true)')


def _is_default(body: bytes) -> bool:
    """Whether a JSON response body marks its answer as the server's default
    (``"default": true``, or a list holding ``true`` for a batch). A regex rather than a JSON
    parse, so that reading a marked answer costs the client no more than an unmarked one."""
    return _DEFAULT_TRUE.search(body) is not None


CLIENTS = ("raw", "aiohttp")


class _Client:
    """One HTTP client posting JSON bodies to one URL: the raw keep-alive client (default,
    stdlib only, cheapest per query) or aiohttp (a standard client, to cross-check)."""

    def __init__(
        self, url: str, *, max_connections: int, timeout_s: float, prewarm: int, kind: str
    ) -> None:
        if kind not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got {kind!r}")
        self.url = url
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.prewarm = prewarm
        self.kind = kind
        self._session: Any = None

    async def __aenter__(self) -> _Client:
        if self.kind == "raw":
            from mlcycle.serve.online._loadgen_http import RawHTTPClient

            self._session = RawHTTPClient(
                self.url,
                max_connections=self.max_connections,
                timeout_s=self.timeout_s,
                prewarm=self.prewarm,
            )
            await self._session.start()
            self.post = self._session.post  # type: ignore[method-assign]
            return self
        try:
            import aiohttp
        except ImportError as exc:
            raise ImportError(
                "client='aiohttp' needs aiohttp (pip install aiohttp); or use client='raw'"
            ) from exc
        connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers={"Content-Type": "application/json"},
            skip_auto_headers=("User-Agent",),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body``; (status, response body). Raises on connection errors and timeouts."""
        async with self._session.post(self.url, data=body) as resp:
            return resp.status, await resp.read()


async def _one(
    client: _Client, body: bytes, scheduled_s: float, t0: float, out: list[Sample]
) -> None:
    """Send one query and wait for its answer; its :class:`Sample` goes to ``out``."""
    fut = asyncio.ensure_future(client.post(body))
    fut.add_done_callback(partial(_record, scheduled_s, time.perf_counter() - t0, t0, out))
    await asyncio.wait((fut,))


@contextlib.contextmanager
def _no_gc_pauses() -> Any:
    """No cyclic garbage collection while a load runs: a full collection of this process
    (its heap frozen first, so none is due) stopped the client for 24 ms in a 3 s burst run,
    a lag charged to the server's latency. Queries make no reference cycles that outlive
    them, so nothing piles up; collection resumes afterwards."""
    was = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was:
            gc.enable()


def _check_bodies(bodies: Sequence[bytes]) -> None:
    if not bodies or not all(isinstance(b, (bytes, bytearray)) for b in bodies):
        raise TypeError(
            "bodies must be a non-empty sequence of bytes (JSON request bodies), e.g. "
            "[json.dumps({'input': x}).encode() for x in inputs]"
        )


async def open_loop_async(
    url: str,
    bodies: Sequence[bytes],
    arrivals_s: Sequence[float],
    *,
    timeout_s: float = 30.0,
    drain_s: float = 5.0,
    max_connections: int = 1024,
    prewarm: int | None = None,
    client: str = "raw",
) -> tuple[list[Sample], float]:
    """Send query ``i`` at ``arrivals_s[i]`` (s from the start) whatever the server does.

    Bodies are used in turn (query ``i`` gets ``bodies[i % len(bodies)]``). After the last
    arrival the client waits up to ``drain_s`` for outstanding answers, then cuts them off
    (:data:`STATUS_TIMEOUT`, latency up to the cut). Returns the samples (in completion order)
    and the arrival window (the last arrival time, at least 1 ms), the span to summarize over.

    ``prewarm`` keep-alive connections (default: ``max_connections``, as wrk opens all of its
    connections first) are opened before the clock starts (the raw client), so that a burst
    does not pay for TCP handshakes on either side: with 128 open, a CV-4 clump of 300 queries
    took the client 10.7 ms to send, with 1,024 open 4.2 ms, a lag charged to the server. At
    most ``max_connections`` are open, and a query that finds none free waits in the client
    (its wait counts in its latency).
    ``client`` is ``"raw"`` (default) or ``"aiohttp"``.
    """
    _check_bodies(bodies)
    arrivals = list(arrivals_s)
    if any(b < a for a, b in zip(arrivals, arrivals[1:], strict=False)):
        raise ValueError("arrivals_s must be ascending (seconds from the start of the run)")
    samples: list[Sample] = []
    pool = _Client(
        url,
        max_connections=max_connections,
        timeout_s=timeout_s,
        prewarm=max_connections if prewarm is None else prewarm,
        kind=client,
    )
    async with pool as conn:
        with _no_gc_pauses():
            await _send_open_loop(conn, bodies, arrivals, samples, drain_s)
    window_s = max(arrivals[-1] if arrivals else 0.0, 1e-3)
    return samples, window_s


async def _send_open_loop(
    conn: _Client,
    bodies: Sequence[bytes],
    arrivals: list[float],
    samples: list[Sample],
    drain_s: float,
) -> None:
    """The arrival loop of :func:`open_loop_async`: every query at its time, then the drain.

    A query goes out on an idle pooled connection at once, with a callback for its answer
    (:meth:`RawHTTPClient.post_now`), or else (no idle connection, or aiohttp) from a task.
    """
    tasks: set[asyncio.Future[Any]] = set()
    post_now = getattr(conn._session, "post_now", None)
    perf = time.perf_counter
    t0 = perf()
    i, n, k = 0, len(arrivals), len(bodies)
    while i < n:
        now = perf() - t0
        while i < n and arrivals[i] <= now:
            body, sent = bodies[i % k], perf() - t0
            fut = post_now(body) if post_now is not None else None
            if fut is None:
                fut = asyncio.ensure_future(conn.post(body))
            fut.add_done_callback(partial(_record, arrivals[i], sent, t0, samples))
            tasks.add(fut)
            fut.add_done_callback(tasks.discard)
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, arrivals[i] - (perf() - t0)))
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _record(
    scheduled_s: float, sent_s: float, t0: float, out: list[Sample], fut: asyncio.Future[Any]
) -> None:
    """Append the :class:`Sample` of the query whose answer is ``fut`` to ``out``, whatever
    happened: its status (:data:`STATUS_TIMEOUT` if cut off or timed out, :data:`STATUS_ERROR`
    without an answer) and whether it was a marked default."""
    status, default = STATUS_ERROR, False
    if fut.cancelled():
        status = STATUS_TIMEOUT
    elif fut.exception() is None:
        status, payload = fut.result()
        default = 200 <= status < 300 and _is_default(payload)
    elif isinstance(fut.exception(), TimeoutError):
        status = STATUS_TIMEOUT
    out.append(Sample(scheduled_s, sent_s, time.perf_counter() - t0 - scheduled_s, status, default))


async def closed_loop_async(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    *,
    warmup_s: float = 0.0,
    timeout_s: float = 30.0,
    client: str = "raw",
) -> tuple[list[Sample], float]:
    """``concurrency`` clients, each sending its next query as soon as its last is answered.

    Runs ``warmup_s + duration_s`` seconds; queries sent during the first ``warmup_s`` are left
    out of the samples. Queries still out at the end are waited for (up to ``timeout_s``).
    Returns the samples and the measured window ``duration_s``. ``client``: as in
    :func:`open_loop_async`.
    """
    _check_bodies(bodies)
    if not (isinstance(concurrency, int) and concurrency >= 1):
        raise ValueError(f"concurrency must be an int >= 1 (clients), got {concurrency!r}")
    if not (duration_s > 0 and warmup_s >= 0):
        raise ValueError(
            f"duration_s must be > 0 and warmup_s >= 0 (seconds), got {duration_s!r}, {warmup_s!r}"
        )
    samples: list[Sample] = []
    end_s = warmup_s + duration_s
    pool = _Client(
        url, max_connections=concurrency, timeout_s=timeout_s, prewarm=concurrency, kind=client
    )
    async with pool as conn:
        with _no_gc_pauses():
            t0 = time.perf_counter()

            async def worker(w: int) -> None:
                j = w
                while (now := time.perf_counter() - t0) < end_s:
                    await _one(conn, bodies[j % len(bodies)], now, t0, samples)
                    j += concurrency

            await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return [s for s in samples if s.scheduled_s >= warmup_s], duration_s


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on a fresh event loop, uvloop's when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def open_loop(
    url: str, bodies: Sequence[bytes], arrivals_s: Sequence[float], **kwargs: Any
) -> tuple[list[Sample], float]:
    """:func:`open_loop_async` on a fresh event loop (uvloop when installed)."""
    return run_async(open_loop_async(url, bodies, arrivals_s, **kwargs))


def closed_loop(
    url: str, bodies: Sequence[bytes], concurrency: int, duration_s: float, **kwargs: Any
) -> tuple[list[Sample], float]:
    """:func:`closed_loop_async` on a fresh event loop (uvloop when installed)."""
    return run_async(closed_loop_async(url, bodies, concurrency, duration_s, **kwargs))


def pin_to_cores(cores: Sequence[int], pid: int = 0) -> bool:
    """Pin process ``pid`` (0: this one) to ``cores``; children started later inherit it.

    Returns False (and changes nothing) where CPU affinity is not supported or the cores are
    not available to this process, so callers can note that the run was not pinned.
    """
    if not hasattr(os, "sched_setaffinity"):
        return False
    wanted = set(cores)
    if not wanted or not wanted <= os.sched_getaffinity(0):
        return False
    os.sched_setaffinity(pid, wanted)
    return True
