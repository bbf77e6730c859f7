"""Model replicas behind one async interface: a thread, a worker process, or a Ray actor.

Clipper (Crankshaw et al., NSDI 2017, Sec. 3) runs each model in containers behind a uniform
batch-prediction interface so that the layers above (batching, caching, selection) do not care
where the model lives. Here a :class:`Replica` is that interface:

- ``await replica.start()`` builds the model from its factory string (and returns metadata);
- ``await replica.predict_batch(inputs)`` returns one output per input, and leaves the
  model's own time for the batch (measured where the model runs, without the hop to it or
  the wait for the event loop) in ``replica.last_compute_s``;
- ``await replica.stop()`` releases it; ``await replica.restart()`` after a crash.

Kinds:

- :class:`ThreadReplica`: the model runs in a dedicated thread of the server process; the
  cheapest hop (no serialization). Good for models that release the GIL (torch, numpy) and for
  no-op models.
- :class:`ProcessReplica`: a local worker process (a fresh interpreter, as with
  multiprocessing's "spawn" start method), talking over a socket pair with length-prefixed
  pickles, read by the event loop without a thread.
  CPU-bound Python models scale past the GIL with one process per replica. A worker that dies
  closes its socket, which fails its in-flight batch with :class:`ReplicaCrashed`; a worker
  whose server dies sees the socket close and exits.
- :class:`RayReplica`: a Ray actor, on a cluster given by ``ray_address`` or a local Ray
  started on first use (``ray.init(num_cpus=..., include_dashboard=False)``, bound to
  loopback). Ray is imported only when such a replica starts.

Errors: :class:`~mlcycle.serve.online._worker.ModelLoadError` when the factory fails,
:class:`~mlcycle.serve.online._worker.ModelError` when the model raises on a batch (the
replica stays up), :class:`ReplicaCrashed` when the replica itself is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from mlcycle.serve.online._config import ModelConfig
from mlcycle.serve.online._worker import (
    _HEADER,
    ModelError,
    ModelLoadError,
    encode_frame,
    load_model,
)

__all__ = [
    "ModelError",
    "ModelLoadError",
    "ProcessReplica",
    "RayReplica",
    "Replica",
    "ReplicaCrashed",
    "ThreadReplica",
    "make_replica",
]

LOAD_TIMEOUT_S = 300.0  # a model may take a while to build (weights, torch import)


class ReplicaCrashed(RuntimeError):
    """The replica died (process exited, actor lost); its in-flight batch has no answer."""


class Replica(ABC):
    """One copy of a model behind an async batch interface.

    Args:
        config: the model's configuration (factory, args, method, threads).
        index: the replica's position among the model's replicas (for names and logs).
    """

    kind = "abstract"

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        self.config = config
        self.index = index
        self.meta: dict[str, Any] = {}
        self.restarts = 0
        self.alive = False
        self.on_lost: Callable[[], None] | None = None  # called when the replica dies by itself
        self.last_compute_s: float | None = None  # the model's time on the last batch

    @abstractmethod
    async def start(self) -> dict[str, Any]:
        """Build the model; returns its metadata (type, input_shape). Raises ModelLoadError."""

    @abstractmethod
    async def predict_batch(self, inputs: list[Any]) -> list[Any]:
        """One output per input. Raises ModelError or ReplicaCrashed."""

    @abstractmethod
    async def stop(self) -> None:
        """Release the replica (idempotent)."""

    async def restart(self) -> dict[str, Any]:
        """Stop what is left of the replica and start a fresh one."""
        self.restarts += 1
        with contextlib.suppress(Exception):
            await self.stop()
        return await self.start()

    @property
    def pid(self) -> int | None:
        """The process that runs the model, when known."""
        return os.getpid()

    def info(self) -> dict[str, Any]:
        """A summary for the admin API."""
        return {
            "kind": self.kind,
            "index": self.index,
            "alive": self.alive,
            "pid": self.pid,
            "restarts": self.restarts,
        }


def _resolve(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class ThreadReplica(Replica):
    """The model in a dedicated thread of this process (no serialization on the hop)."""

    kind = "thread"

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__(config, index)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def start(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._jobs = queue.SimpleQueue()
        cfg = self.config
        self._thread = threading.Thread(
            target=self._run,
            args=(loop, ready, self._jobs),
            name=f"mlcycle-{cfg.name}-{self.index}",
            daemon=True,
        )
        self._thread.start()
        self.meta = await ready
        self.alive = True
        return self.meta

    def _run(
        self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[Any], jobs: queue.SimpleQueue
    ) -> None:
        cfg = self.config
        try:
            fn, meta = load_model(cfg.factory, cfg.args, cfg.method, cfg.threads)
        except BaseException as exc:
            err = exc if isinstance(exc, ModelLoadError) else ModelLoadError(repr(exc))
            loop.call_soon_threadsafe(_resolve, ready, False, err)
            return
        loop.call_soon_threadsafe(_resolve, ready, True, meta)
        get = jobs.get
        call = loop.call_soon_threadsafe
        perf = time.perf_counter
        while True:
            job = get()
            if job is None:
                return
            inputs, fut = job
            start = perf()
            try:
                out = fn(inputs)
                ok = True
            except ModelError as exc:
                out, ok = exc, False
            except Exception as exc:
                out, ok = ModelError(f"{type(exc).__name__}: {exc}"), False
            self.last_compute_s = perf() - start  # read by the loop once the future resolves
            try:
                call(_resolve, fut, ok, out)
            except RuntimeError:  # the loop closed under us: the server is gone
                return

    async def predict_batch(self, inputs: list[Any]) -> list[Any]:
        if not self.alive:
            raise ReplicaCrashed(f"thread replica {self.index} of {self.config.key} is stopped")
        fut = asyncio.get_running_loop().create_future()
        self._jobs.put((inputs, fut))
        return await fut

    async def stop(self) -> None:
        self.alive = False
        self._jobs.put(None)
        self._thread = None  # a daemon thread; it exits after its current batch


class _FrameProtocol(asyncio.Protocol):
    """Reads length-prefixed pickles from a worker socket on the event loop."""

    def __init__(self, owner: ProcessReplica) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import pickle

        buf = self.buf
        buf += data
        head = _HEADER.size
        while len(buf) >= head:
            (n,) = _HEADER.unpack_from(buf)
            if len(buf) < head + n:
                break
            msg = pickle.loads(memoryview(buf)[head : head + n])
            del buf[: head + n]
            self.owner._on_message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_lost()


class ProcessReplica(Replica):
    """The model in a local worker process (a fresh interpreter), over a socket pair."""

    kind = "process"

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__(config, index)
        self._proc: Any = None
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ready: asyncio.Future[Any] | None = None
        self._next_id = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        cfg = self.config
        parent_sock, child_sock = socket.socketpair()
        self._ready = loop.create_future()
        self._pending = {}
        try:
            proc = await loop.run_in_executor(None, _spawn_worker, child_sock)
        finally:
            child_sock.close()  # the child has its own copy; ours would hide its death
        self._proc = proc
        parent_sock.setblocking(False)
        transport, _ = await loop.create_connection(lambda: _FrameProtocol(self), sock=parent_sock)
        self._transport = transport  # type: ignore[assignment]
        transport.write(encode_frame(("load", cfg.factory, cfg.args, cfg.method, cfg.threads)))
        try:
            self.meta = await asyncio.wait_for(asyncio.shield(self._ready), LOAD_TIMEOUT_S)
        except (TimeoutError, ModelLoadError):
            await self.stop()
            raise
        self.alive = True
        return self.meta

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        tag = msg[0]
        if tag == "ok" or tag == "fail":
            if len(msg) > 3:
                self.last_compute_s = msg[3]
            fut = self._pending.pop(msg[1], None)
            if fut is not None and not fut.done():
                if tag == "ok":
                    fut.set_result(msg[2])
                else:
                    fut.set_exception(ModelError(msg[2]))
        elif self._ready is not None and not self._ready.done():
            if tag == "ready":
                self._ready.set_result(msg[1])
            else:
                self._ready.set_exception(ModelLoadError(msg[1]))

    def _on_lost(self) -> None:
        was_alive, self.alive = self.alive, False
        code = self._proc.poll() if self._proc is not None else None
        why = f"worker process {self.pid} of {self.config.key} exited (code {code})"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ModelLoadError(f"{why} while loading the model"))
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ReplicaCrashed(why))
        if was_alive and self.on_lost is not None:
            self.on_lost()

    async def predict_batch(self, inputs: list[Any]) -> list[Any]:
        transport = self._transport
        if not self.alive or transport is None or transport.is_closing():
            raise ReplicaCrashed(f"worker {self.index} of {self.config.key} is not running")
        self._next_id += 1
        batch_id = self._next_id
        fut = asyncio.get_running_loop().create_future()
        self._pending[batch_id] = fut
        transport.write(encode_frame(("batch", batch_id, inputs)))
        return await fut

    async def stop(self) -> None:
        self.alive = False
        transport, self._transport = self._transport, None
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(encode_frame(("stop",)))
            transport.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, _reap, proc)


def _spawn_worker(child_sock: socket.socket) -> subprocess.Popen[bytes]:
    """A fresh interpreter running :func:`~mlcycle.serve.online._worker.process_main`.

    Like multiprocessing's "spawn" start method (nothing is inherited but the socket), but it
    never re-runs the parent's ``__main__``, so a server started from a plain script works
    without an ``if __name__ == "__main__"`` guard. The parent's ``sys.path`` is passed on, so
    any factory the parent can import, the worker can too.
    """
    fd = child_sock.fileno()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.Popen(
        [sys.executable, "-m", "mlcycle.serve.online._worker", str(fd)],
        pass_fds=[fd],
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _reap(proc: subprocess.Popen[bytes], grace_s: float = 2.0) -> None:
    try:
        proc.wait(grace_s)
        return
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


_ray_lock = threading.Lock()
_ray_started_here = False


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Import Ray and connect: to ``address`` if given, else a local Ray on loopback."""
    global _ray_started_here
    try:
        import ray
    except ImportError:
        raise ModelLoadError(
            "kind 'ray' needs Ray: pip install 'mlcycle[cluster]' (or use kind 'process')"
        ) from None
    with _ray_lock:
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=num_cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    log_to_driver=False,
                    _node_ip_address="127.0.0.1",
                )
                _ray_started_here = True
    return ray


