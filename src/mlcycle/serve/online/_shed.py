"""The door: defaults before a body is parsed, the fast lane for the rest, sliced reading.

Under a burst the HTTP frontend, not the model, is what runs out: on this project's 2-core
machine (server pinned to one core) the batched 1024-unit MLP costs ~0.035 ms per query while
answering one costs the event loop 0.15-0.25 ms of HTTP, JSON and scheduling work. A gamma
(CV 4) clump of a few hundred queries therefore takes longer than a 50 ms SLO to answer even
though the model keeps up, and admission control that looks only at the model's queue lets
them all in. Several things here make the answers and defaults go out in time:

- :class:`FrontendLoad` counts the predict requests the frontend holds (read, not yet answered;
  those parsed and waiting for their model count half) and measures what one costs the process
  (CPU seconds per request over windows of at least 64 requests and 50 ms; see the class). On a
  shared machine the process gets only part of its core: the share it got in windows where the
  event loop had work all along (its heartbeat late at every beat) turns CPU time into wall
  time. The result is the work queued ahead of a new request. A request let in waits about
  that long to be parsed and then has its model deadline moved up by it
  (``Server._predict_at``), so that its answer, or the deadline timer's default, still has time
  to get past the loop's queue; so when the backlog exceeds ``headroom`` (half) of the time
  between the model's predicted finish and its deadline, the request gets the default (reason
  ``"overload"``) instead of a place in the line, and likewise when the parsing queued ahead of
  it would hold up the answers of requests let in before it past half of their time left.
- :func:`protocol_class` decides at the HTTP protocol, when a request's headers are in: if the
  app's deadline cannot be met (the backlog above, or every linked model's queue refusing at
  admission), the body is never parsed, no ASGI task or scope is made, and a response built
  from pre-encoded pieces is written straight to the socket. Profiled with py-spy (refused
  queries at 32 closed-loop clients), the ASGI path spent ~19% of the loop's time parsing the
  JSON body, ~26% in uvicorn's ``send`` and ~10% making the request's cycle and task; the door
  skips all three (server CPU per refused query 0.062-0.087 ms before, 0.041-0.046 ms after,
  on a loaded 2-core machine).

A request the door lets in takes the fast lane (:func:`run_now` from the protocol, see
``protocol_class``); reading is done in slices between timers and answers (:class:`Intake`).

A request's age is the older of two: the loop's lag (:class:`LoopLag`) and how long ago the
kernel received it (:func:`received_age_s`), which also sees a socket left unread through
passes of the loop that ran their timers on time.

A shed query still counts everywhere an answered one does: the app's requests, its defaults by
reason, its latency histogram and SLO misses, and the query log (so ``/feedback`` on its id
works). Its body is not read as JSON, so under overload a malformed body gets the default
rather than a 400/422, and a cached answer is not looked up (the lookup needs the parsed
input, and parsing is the work that is short).
"""

from __future__ import annotations

import logging
import math
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from mlcycle.serve.online._query import _Reason

if TYPE_CHECKING:
    from mlcycle.serve.online._lag import LoopLag
    from mlcycle.serve.online.server import Server

# struct tcp_info (linux/tcp.h): tcpi_last_data_recv, milliseconds since the last data came in,
# counted in kernel clock ticks (4 ms at HZ=250, 1 ms at HZ=1000; the coarser one is assumed)
_LAST_DATA_RECV = struct.Struct("<I")
_LAST_DATA_RECV_AT = 52
_TCP_INFO_LEN = 56
_TICK_S = 0.004
_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only: elsewhere the loop's lag alone
log = logging.getLogger("mlcycle.serve")

OVERLOAD = _Reason("overload")  # the frontend's backlog alone would take it past its deadline
ARRIVAL = "mlcycle.arrival"  # scope key: (t0, p0, shed reason or None, lag) set at the door


