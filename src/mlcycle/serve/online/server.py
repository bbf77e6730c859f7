"""The HTTP frontend: a raw ASGI app on uvicorn (httptools + uvloop), with admin API and metrics.

Clipper (Crankshaw et al., NSDI 2017, Sec. 3) puts one layer between applications and
models; this module is its front door. Endpoints (all JSON; the schema is ``GET
/openapi.json``):

- ``POST /{app}/predict`` ``{"input": x}`` or ``{"inputs": [x, ...]}``: every query is answered
  within the app's SLO, by a model, the cache, or the app's default marked ``"default": true``;
- ``POST /{app}/feedback`` ``{"query_id": id, "label": y}`` (or ``{"input": x, "label": y}``);
- ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /openapi.json``;
- ``/admin/...``: register and remove apps, deploy and undeploy model versions, link models,
  set replicas, at runtime (see :mod:`mlcycle.serve.online._admin`).

Why raw ASGI rather than Starlette: measured on this project's 2-core machine (server pinned to
one core, a keep-alive ``http.client`` loop on the other, 3,000 POSTs of 256 floats, orjson in
both), a Starlette route answered at 0.25 ms p50 and the same handler as a bare ASGI callable at
0.12 ms p50: Starlette's Request/Response/routing objects cost ~0.13 ms per request, more than
the whole rest of our path. The app routes by string tests on ``scope["path"]``, reads the body
from ``receive`` with a size limit, and writes pre-built header lists, so it stays well inside
the 1 ms overhead budget over a bare Starlette handler.

One event loop does all the HTTP and scheduling work; models run off the loop, in replica
threads, processes or Ray actors (:mod:`mlcycle.serve.online.replicas`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from time import perf_counter
from typing import Any

from mlcycle.serve.online._apps import AppRuntime, InputError, OutputError, QueryLog
from mlcycle.serve.online._config import ConfigError, ServerConfig
from mlcycle.serve.online._lag import LoopLag
from mlcycle.serve.online._metrics import ModelMetrics, render
from mlcycle.serve.online._query import REJECTED, _Reason
from mlcycle.serve.online._runtime import ModelRuntime
from mlcycle.serve.online._shed import ARRIVAL, OVERLOAD, FrontendLoad, Intake
from mlcycle.serve.online.cache import PredictionCache

__all__ = [
    "ConfigError",
    "HTTPError",
    "Server",
    "bind_socket",
    "serve_in_thread",
]

log = logging.getLogger("mlcycle.serve")

_JITTER_S = 0.004  # a request read this late is normal for a busy loop, not a sign it is behind
_GC_IDLE_MIN = 700  # young objects before an idle collection (CPython's own threshold)
_GC_BUSY_MAX = 100_000  # young objects before one mid-burst all the same (bounds memory)

try:
    import orjson

    _OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

    def _default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON-serializable")

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, default=_default, option=_OPTS)

    loads = orjson.loads
    _DecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - the serve extra installs orjson

    def _default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON-serializable")

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=_default, separators=(",", ":")).encode()

    loads = json.loads
    _DecodeError = ValueError


_JSON = (b"content-type", b"application/json")
_TEXT = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


class HTTPError(Exception):
    """An error answer: status and a message that says what is wrong and what to do."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def _method_not_allowed(method: str, allowed: str) -> HTTPError:
    return HTTPError(
        405,
        f"method {method} is not allowed here; use {allowed}",
        [(b"allow", allowed.replace(" or ", ", ").encode())],
    )


def _parse_json(body: bytes) -> Any:
    """``body`` parsed as JSON, or a 400 with the parser's message and an example."""
    try:
        return loads(body)
    except _DecodeError as exc:
        raise HTTPError(
            400,
            f"request body is not valid JSON ({exc}); send e.g. "
            '{"input": [0.1, 0.2]} with content-type application/json',
        ) from None


