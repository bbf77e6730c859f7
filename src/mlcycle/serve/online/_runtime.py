"""A deployed model version: its replicas, its queue, and one batching loop per replica.

Queries for a model wait in one queue; each replica runs its own batching loop with its own
controller (Clipper Sec. 4.3) and takes the next batch whenever it is free, so work goes to
whichever replica frees up first (late binding) and a crashed or restarting replica strands no
queued query. Every query carries its deadline, and three things keep the promise that it is
answered by then, by the model or with the marked default:

- the *deadline timer* answers it with the default at the deadline if no model has (the safety
  net; Clipper likewise answers at the deadline with what it has);
- *admission control* refuses at once a query that cannot be answered in time even if the
  queue drains quickly: the queries ahead served a controller's batch at a time, each batch
  at the model's own time on a quick day (the 10th percentile of recent batches, relative to
  the robust latency fit) plus the typical hop to the replica. The model's time is measured
  where the model runs, and a quick day is what the model has shown it can do, so neither
  grows when the event loop is busy: a loop that is slow because it is answering refused
  queries must not make the queue look slower and refuse more (with closed-loop clients,
  which resend at once, that feedback turned 95% of the answers into defaults at 32 clients);
- a query that can no longer finish by its deadline when its batch is formed is answered with
  the default then and left out of the batch, so the model's time goes to queries that can
  still make it.

Before a replica serves, it runs warm-up batches of zeros of the model's input shape (when
known): the first call of a torch model allocates and is slow, and the measured batches seed
the latency fits and the AIMD controller, so a freshly started server answers its first queries
with the model.

A replica that crashes is restarted with back-off; the queries of its in-flight batch go back
to the front of the queue once, and get the default if they were already retried. A batch on
which the model raises is split into single queries, so one bad input fails alone (with a
4xx for its client) and the rest are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from typing import Any

from mlcycle.serve.online._config import ModelConfig
from mlcycle.serve.online._metrics import ModelMetrics
from mlcycle.serve.online._query import (  # noqa: F401 - re-exported for _apps and tests
    CRASHED,
    LATE,
    PROBE_AFTER,
    REJECTED,
    STOPPED,
    TIMEOUT,
    InputRejected,
    Query,
    _expire,
    _Reason,
)
from mlcycle.serve.online.batching import BatchController, LatencyModel, make_controller
from mlcycle.serve.online.cache import PredictionCache
from mlcycle.serve.online.replicas import (
    ModelError,
    Replica,
    ReplicaCrashed,
    make_replica,
)

log = logging.getLogger("mlcycle.serve")


class _Slot:
    """A replica and its batching loop's state."""

    __slots__ = ("replica", "controller", "task", "busy_until", "busy_n", "restarting")

    def __init__(self, replica: Replica, controller: BatchController) -> None:
        self.replica = replica
        self.controller = controller
        self.task: asyncio.Task[None] | None = None
        self.busy_until = 0.0  # predicted end of the batch in flight (loop time), 0 when idle
        self.busy_n = 0
        self.restarting = False