class FrontendLoad:
    """The predict requests the frontend holds, and the process CPU time one costs.

    The cost is measured over windows of at least ``window`` requests *and* ``min_span_s``
    seconds: the CPU time of a window is that of the requests that went through it only when
    it spans several model batches and loop passes. Counted per 64 requests that left, a
    window could be one batch's answers leaving together (their response work, none of their
    parsing, 2-3 ms of CPU for 64 requests) and read a third of the true cost; and since a
    window with defaults could only lower the estimate, under sustained load it ratcheted
    down to the cheapest such window (0.085 ms against 0.17-0.23 ms a few hundred ms earlier,
    in a Poisson run at 5,429/s), the door let in more than the loop could answer in time,
    and most queries got their defaults late, after all their parsing (83% defaults, 5% of
    them at the door; p99 2.4 s). Now a request counts half when it enters and half
    when it leaves, a default at the door ``door_cost`` of one, and every window counts
    alike: a busy one (the process ran at least ``min_busy`` of it, or the loop was behind at
    every heartbeat) moves the estimate toward what it measured, an idle one can only lower it
    (its CPU time over its requests bounds their cost from above, so an estimate too high,
    which sheds everything and leaves the process idle, corrects itself).

    Args:
        window: requests per measurement of :attr:`cost_s` (at least).
        min_span_s: seconds per measurement (at least).
        min_busy: a window is busy when the process ran at least this share of its wall
            time, or the loop was behind all along (at low load the heartbeat and idle
            wake-ups would inflate the cost).
        lag: the event loop's heartbeat; a window in which every beat was late (the loop had
            work all along) measures :attr:`share`.
        headroom: the share of the time left to a deadline that the backlog may fill.
        door_cost: what a default at the door costs the process, as a share of a request
            through the app (0.041-0.046 ms against 0.15-0.25 ms measured here).
    """

    __slots__ = (
        "inflight",
        "waiting",
        "cost_s",
        "share",
        "window",
        "min_span_s",
        "min_busy",
        "lag",
        "headroom",
        "door_cost",
        "_dues",
        "_n",
        "_units",
        "_cpu0",
        "_wall0",
        "_beats0",
        "_late0",
    )
    # _n: requests that left the frontend in this window, _units: the requests' worth of work
    # done in it (half at entry, half at leaving, door_cost per default at the door)

    def __init__(
        self,
        window: int = 64,
        min_span_s: float = 0.05,
        min_busy: float = 0.5,
        lag: LoopLag | None = None,
        headroom: float = 0.5,
        door_cost: float = 0.25,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 requests, got {window}")
        if min_span_s < 0.0:
            raise ValueError(f"min_span_s must be >= 0 seconds, got {min_span_s}")
        if not 0.0 < headroom <= 1.0:
            raise ValueError(f"headroom must be in (0, 1] (of the time left), got {headroom}")
        if not 0.0 < door_cost <= 1.0:
            raise ValueError(f"door_cost must be in (0, 1] (of a request's cost), got {door_cost}")
        self.inflight = 0  # predict requests read and not yet answered
        self.waiting = 0  # of them, those parsed and handed to a model (half their work done)
        self.cost_s = 0.0  # process CPU seconds per request under load; 0 until measured
        self.share = 1.0  # of the wall time, the CPU time the process gets when it has work
        self.window = window
        self.min_span_s = min_span_s
        self.min_busy = min_busy
        self.lag = lag
        self.headroom = headroom
        self.door_cost = door_cost
        self._dues: deque[list[Any]] = deque()  # [deadline, waiting] of waiting requests, in order
        self.restart()

    def restart(self) -> None:
        """Start a fresh window (the server starts serving: loading the models is no request's
        cost)."""
        self._n = 0
        self._units = 0.0
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        lag = self.lag
        self._beats0, self._late0 = (lag.beats, lag.late_beats) if lag is not None else (0, 0)

    def backlog_s(self) -> float:
        """Seconds of work the frontend has in hand (what a request read now waits behind): a
        request not yet parsed counts whole, one waiting for its model's output half (its
        answer and the model's share of the CPU are still to come)."""
        return (self.inflight - 0.5 * self.waiting) * self.cost_s / self.share

    def ahead_s(self) -> float:
        """Seconds of parsing queued in the loop ahead of a request read now: the requests
        not yet parsed, and it. A waiting request's answer (or default) comes after them."""
        return (self.inflight - self.waiting + 1) * self.cost_s / self.share

    def enter(self) -> None:
        self.inflight += 1
        self._units += 0.5

    def wait(self, deadline: float) -> list[Any]:
        """A held request was parsed and handed to its models; it must be answered by
        ``deadline`` (loop time). Returns its ticket for :meth:`done`."""
        self.waiting += 1
        ticket = [deadline, True]
        self._dues.append(ticket)
        return ticket

    def done(self, ticket: list[Any]) -> None:
        """The models are done with a waiting request (its answer is being sent)."""
        self.waiting -= 1
        ticket[1] = False

    def earliest_s(self, now: float) -> float:
        """The earliest deadline (loop time) of the waiting requests that can still meet it,
        or infinity."""
        dues = self._dues
        while dues and (not dues[0][1] or dues[0][0] <= now):
            dues.popleft()
        return dues[0][0] if dues else math.inf

    def leave(self) -> None:
        """A held request was answered (with the model's output or a default)."""
        self.inflight -= 1
        self._units += 0.5
        self._n += 1
        if self._n >= self.window and time.perf_counter() - self._wall0 >= self.min_span_s:
            self._measure()

    def shed(self) -> None:
        """A request was answered at the door."""
        self._units += self.door_cost
        self._n += 1
        if self._n >= self.window and time.perf_counter() - self._wall0 >= self.min_span_s:
            self._measure()

    def _measure(self) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        busy_s, span_s = cpu - self._cpu0, wall - self._wall0
        behind = False
        lag = self.lag
        if lag is not None:
            beats = lag.beats - self._beats0
            behind = beats >= 2 and lag.late_beats - self._late0 == beats
        if behind and span_s > 0.0:
            got = min(1.0, max(0.1, busy_s / span_s))
            self.share = 0.7 * self.share + 0.3 * got
        if self._units > 0.0 and span_s > 0.0:
            cost = busy_s / self._units
            if behind or busy_s >= self.min_busy * span_s:
                self.cost_s = cost if self.cost_s == 0.0 else 0.7 * self.cost_s + 0.3 * cost
            elif cost < self.cost_s:  # idle time included, an upper bound: the estimate is stale
                self.cost_s = cost
        self.restart()


def received_age_s(sock: socket.socket) -> float:
    """How long ago the kernel received the last data on ``sock`` (a request just read: how
    long it waited unread), less half a clock tick; 0 when unknown.

    The loop's heartbeat (:class:`~mlcycle.serve.online._lag.LoopLag`) sees a request's wait
    only when the loop runs behind its timers, but under a burst a socket can wait unread
    through several passes of the loop that each ran its timers on time (the readable sockets
    of a pass are all read before the next poll, so one that became readable during a long
    pass waits for it to end): in gamma bursts at half of this server's peak, requests let in
    at the door had waited 20-45 ms more than the heartbeat said, and their answers or
    defaults went out past the SLO. The kernel keeps the time of the last data received on
    every TCP connection; reading it costs one ``getsockopt`` (about 1 us).
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)  # type: ignore[arg-type]
    except OSError:
        return 0.0
    return max(0.0, _LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_AT)[0] * 1e-3 - _TICK_S / 2)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class Intake:
    """Reading requests in slices, so that answers and deadline timers are not held up by a
    clump being read.

    uvloop reads every socket that is readable when it polls, one after another, before it
    runs a timer or a callback again; the sockets of a CV-4 clump (a hundred or more, each a
    door decision, a parse or a default) made passes of 20-48 ms here, and the deadline timers
    and model answers due meanwhile waited for the pass to end (timer lateness p99 29 ms, max
    40 ms), so answers and defaults let in on time went out past the SLO. A connection whose
    data comes in when the loop is more than ``slice_s`` past its heartbeat's due time (it
    beats every 2 ms) keeps the data aside, stops reading, and queues here; the rest of the
    pass costs only that, the timers and callbacks due run, and then the queued connections
    are read in arrival order, again until the loop is a slice overdue, and so on. A
    request's age still counts from when the kernel received it (:func:`received_age_s`), so
    the wait shows in its deadline.
    """

    __slots__ = ("lag", "slice_s", "deferred", "_queue", "_scheduled")

    def __init__(self, lag: LoopLag, slice_s: float = 0.001) -> None:
        if slice_s < 0.0:
            raise ValueError(f"slice_s must be >= 0 seconds, got {slice_s}")
        self.lag = lag
        self.slice_s = slice_s
        self.deferred = 0  # connections read later than their data came in (for /metrics)
        self._queue: deque[Any] = deque()
        self._scheduled = False

    def overdue(self) -> bool:
        """The loop is more than a slice past its heartbeat's due time: timers and callbacks
        are waiting for the current pass to end."""
        return self.lag.overdue_s() > self.slice_s

    def defer(self, protocol: Any, loop: Any) -> None:
        """Read ``protocol``'s kept-aside data later (it calls this once, then waits)."""
        self._queue.append(protocol)
        self.deferred += 1
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._read, loop)

    def _read(self, loop: Any) -> None:
        self._scheduled = False
        queue = self._queue
        end = time.perf_counter() + self.slice_s  # at least a slice per turn: no starving
        while queue and (time.perf_counter() < end or not self.overdue()):
            queue.popleft().read_kept()
        if queue:  # the next slice comes after the timers and callbacks now due
            self._scheduled = True
            loop.call_soon(self._read, loop)