def shutdown_ray() -> None:
    """Stop a local Ray that :func:`ensure_ray` started (a cluster is left alone)."""
    global _ray_started_here
    import sys

    ray = sys.modules.get("ray")
    with _ray_lock:
        if ray is not None and _ray_started_here and ray.is_initialized():
            ray.shutdown()
        _ray_started_here = False


class RayReplica(Replica):
    """The model in a Ray actor (a cluster via ``ray_address``, else a local Ray)."""

    kind = "ray"

    def __init__(
        self,
        config: ModelConfig,
        index: int = 0,
        *,
        ray_address: str | None = None,
        ray_num_cpus: int | None = None,
    ) -> None:
        super().__init__(config, index)
        self.ray_address = ray_address
        self.ray_num_cpus = ray_num_cpus
        self._actor: Any = None
        self._pid: int | None = None
        self._ray: Any = None

    @property
    def pid(self) -> int | None:
        return self._pid

    async def start(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        ray = await loop.run_in_executor(None, ensure_ray, self.ray_address, self.ray_num_cpus)
        self._ray = ray
        from mlcycle.serve.online._worker import RayWorker

        cfg = self.config
        actor_cls = ray.remote(RayWorker)
        options = {"max_concurrency": 1, **cfg.ray_options}
        self._actor = actor_cls.options(**options).remote(
            cfg.factory, cfg.args, cfg.method, cfg.threads
        )
        try:
            self.meta = await self._await(self._actor.ready.remote())
            self._pid = await self._await(self._actor.pid.remote())
        except Exception as exc:
            await self.stop()
            raise ModelLoadError(f"the Ray actor for {cfg.key} failed to start: {exc}") from None
        self.alive = True
        return self.meta

    @staticmethod
    async def _await(ref: Any) -> Any:
        return await asyncio.wrap_future(ref.future())

    async def predict_batch(self, inputs: list[Any]) -> list[Any]:
        if not self.alive or self._actor is None:
            raise ReplicaCrashed(f"Ray replica {self.index} of {self.config.key} is not running")
        try:
            ok, value, self.last_compute_s = await self._await(
                self._actor.predict_batch.remote(inputs)
            )
        except Exception as exc:
            errors = self._ray.exceptions
            if isinstance(exc, errors.RayActorError | errors.WorkerCrashedError):
                self.alive = False
                raise ReplicaCrashed(f"Ray actor of {self.config.key} died: {exc}") from None
            raise ModelError(f"{type(exc).__name__}: {exc}") from None
        if not ok:
            raise ModelError(value)
        return value

    async def stop(self) -> None:
        self.alive = False
        actor, self._actor = self._actor, None
        if actor is not None and self._ray is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(actor)


def make_replica(
    config: ModelConfig,
    index: int = 0,
    *,
    ray_address: str | None = None,
    ray_num_cpus: int | None = None,
) -> Replica:
    """The replica of the kind ``config.kind`` names (not started)."""
    if config.kind == "thread":
        return ThreadReplica(config, index)
    if config.kind == "process":
        return ProcessReplica(config, index)
    if config.kind == "ray":
        return RayReplica(config, index, ray_address=ray_address, ray_num_cpus=ray_num_cpus)
    raise ValueError(f"replica kind must be thread, process or ray; got {config.kind!r}")