class ModelRuntime:
    """The running replicas of one model version, fed from one deadline-aware queue.

    Args:
        config: the model version's configuration.
        cache: the server's prediction cache (outputs are stored on the way back).
        metrics: this model's counters.
        target_s: the batch latency objective for the controllers (about half the SLO).
        ray_address, ray_num_cpus: where Ray replicas go.
    """

    def __init__(
        self,
        config: ModelConfig,
        cache: PredictionCache,
        metrics: ModelMetrics,
        *,
        target_s: float = 0.025,
        ray_address: str | None = None,
        ray_num_cpus: int | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = config.version
        self.key = config.key
        self.cache = cache
        self.metrics = metrics
        self.target_s = target_s
        self.wait_s = config.batching.wait_ms / 1e3
        self.latency = LatencyModel()  # batch latency as the loop sees it (the controllers')
        self.compute = LatencyModel()  # the model's own time per batch (admission, late drops)
        self.hop_s = 0.0  # typical per-batch time outside the model (dispatch, wake-up, pipes)
        self._hops: deque[float] = deque(maxlen=64)
        self._hop_k = 0
        self.ready = False  # every replica loaded and warmed up
        self._drops = 0  # queries dropped as late since the last batch started
        self.input_shape: list[int] | None = config.input_shape
        self.meta: dict[str, Any] = {}
        self._ray = (ray_address, ray_num_cpus)
        self._queue: deque[Query] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._fill: tuple[asyncio.Future[None], int] | None = None
        self._wait_gain = 1.0  # running share of delayed-batching waits that gained a query
        self._wait_skips = 0
        self._slots: list[_Slot] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def _new_slot(self, index: int) -> _Slot:
        ray_address, ray_num_cpus = self._ray
        replica = make_replica(
            self.config, index, ray_address=ray_address, ray_num_cpus=ray_num_cpus
        )
        b = self.config.batching
        controller = make_controller(
            b.policy, max_batch_size=b.max_batch_size, target_s=self.target_s, model=self.latency
        )
        return _Slot(replica, controller)

    async def start(self) -> None:
        """Start every replica (concurrently); stops them all if one fails to load."""
        self._loop = asyncio.get_running_loop()
        slots = [self._new_slot(i) for i in range(self.config.replicas)]
        results = await asyncio.gather(*(s.replica.start() for s in slots), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(s.replica.stop() for s in slots), return_exceptions=True)
            raise errors[0]
        self._adopt_meta(slots[0].replica.meta)
        for slot in slots:
            await self._warm(slot, measure=True)
        for slot in slots:
            self._launch(slot)
        self.metrics.replicas = len(self._slots)
        self.ready = True

    def _warm_input(self) -> Any:
        """Zeros of the model's input shape, or None when the shape is unknown."""
        shape = self.input_shape
        if not shape:
            return None
        x: Any = 0.0
        for d in reversed(shape):
            x = [x] * d
        return x

    async def _warm(self, slot: _Slot, *, measure: bool) -> None:
        """Run warm-up batches on a replica before it serves; ``measure``: feed the fits.

        One batch of one query and one of the largest batch size, which a model's first calls
        need (allocations, lazy initialisation), then, when measuring, each size twice more for
        the latency fits and the controller's starting point. A model whose input shape is not
        known gets no warm-up; one that refuses zeros is logged and serves cold.
        """
        x = self._warm_input()
        if x is None:
            return
        b = self.config.batching
        sizes = [1] if b.policy == "none" or b.max_batch_size == 1 else [1, b.max_batch_size]
        replica = slot.replica
        perf = time.perf_counter
        try:
            for n in sizes:
                await replica.predict_batch([x] * n)
            if not measure:
                return
            for _ in range(2):
                for n in sizes:
                    start = perf()
                    replica.last_compute_s = None
                    await replica.predict_batch([x] * n)
                    elapsed = perf() - start
                    self._observe(n, elapsed, replica.last_compute_s)
        except (ModelError, ReplicaCrashed) as exc:
            log.warning("%s: warm-up batch failed (%s); serving without one", self.key, exc)
            return
        calibrate = getattr(slot.controller, "calibrate", None)
        if calibrate is not None:
            calibrate(self.latency)

    def _observe(self, size: int, elapsed_s: float, compute_s: float | None) -> None:
        """Feed one batch's latency (as the loop saw it) and the model's own time to the fits."""
        if compute_s is None or compute_s > elapsed_s:
            compute_s = elapsed_s
        self.latency.observe(size, elapsed_s)
        self.compute.observe(size, compute_s)
        hops = self._hops
        hops.append(elapsed_s - compute_s)
        self._hop_k += 1
        if self._hop_k >= 16 or len(hops) <= 8:  # a low quantile: the hop without loop delays
            self._hop_k = 0
            self.hop_s = sorted(hops)[len(hops) // 10]

    def cost_s(self, batch_size: int) -> float:
        """The typical time a batch of ``batch_size`` keeps a replica: model plus hop."""
        return self.compute.mean_s(batch_size) + self.hop_s

    def _adopt_meta(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        if self.input_shape is None and meta.get("input_shape"):
            self.input_shape = list(meta["input_shape"])

    def _launch(self, slot: _Slot) -> None:
        slot.replica.on_lost = self._wake_all
        self._slots.append(slot)
        slot.task = asyncio.get_running_loop().create_task(
            self._serve(slot), name=f"batching-{self.key}-{slot.replica.index}"
        )

    async def set_replicas(self, n: int) -> None:
        """Grow or shrink to ``n`` replicas at runtime (new ones load before they serve)."""
        if n > len(self._slots):
            base = max((s.replica.index for s in self._slots), default=-1) + 1
            new = [self._new_slot(base + i) for i in range(n - len(self._slots))]
            results = await asyncio.gather(
                *(s.replica.start() for s in new), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                await asyncio.gather(*(s.replica.stop() for s in new), return_exceptions=True)
                raise errors[0]
            for slot in new:
                await self._warm(slot, measure=True)
            for slot in new:
                self._launch(slot)
        elif n < len(self._slots):
            gone = self._slots[n:]
            del self._slots[n:]
            for slot in gone:
                await self._retire(slot)
            self._wake_all()  # batches cut short went back to the queue
        self.config.replicas = n
        self.metrics.replicas = len(self._slots)

    async def _retire(self, slot: _Slot) -> None:
        if slot.task is not None:
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await slot.task
        await slot.replica.stop()

    def set_target(self, target_s: float) -> None:
        """A new batch latency objective (the apps linked to the model changed)."""
        self.target_s = target_s
        for slot in self._slots:
            if hasattr(slot.controller, "target_s"):
                slot.controller.target_s = target_s  # type: ignore[attr-defined]

    async def stop(self, successor: ModelRuntime | None = None) -> None:
        """Stop every replica; queued queries move to ``successor`` or get the default."""
        self._closing = True
        slots, self._slots = self._slots, []
        await asyncio.gather(*(self._retire(s) for s in slots), return_exceptions=True)
        if successor is not None and not successor._closing:
            successor.adopt(self._queue)
            self._queue = deque()
        while self._queue:
            q = self._queue.popleft()
            self._finish(q, STOPPED)
        for w in self._idle:
            if not w.done():
                w.set_result(None)
        self.metrics.replicas = 0

    # ---- submitting ------------------------------------------------------------------------

    def predicted_finish(self, now: float) -> float:
        """When a query queued now would be answered (loop time) if the queue drains quickly:
        the queries ahead go ``max_batch_size`` at a time (one without batching) over the live
        replicas, each batch at the model's quick-day time (:meth:`LatencyModel.fast_s`) plus
        the hop, after the batch in flight. Not AIMD's current limit: it shrinks when batches
        are slow, and a busy spell would then make the queue look longer and refuse more.

        This is an optimistic estimate on purpose: admission refuses only what cannot make its
        deadline, and what the estimate lets through but the machine is too slow for gets the
        default from its deadline timer, or when its batch is formed. An idle replica with an
        empty queue always admits, so the fit keeps learning after a slow spell and a model
        slower than the SLO still gets its chance.
        """
        queue = self._queue
        live = 0
        idle = False
        free_at = math.inf
        for slot in self._slots:
            if slot.restarting:
                continue
            live += 1
            busy_until = slot.busy_until
            if busy_until == 0.0:
                idle = True
            elif busy_until < free_at:
                free_at = busy_until
        if not live:  # restarting: queue it, the deadline timer guards; no replicas: refuse
            return now if self._slots else math.inf
        if self.compute.count == 0 or (idle and not queue):
            return now
        bs = self._slots[0].controller.max_batch_size
        q = len(queue) + 1
        start = now if idle or free_at < now else free_at
        rounds = -(-q // (bs * live))  # ceil
        fast, hop = self.compute.fast_s, self.hop_s
        return start + (rounds - 1) * (fast(bs) + hop) + fast(min(q, bs)) + hop

    def submit(self, x: Any, deadline: float, digest: bytes | None = None) -> asyncio.Future[Any]:
        """Queue one input; the future resolves to the output or a :class:`_Reason`.

        It may raise :class:`InputRejected` through the future when the model rejects the input.
        """
        loop = self._loop or asyncio.get_running_loop()
        fut = loop.create_future()
        now = loop.time()
        if self._closing or self.predicted_finish(now) > deadline:
            fut.set_result(REJECTED)
            return fut
        q = Query(x, fut, deadline, digest)
        q.timer = loop.call_at(deadline, _expire, fut)
        self._queue.append(q)
        self.metrics.queries += 1
        if self._idle:
            w = self._idle.popleft()
            if not w.done():
                w.set_result(None)
        fill = self._fill
        if fill is not None and len(self._queue) >= fill[1] and not fill[0].done():
            fill[0].set_result(None)
        return fut

    def adopt(self, queries: deque[Query]) -> None:
        """Take over queries queued at a replaced version (they keep their deadlines)."""
        for q in queries:
            if not q.future.done():
                self._queue.append(q)
        self._wake_all()

    def _wake_all(self) -> None:
        idle, self._idle = self._idle, deque()
        for w in idle:
            if not w.done():
                w.set_result(None)

    def _finish(self, q: Query, value: Any) -> None:
        if q.timer is not None:
            q.timer.cancel()
        if not q.future.done():
            q.future.set_result(value)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    # ---- the batching loop -----------------------------------------------------------------

    async def _serve(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        replica = slot.replica
        ctrl = slot.controller
        while not self._closing:
            if not replica.alive:  # died while idle: restart before taking work
                await self._on_crash(slot, [], ReplicaCrashed(f"replica {replica.index} died"))
                continue
            now = loop.time()
            probe = self._drop_hopeless(now)
            if not queue:
                if probe is None:
                    waiter = loop.create_future()
                    self._idle.append(waiter)
                    await waiter
                    continue
                if probe.deadline <= now or self._drops < PROBE_AFTER:
                    self._late(probe)
                    continue
                batch = [probe]  # dropped after dropped, no batch: the fit may be stale
            else:
                if probe is not None:
                    self._late(probe)
                remaining = queue[0].deadline - now
                n = ctrl.batch_size(remaining)
                if self.wait_s > 0.0 and len(queue) < n:  # delayed batching: a fuller batch
                    await self._delay(loop, n, remaining)
                    now = loop.time()
                finish = now + self.cost_s(min(n, len(queue)))
                batch = []
                while queue and len(batch) < n:
                    q = queue.popleft()
                    if q.future.done():
                        q.timer.cancel()  # type: ignore[union-attr]
                    elif q.deadline < finish:
                        self._late(q)
                    else:
                        batch.append(q)
                if not batch:
                    continue
            await self._run(loop, slot, batch)

    def _drop_hopeless(self, now: float) -> Query | None:
        """Pop answered queries and those that cannot finish even alone from the head of the
        queue; the hopeless ones get the default, but for the last, which is returned."""
        queue = self._queue
        floor = now + self.cost_s(1)
        probe = None
        while queue:
            q = queue[0]
            if q.future.done():  # answered by its deadline timer
                queue.popleft()
                q.timer.cancel()  # type: ignore[union-attr]
            elif q.deadline < floor:
                queue.popleft()
                if probe is not None:
                    self._late(probe)
                probe = q
            else:
                break
        return probe

    def _late(self, q: Query) -> None:
        self.metrics.late += 1
        self._drops += 1
        self._finish(q, LATE)

    async def _run(self, loop: asyncio.AbstractEventLoop, slot: _Slot, batch: list[Query]):
        """One batch on the slot's replica; answers its queries (or retries them)."""
        replica = slot.replica
        size = len(batch)
        self._drops = 0
        start = time.perf_counter()
        slot.busy_until = loop.time() + self.cost_s(size)
        slot.busy_n = size
        replica.last_compute_s = None
        try:
            outputs = await replica.predict_batch([q.input for q in batch])
        except ReplicaCrashed as exc:
            slot.busy_until = 0.0
            await self._on_crash(slot, batch, exc)
            return
        except ModelError as exc:
            slot.busy_until = 0.0
            self.metrics.model_errors += 1
            await self._isolate(replica, batch, exc)
            return
        except asyncio.CancelledError:
            for q in reversed(batch):  # retired while busy: let another replica take them
                self._queue.appendleft(q)
            raise
        elapsed = time.perf_counter() - start
        slot.busy_until = 0.0
        slot.controller.observe(size, elapsed)
        self._observe(size, elapsed, replica.last_compute_s)
        self.metrics.observe_batch(size, elapsed)
        cache = self.cache
        name, version = self.name, self.version
        for q, out in zip(batch, outputs, strict=True):
            if q.digest is not None:
                cache.put(name, version, q.digest, out)
            self._finish(q, out)

    async def _delay(self, loop: asyncio.AbstractEventLoop, n: int, remaining: float) -> None:
        """Wait up to ``wait_s`` for the queue to reach ``n``, when waiting has been paying off.

        A wait that brings no new query (a closed loop at concurrency 1, a quiet spell) only
        adds latency, so the loop keeps a running score of how often waiting gained a query
        and stops waiting when the score is low, probing again every 16th batch. At low load
        the delay therefore costs nothing on most queries.
        """
        if self._wait_gain < 0.1:
            self._wait_skips += 1
            if self._wait_skips % 16:
                return
        wait = min(self.wait_s, remaining - self.latency.predict_s(n))
        if wait <= 0.0:
            return
        before = len(self._queue)
        fill = loop.create_future()
        self._fill = (fill, n)
        handle = loop.call_later(wait, _expire, fill)
        await fill
        handle.cancel()
        self._fill = None
        gained = 1.0 if len(self._queue) > before else 0.0
        self._wait_gain = 0.8 * self._wait_gain + 0.2 * gained

    async def _on_crash(self, slot: _Slot, batch: list[Query], exc: Exception) -> None:
        log.warning("%s: %s; restarting the replica", self.key, exc)
        self.metrics.restarts += 1
        for q in reversed(batch):
            if q.future.done():
                continue
            if q.retried:
                self._finish(q, CRASHED)
            else:
                q.retried = True
                self._queue.appendleft(q)
        while self._idle and self._queue:  # wake the other replicas for the retries
            w = self._idle.popleft()
            if not w.done():
                w.set_result(None)
        slot.restarting = True
        delay_s = 0.1
        try:
            while not self._closing:
                try:
                    await slot.replica.restart()
                    await self._warm(slot, measure=False)
                    return
                except Exception as err:  # noqa: BLE001 - keep trying, the model may come back
                    log.warning(
                        "%s: restart failed (%s); retrying in %.1f s", self.key, err, delay_s
                    )
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, 10.0)
        finally:
            slot.restarting = False

    async def _isolate(self, replica: Replica, batch: list[Query], exc: ModelError) -> None:
        if len(batch) == 1:
            q = batch[0]
            if q.timer is not None:
                q.timer.cancel()
            if not q.future.done():
                q.future.set_exception(InputRejected(str(exc)))
            return
        for q in batch:  # one at a time, so a bad input fails alone
            if q.future.done():
                continue
            try:
                out = (await replica.predict_batch([q.input]))[0]
            except ModelError as one:
                await self._isolate(replica, [q], one)
                continue
            except ReplicaCrashed:
                self._finish(q, CRASHED)
                continue
            if q.digest is not None:
                self.cache.put(self.name, self.version, q.digest, out)
            self._finish(q, out)

    # ---- admin -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """State for the admin API: replicas, batch sizes, the latency fit."""
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.config.kind,
            "factory": self.config.factory,
            "input_shape": self.input_shape,
            "queue_length": len(self._queue),
            "batching": {
                "policy": self.config.batching.policy,
                "max_batch_size": self.config.batching.max_batch_size,
                "wait_ms": self.config.batching.wait_ms,
                "target_ms": self.target_s * 1e3,
                "batch_sizes": [s.controller.batch_size(None) for s in self._slots],
                "latency_fit": self.latency.to_dict(),
                "compute_fit": self.compute.to_dict(),
                "hop_ms": self.hop_s * 1e3,
            },
            "ready": self.ready,
            "replicas": [s.replica.info() for s in self._slots],
        }