class _NoEvent:
    def set(self) -> None:
        pass


class _Answering:
    """Stands in for uvicorn's request cycle while the fast lane answers a request: uvicorn
    queues a request pipelined behind it (the cycle is not complete), tells it of a lost
    connection, and on a graceful shutdown asks it not to keep the connection."""

    __slots__ = ("response_complete", "keep_alive", "disconnected")
    message_event = _NoEvent()

    def __init__(self, keep_alive: bool) -> None:
        self.response_complete = False
        self.keep_alive = keep_alive
        self.disconnected = False


_INTERNAL = (500, b'{"error":"internal error: the answer failed; see the server log"}')
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
        _STATUS_LINES[status] = line
    return line


def run_now(coro: Coroutine[Any, Any, Any], done: Callable[[Any], None], loop: Any) -> None:
    """Run ``coro`` up to its first wait now, and on from the done-callbacks of the futures it
    waits on; ``done(result)`` at its end (``done(None)`` if it raised, logged).

    A task would start from the loop's ready queue, after the rest of the current pass: under
    a burst, the sockets still to be read in it (each a door decision) and the tasks queued
    before it (tens of ms in a CV-4 clump). Run from the HTTP protocol, a request is parsed
    and queued for its model as soon as its body is in. Only the first step differs from a
    task: later ones follow the awaited future's callbacks, as a task's would.
    """
    try:
        fut = coro.send(None)
    except StopIteration as stop:
        done(stop.value)
        return
    except Exception:
        log.exception("mlcycle serve: a request's handler failed")
        done(None)
        return
    if fut is None:  # a bare yield (asyncio.sleep(0)): on the next pass
        loop.call_soon(run_now, coro, done, loop)
        return
    if getattr(fut, "_asyncio_future_blocking", None) is None:
        coro.close()
        log.error("mlcycle serve: a request's handler awaited %r, not an asyncio future", fut)
        done(None)
        return
    fut._asyncio_future_blocking = False  # what a task does with an awaited future
    fut.add_done_callback(lambda _fut: run_now(coro, done, loop))