def _error_reply(exc: Exception, method: str, path: str) -> tuple[int, bytes, list[Any]]:
    """The status, JSON body and extra headers answering a request that raised ``exc``: its
    own status for an :class:`HTTPError`, else 500 (logged: a model output that is not JSON,
    or a bug)."""
    if isinstance(exc, HTTPError):
        return exc.status, dumps({"error": exc.message}), exc.headers
    if isinstance(exc, OutputError):
        log.error("%s", exc)
        return 500, dumps({"error": str(exc)}), []
    log.exception("mlcycle serve: unexpected error on %s %s", method, path, exc_info=exc)
    return 500, dumps({"error": f"internal error: {type(exc).__name__}: {exc}"}), []


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Server:
    """The online serving layer: models, apps, and the ASGI app in front of them.

    Args:
        config: a :class:`ServerConfig`, a dict of the same shape, a path to a JSON file, or
            None for an empty server (deploy through the admin API).

    Example:
        >>> from mlcycle.serve.online import Server  # doctest: +SKIP
        >>> Server({"models": [...], "apps": [...]}).run(port=8000)  # doctest: +SKIP
    """

    def __init__(self, config: ServerConfig | dict[str, Any] | str | Path | None = None) -> None:
        self.config = ServerConfig.load(config)
        self.models: dict[str, ModelRuntime] = {}
        self.apps: dict[str, AppRuntime] = {}
        self.model_metrics: dict[str, ModelMetrics] = {}
        self.cache = PredictionCache(self.config.cache_size)
        self.log = QueryLog(self.config.query_log_size)
        self.max_body = self.config.max_body_bytes
        self.url: str | None = None
        self.started = False
        self.startup_error: str | None = None
        self._qid = 0
        self.lag = LoopLag()  # how far behind the loop runs: requests are that much older
        self.frontend = FrontendLoad(lag=self.lag)  # predict requests in hand, their cost
        self.intake = Intake(self.lag)  # requests read in slices between timers and answers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admin_lock: asyncio.Lock | None = None
        self._openapi: bytes | None = None
        self._announce = False
        self._own_gc = False  # set by run(): the collector runs between bursts

    def _next_id(self) -> str:
        self._qid += 1
        return format(self._qid, "x")

    # ---- lifecycle -------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start every configured model, then register the apps."""
        self._loop = asyncio.get_running_loop()
        self._admin_lock = asyncio.Lock()
        from mlcycle.serve.online import _admin

        try:
            await asyncio.gather(*(_admin.start_model(self, m) for m in self.config.models))
            for app in self.config.apps:
                _admin.add_app(self, app)
        except BaseException:
            await self.shutdown()
            raise
        settle_heap(collect=True)
        if self._own_gc:
            gc.disable()  # collected between bursts instead (_collect_when_idle)
            self.lag.on_beat = self._collect_when_idle
        self.lag.start(self._loop)
        self.frontend.restart()  # start-up's CPU time is no request's cost
        self.started = True

    async def shutdown(self) -> None:
        """Stop every replica (worker processes and Ray actors included)."""
        self.lag.stop()
        if self._own_gc:
            self.lag.on_beat = None
            gc.enable()
        models, self.models = list(self.models.values()), {}
        await asyncio.gather(*(m.stop() for m in models), return_exceptions=True)
        if any(m.config.kind == "ray" for m in models):
            from mlcycle.serve.online.replicas import shutdown_ray

            await asyncio.get_running_loop().run_in_executor(None, shutdown_ray)
        self.started = False

    def _collect_when_idle(self, late_s: float) -> None:
        """The cyclic garbage collector's turn, from the heartbeat, in a process the server
        owns (:meth:`run`): when the loop is idle (the beat on time, no request in hand), or
        when a long busy spell has left many young objects.

        With automatic collection, a young-generation pass every ~700 allocations (a few dozen
        requests: their parsed inputs, futures, timers) ran inside whatever request allocated
        next, 0.4-1.7 ms here, and a middle-generation pass 3-5 ms, so a burst's requests
        waited behind the collector in the middle of the burst. Serving makes few reference
        cycles (the heap of torch and the models is frozen at start-up), so collecting once
        the burst is over loses nothing.
        """
        young = gc.get_count()[0]
        if young < _GC_IDLE_MIN:
            return
        if late_s <= self.lag.floor_s and self.frontend.inflight == 0:
            gc.collect(2 if gc.get_count()[2] >= 10 else 1)
        elif young >= _GC_BUSY_MAX:
            gc.collect(0)

    def target_s(self, model: str) -> float:
        """The batch latency objective of a model: 45% of the tightest budget of its apps."""
        budgets = [a.budget_s for a in self.apps.values() if model in a.config.models]
        if not budgets:
            budgets = [c.slo_ms / 1e3 for c in self.config.apps if model in c.models] or [0.05]
        return 0.45 * min(budgets)

    # ---- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            if ARRIVAL not in scope:
                await self._http(scope, receive, send)
                return
            try:  # counted in by the door (the shedding protocol): counted out here
                await self._http(scope, receive, send)
            finally:
                self.frontend.leave()
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    self.startup_error = str(exc)
                    log.error("mlcycle serve: startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                if self._announce and self.url:
                    print(f"mlcycle serve: listening on {self.url}", flush=True)
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path.endswith("/predict") and path.count("/") == 2:
                app = self.apps.get(path[1:-8])
                if app is None:
                    raise self._unknown_app(path[1:-8])
                if method != "POST":
                    raise _method_not_allowed(method, "POST")
                await self._predict(app, scope, receive, send)
                return
            if path.endswith("/feedback") and path.count("/") == 2:
                app = self.apps.get(path[1:-9])
                if app is None:
                    raise self._unknown_app(path[1:-9])
                if method != "POST":
                    raise _method_not_allowed(method, "POST")
                data = await self.read_json(scope, receive)
                await _send(send, 200, dumps(self._feedback(app, data)), [_JSON])
                return
            if path == "/health":
                if method not in ("GET", "HEAD"):
                    raise _method_not_allowed(method, "GET")
                await _send(send, 200, dumps(self.health()), [_JSON])
                return
            if path == "/metrics":
                if method not in ("GET", "HEAD"):
                    raise _method_not_allowed(method, "GET")
                await _send(send, 200, self.metrics_text().encode(), [_TEXT])
                return
            if path == "/openapi.json":
                if method not in ("GET", "HEAD"):
                    raise _method_not_allowed(method, "GET")
                if self._openapi is None:
                    from mlcycle.serve.online._openapi import openapi_schema

                    self._openapi = dumps(openapi_schema())
                await _send(send, 200, self._openapi, [_JSON])
                return
            if path == "/admin" or path.startswith("/admin/"):
                from mlcycle.serve.online._admin import handle

                status, payload = await handle(self, method, path, scope, receive)
                await _send(send, status, dumps(payload), [_JSON])
                return
            raise HTTPError(
                404,
                f"no endpoint at {path!r}; use POST /{{app}}/predict, POST /{{app}}/feedback, "
                "GET /health, GET /metrics, GET /openapi.json or /admin/...",
            )
        except Exception as exc:
            status, body, headers = _error_reply(exc, method, path)
            await _send(send, status, body, [_JSON, *headers])

    def _unknown_app(self, name: str) -> HTTPError:
        known = ", ".join(sorted(self.apps)) or "none registered"
        return HTTPError(
            404,
            f"unknown app {name!r} (apps: {known}); register it with POST /admin/apps",
        )

    async def read_body(self, scope: dict[str, Any], receive: Any) -> bytes:
        """The request body, refused with 413 past ``max_body_bytes``."""
        limit = self.max_body
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise HTTPError(400, "content-length is not an integer") from None
                if declared > limit:
                    raise self._too_large(declared)
                break
        msg = await receive()
        body: bytes = msg.get("body", b"")
        if not msg.get("more_body"):
            if len(body) > limit:
                raise self._too_large(len(body))
            return body
        chunks = [body]
        size = len(body)
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise HTTPError(400, "the client disconnected before sending the whole body")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large(size)
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    def _too_large(self, size: int) -> HTTPError:
        return HTTPError(
            413,
            f"request body of {size} bytes exceeds the limit of {self.max_body} bytes; send "
            "fewer inputs per request or raise max_body_bytes in the server config",
        )

    async def read_json(self, scope: dict[str, Any], receive: Any) -> Any:
        """The body parsed as JSON (400 with the parser's message when it is not)."""
        return _parse_json(await self.read_body(scope, receive))

    # ---- the door: defaults decided before the body is parsed ------------------------------

    def door_app(self, url: bytes) -> AppRuntime | None:
        """The app a raw ``/{app}/predict`` URL names, or None (then uvicorn's path decides)."""
        name = url[1:-8]
        if not name or b"/" in name or b"%" in name or b"?" in name:
            return None
        return self.apps.get(name.decode("latin-1"))

    def shed_reason(
        self, app: AppRuntime, t0: float, now: float, behind: float = 0.0
    ) -> _Reason | None:
        """Why a query of ``app`` that arrived at ``t0`` gets the default at once, or None;
        ``behind``: how late it was read (``now - t0``), which its answer will likely be too.

        ``"admission"`` when every model the app links would refuse it at admission (their
        queues cannot make the deadline); ``"overload"`` when the frontend's backlog
        (:class:`FrontendLoad`) would fill more than ``headroom`` (half) of the time left
        between the quickest model's predicted finish and the deadline. A query let in waits
        about the backlog before its body is parsed and then has its model deadline moved up
        by the backlog (:meth:`_predict_at`), so with the backlog at half of what is left the
        model would get no time at all: counting the model's time here keeps the door from
        letting in, under sustained load, queries that can only end as defaults after the
        frontend has done all their work. Both are decided before the body is parsed, so
        under a burst a default costs a fraction of an answer. A loop that read a request
        late is behind: the passes that held it up (a clump being read) will likely hold up
        its answer, or its deadline timer, about as long, so that much counts in the backlog,
        beyond the few ms (``_JITTER_S``) any busy loop reads late (counted whole, they shed
        1-3% of a closed loop at 32-64 clients that met its SLO at p99 20-35 ms).
        """
        deadline = t0 + app.budget_s
        finish = now  # when the quickest linked model would be done with it
        names = app.config.models
        if names:
            models = self.models
            finish = math.inf
            for name in names:
                rt = models.get(name)
                if rt is None:  # not deployed: the app's own path answers
                    finish = now
                    break
                if not rt._closing:
                    finish = min(finish, rt.predicted_finish(now))
            if finish > deadline:
                return REJECTED
        front = self.frontend
        late = max(0.0, behind - _JITTER_S)
        if front.backlog_s() + late > front.headroom * (deadline - max(finish, now)):
            return OVERLOAD
        if front.ahead_s() > front.headroom * (front.earliest_s(now) - now):
            return OVERLOAD  # its parsing would hold up the answer of one let in before it
        return None

    def shed_payload(self, app: AppRuntime, reason: _Reason, p0: float) -> bytes:
        """The JSON body of a default given at the door, counted like any default."""
        head = app.shed_json.get(reason.why)
        if head is None:
            fields = {"output": app.default, "default": True, "model": None, "cached": False}
            fields |= {"confidence": None, "reason": reason.why}
            head = b'",' + dumps(fields)[1:-1] + b',"latency_ms":'
            app.shed_json[reason.why] = head
        qid = app.refused(reason)
        elapsed = perf_counter() - p0
        m = app.metrics
        m.latency.observe(elapsed)
        if elapsed > app.slo_s:
            m.slo_misses += 1
        return b'{"query_id":"' + qid.encode() + head + dumps(elapsed * 1e3) + b"}"

    # ---- predict and feedback --------------------------------------------------------------

    async def _predict(self, app: AppRuntime, scope: dict[str, Any], receive: Any, send: Any):
        arrival = scope.get(ARRIVAL)
        if arrival is not None:  # the door saw it first (the shedding protocol)
            await self._predict_at(app, scope, receive, send, *arrival)
            return
        # deadlines on the loop's clock, from when the request arrived: as far back as the
        # loop is behind (the time it waited unseen in the socket and the ready queue)
        now = self._loop.time()  # type: ignore[union-attr]
        lag = self.lag.age_s(now)
        t0 = now - lag
        p0 = perf_counter() - lag  # latency: uvloop's clock ticks in whole milliseconds
        reason = self.shed_reason(app, t0, now, lag)
        self.frontend.enter()
        try:
            await self._predict_at(app, scope, receive, send, t0, p0, reason, lag)
        finally:
            self.frontend.leave()

    async def _predict_at(
        self,
        app: AppRuntime,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        t0: float,
        p0: float,
        shed: _Reason | None,
        behind: float = 0.0,
    ) -> None:
        """Answer a predict request that arrived at loop time ``t0`` (``p0`` on perf_counter)
        and was read ``behind`` seconds later; ``shed``: the door's reason to give it the
        default at once, or None."""
        body = await self.read_body(scope, receive)
        status, payload = await self.predict_body(app, body, t0, p0, shed, behind)
        await _send(send, status, payload, [_JSON])

    async def predict_body(
        self,
        app: AppRuntime,
        body: bytes,
        t0: float,
        p0: float,
        shed: _Reason | None,
        behind: float = 0.0,
    ) -> tuple[int, bytes]:
        """The status and JSON body answering the predict request ``body`` of ``app`` (errors
        included: a 4xx for the client's, 500 for ours); arrival and ``shed`` as in
        :meth:`_predict_at`. The door's fast lane runs it straight from the HTTP protocol."""
        try:
            return 200, await self._predict_json(app, body, t0, p0, shed, behind)
        except Exception as exc:  # noqa: BLE001 - every error is an answer for the client
            status, payload, _ = _error_reply(exc, "POST", f"/{app.name}/predict")
            return status, payload

    async def _predict_json(
        self,
        app: AppRuntime,
        body: bytes,
        t0: float,
        p0: float,
        shed: _Reason | None,
        behind: float,
    ) -> bytes:
        if shed is not None and b'"inputs"' not in body:  # one query: no need to parse it
            return self.shed_payload(app, shed, p0)
        data = _parse_json(body)
        if type(data) is not dict or ("input" in data) == ("inputs" in data):
            app.metrics.client_errors += 1
            raise HTTPError(
                422,
                'the body must be a JSON object with exactly one of "input" (one query) or '
                '"inputs" (a list of queries), e.g. {"input": [0.1, 0.2]}',
            )
        # the model must be done early enough for the answer to get past the loop's backlog
        # and the passes that held the request up: its deadline (and admission, the deadline
        # timer, late drops) moves up by that much
        front = self.frontend
        ticket = front.wait(t0 + app.budget_s)
        t0 -= front.backlog_s() + max(0.0, behind - _JITTER_S)
        try:
            if "input" in data:
                result = await app.answer(data["input"], t0)
            else:
                result = await self._predict_many(app, data["inputs"], t0, shed)
        except InputError as exc:
            app.metrics.client_errors += 1
            raise HTTPError(422, str(exc)) from None
        finally:
            front.done(ticket)
        elapsed = perf_counter() - p0
        result["latency_ms"] = elapsed * 1e3
        m = app.metrics
        m.latency.observe(elapsed)
        if elapsed > app.slo_s:
            m.slo_misses += 1
        try:
            return dumps(result)
        except TypeError as exc:
            raise OutputError(
                f"app {app.name!r}: the model output is not JSON-serializable ({exc}); return "
                "lists, numbers, strings or numpy arrays"
            ) from None

    async def _predict_many(
        self, app: AppRuntime, xs: Any, t0: float, shed: _Reason | None = None
    ) -> dict[str, Any]:
        if type(xs) is not list or not xs:
            raise InputError('"inputs" must be a non-empty list of inputs, e.g. [[0.1], [0.2]]')
        if len(xs) > self.config.max_inputs:
            raise InputError(
                f'"inputs" holds {len(xs)} queries; the limit is {self.config.max_inputs} per '
                "request (max_inputs in the server config); split the request"
            )
        if shed is not None:
            results: list[Any] = [app.default_answer(app.refused(shed), shed) for _ in xs]
        else:
            results = await asyncio.gather(*(app.answer(x, t0) for x in xs), return_exceptions=True)
        for i, r in enumerate(results):
            if isinstance(r, InputError):
                raise InputError(f"inputs[{i}]: {r}")
            if isinstance(r, BaseException):
                raise r
        return {
            "query_ids": [r["query_id"] for r in results],
            "outputs": [r["output"] for r in results],
            "default": [r["default"] for r in results],
            "models": [r["model"] for r in results],
            "cached": [r["cached"] for r in results],
            "confidence": [r["confidence"] for r in results],
        }

    def _feedback(self, app: AppRuntime, data: Any) -> dict[str, Any]:
        usage = 'send {"query_id": "<id from predict>", "label": y} or {"input": x, "label": y}'
        if type(data) is not dict or "label" not in data:
            raise HTTPError(422, f"feedback needs a JSON object with a 'label'; {usage}")
        qid = data.get("query_id")
        if qid is not None and not isinstance(qid, str):
            raise HTTPError(422, f"query_id must be a string; {usage}")
        if qid is None and "input" not in data:
            raise HTTPError(422, f"feedback needs 'query_id' or 'input'; {usage}")
        try:
            return app.feedback(qid, data.get("input"), data["label"])
        except LookupError as exc:
            raise HTTPError(404, str(exc.args[0])) from None
        except InputError as exc:
            raise HTTPError(422, str(exc)) from None

    # ---- health and metrics ----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Readiness plus a one-line view of every model's replicas.

        ``"status": "ok"`` once every configured model has loaded and run its warm-up batch
        (the server starts listening only then, so a client that can connect gets a ready
        server); ``"starting"`` before.
        """
        ready = self.started and all(rt.ready for rt in self.models.values())
        return {
            "status": "ok" if ready else "starting",
            "apps": sorted(self.apps),
            "models": {
                name: {
                    "version": rt.version,
                    "ready": rt.ready,
                    "replicas_alive": sum(1 for s in rt._slots if s.replica.alive),
                    "replicas": len(rt._slots),
                }
                for name, rt in sorted(self.models.items())
            },
        }

    def metrics_text(self) -> str:
        """Every counter in the Prometheus text format."""
        queues = {rt.key: rt.queue_length for rt in self.models.values()}
        models = {k: (m, queues.get(k, 0)) for k, m in self.model_metrics.items()}
        apps = {n: a.metrics for n, a in self.apps.items()}
        extra = {
            "cache_entries": len(self.cache),
            "cache_capacity": self.cache.capacity,
            "loop_lag_seconds": self.lag.lag_s,
            "loop_lag_max_seconds": self.lag.max_lag_s,
            "frontend_inflight": self.frontend.inflight,
            "frontend_waiting": self.frontend.waiting,
            "frontend_cost_seconds": self.frontend.cost_s,
            "frontend_cpu_share": self.frontend.share,
            "frontend_deferred_reads_total": self.intake.deferred,
        }
        return render(apps, models, extra)

    # ---- running ---------------------------------------------------------------------------

    def _uvicorn(self, *, log_level: str = "warning") -> Any:
        import importlib.util

        import uvicorn

        from mlcycle.serve.online._accept import server_class

        has = importlib.util.find_spec
        if has("httptools"):
            from mlcycle.serve.online._shed import protocol_class

            http: Any = protocol_class(self)  # httptools, with defaults decided at the door
        else:
            http = "h11"
        return server_class()(  # uvicorn's, accepting every pending connection per loop pass
            uvicorn.Config(
                self,
                loop="uvloop" if has("uvloop") else "asyncio",
                http=http,
                lifespan="on",
                access_log=False,
                proxy_headers=False,  # no X-Forwarded-* rewriting layer per request
                server_header=False,
                log_level=log_level,
                timeout_graceful_shutdown=5,
            )
        )

    def run(self, host: str | None = None, port: int | None = None, *, announce: bool = True):
        """Serve until SIGINT or SIGTERM (blocking); replicas stop with the server.

        Args:
            host: address to bind (default: the config's, 127.0.0.1).
            port: port to bind; 0 picks a free one (default: the config's, 8000).
            announce: print "mlcycle serve: listening on URL" once the models are up.
        """
        import sys

        sock = bind_socket(host or self.config.host, self.config.port if port is None else port)
        self.url = _url(sock)
        self._announce = announce
        self._own_gc = True  # this process is the server's own: collect between bursts
        if self.config.switch_interval_ms is not None:
            sys.setswitchinterval(self.config.switch_interval_ms / 1e3)
        self._uvicorn().run(sockets=[sock])


def settle_heap(*, collect: bool) -> None:
    """Move every object alive now out of the garbage collector's sight (``gc.freeze``).

    A server process holds hundreds of thousands of long-lived objects once torch and the
    models are loaded, and a full collection walks them all: 120-150 ms here, during which the
    event loop and every model thread stand still, so a query that arrives then misses a
    50 ms SLO whatever admission control does. Frozen, they are never walked again; full
    collections then see only what serving itself keeps (little: see ``QueryLog``). Called
    once the models are up (after a collection, so that start-up garbage is not frozen) and
    after each deploy at runtime (without one: that would pause the serving loop).
    """
    if collect:
        gc.collect()
    gc.freeze()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot bind {host}:{port} ({exc.strerror}); pick another --port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def serve_in_thread(
    config: Server | ServerConfig | dict[str, Any] | str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 300.0,
) -> Iterator[str]:
    """Run a server in a background thread (its own event loop) and yield its base URL.

    For tests and demos: ``with serve_in_thread(cfg) as url: httpx.post(f"{url}/app/predict",
    ...)``. The server and its replicas stop when the block exits.

    Raises:
        RuntimeError: when the server fails to start (e.g. a model factory fails).
    """
    server = config if isinstance(config, Server) else Server(config)
    sock = bind_socket(host, port)
    server.url = _url(sock)
    uv = server._uvicorn(log_level="error")
    failure: list[BaseException] = []

    def main() -> None:
        try:
            uv.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a failed startup too
            failure.append(exc)

    thread = threading.Thread(target=main, name="mlcycle-serve", daemon=True)
    thread.start()
    import time

    deadline = time.monotonic() + startup_timeout_s
    while not uv.started:
        if not thread.is_alive():
            sock.close()
            why = server.startup_error or (repr(failure[0]) if failure else "unknown reason")
            raise RuntimeError(f"the server failed to start: {why}")
        if time.monotonic() > deadline:
            uv.should_exit = True
            thread.join(10)
            raise RuntimeError(f"the server did not start within {startup_timeout_s} s")
        time.sleep(0.01)
    try:
        yield server.url
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