def protocol_class(server: Server) -> type:
    """uvicorn's httptools protocol with the door in front of ``POST /{app}/predict``.

    Only a request that could be answered out of turn safely is decided at the door: a POST
    with a ``content-length`` within ``max_body_bytes``, no ``Expect: 100-continue``, no earlier
    request on the connection still being answered (responses keep their order) and the
    connection not paused for writing. Such a request gets the pre-encoded default, or takes
    the fast lane: its handler (``Server.predict_body``) runs from the protocol as soon as the
    body is in, and its answer is written straight to the socket, while a stand-in cycle
    (:class:`_Answering`) keeps a request pipelined behind it in uvicorn's queue. Everything
    else takes uvicorn's usual path (with its arrival time and shed verdict in the scope).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    intake = server.intake

    class SheddingProtocol(HttpToolsProtocol):
        _held: tuple[Any, ...] | None = None
        _chunks: list[bytes]
        _sock: socket.socket | None = None
        _kept: list[bytes] | None = None  # data kept aside until the intake's next slice

        def data_received(self, data: bytes) -> None:
            if self._kept is not None:  # came in after the pause: behind what is kept
                self._kept.append(data)
                return
            if intake.overdue():
                self._kept = [data]
                self.flow.pause_reading()
                intake.defer(self, self.loop)
                return
            super().data_received(data)

        def read_kept(self) -> None:
            """Read the data kept aside (the intake's turn for this connection)."""
            kept, self._kept = self._kept, None
            if kept is None or self.transport.is_closing():
                return
            self.flow.resume_reading()
            super().data_received(b"".join(kept))

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if _TCP_INFO is None:
                return
            try:  # our own object on uvloop's descriptor (its pseudo-socket costs 3x more)
                fd = transport.get_extra_info("socket").fileno()
                self._sock = socket.socket(fileno=fd) if fd >= 0 else None
            except (AttributeError, OSError):
                self._sock = None

        def connection_lost(self, exc: Exception | None) -> None:
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.detach()  # the descriptor is uvloop's to close
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            url = self.url
            if not url.endswith(b"/predict") or self.parser.get_method() != b"POST":
                super().on_headers_complete()
                return
            app = server.door_app(url)
            if app is None:
                super().on_headers_complete()
                return
            now = self.loop.time()
            lag = server.lag.age_s(now)
            if self._sock is not None:  # the loop's lag misses what waited in the socket
                lag = max(lag, received_age_s(self._sock))
            t0, p0 = now - lag, time.perf_counter() - lag
            reason = server.shed_reason(app, t0, now, lag)
            cycle = self.cycle
            if (
                (cycle is None or cycle.response_complete)
                and not self.pipeline
                and not self.expect_100_continue
                and not self.flow.write_paused
            ):
                size = _content_length(self.headers)
                if size is not None and size <= server.max_body:
                    self._held = (app, reason, t0, p0, lag)
                    self._chunks = []
                    return
            self._hand_over(t0, p0, reason, lag)

        def _hand_over(self, t0: float, p0: float, reason: _Reason | None, lag: float) -> None:
            """Start uvicorn's request cycle, with the door's findings in the scope."""
            started = self.cycle is None or self.cycle.response_complete
            super().on_headers_complete()
            if started and self.cycle is not None and self.cycle.scope is self.scope:
                self.scope[ARRIVAL] = (t0, p0, reason, lag)  # type: ignore[literal-required]
                server.frontend.enter()  # left in Server.__call__, whatever happens

        def on_body(self, body: bytes) -> None:
            if self._held is not None:
                self._chunks.append(body)
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            held = self._held
            if held is None:
                super().on_message_complete()
                return
            self._held = None
            body = b"".join(self._chunks)
            self._chunks = []
            app, reason, t0, p0, lag = held
            keep = self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"
            if reason is not None and b'"inputs"' not in body:  # the default, pre-encoded
                self._respond(200, server.shed_payload(app, reason, p0), keep)
                server.frontend.shed()
                return
            # the fast lane: parsed and queued for its model now, answered from the model's
            # output (a request pipelined behind it waits in uvicorn's queue meanwhile)
            server.frontend.enter()
            answering = _Answering(keep)
            self.cycle = answering  # type: ignore[assignment]
            run_now(
                server.predict_body(app, body, t0, p0, reason, lag),
                lambda result: self._answered(answering, result),
                self.loop,
            )

        def _answered(self, answering: _Answering, result: tuple[int, bytes] | None) -> None:
            server.frontend.leave()
            answering.response_complete = True
            if answering.disconnected or self.transport.is_closing():
                return  # counted all the same; nobody to tell
            status, payload = result if result is not None else _INTERNAL
            self._respond(status, payload, answering.keep_alive)

        def _respond(self, status: int, payload: bytes, keep: bool) -> None:
            """Write a JSON response and finish the request, keeping the connection or not."""
            head = [_status_line(status), b"content-type: application/json\r\n"]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            if not keep:
                head.append(b"connection: close\r\n")
            head += [b"content-length: ", str(len(payload)).encode(), b"\r\n\r\n", payload]
            self.transport.write(b"".join(head))
            if not keep:
                self.transport.close()
                return
            self.on_response_complete()

    SheddingProtocol.__name__ = SheddingProtocol.__qualname__ = "SheddingProtocol"
    return SheddingProtocol
