"""Defaults at the door: refusing a query before its body is parsed, and the frontend's backlog.

Under a burst the HTTP frontend, not the model, is what runs out: on this project's 2-core
machine (server pinned to one core) the batched 1024-unit MLP costs ~0.035 ms per query while
answering one costs the event loop 0.15-0.25 ms of HTTP, JSON and scheduling work. A gamma
(CV 4) clump of a few hundred queries therefore takes longer than a 50 ms SLO to answer even
though the model keeps up, and admission control that looks only at the model's queue lets
them all in. Two things here make the defaults go out in time:

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

import math
import socket
import struct
import time
from collections import deque
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
OVERLOAD = _Reason("overload")  # the frontend's backlog alone would take it past its deadline
ARRIVAL = "mlcycle.arrival"  # scope key: (t0, p0, shed reason or None) set at the door


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


def protocol_class(server: Server) -> type:
    """uvicorn's httptools protocol with the door in front of ``POST /{app}/predict``.

    Only a request that could be answered out of turn safely is decided at the door: a POST
    with a ``content-length`` within ``max_body_bytes``, no ``Expect: 100-continue``, no earlier
    request on the connection still being answered (responses keep their order) and the
    connection not paused for writing. Everything else, and every request the door lets
    through, takes uvicorn's usual path (with its arrival time and shed verdict in the scope).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    ok_head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"

    class SheddingProtocol(HttpToolsProtocol):
        _held: tuple[Any, ...] | None = None
        _chunks: list[bytes]
        _sock: socket.socket | None = None

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
            reason = server.shed_reason(app, t0, now)
            cycle = self.cycle
            if (
                reason is not None
                and (cycle is None or cycle.response_complete)
                and not self.pipeline
                and not self.expect_100_continue
                and not self.flow.write_paused
            ):
                size = _content_length(self.headers)
                if size is not None and size <= server.max_body:
                    self._held = (app, reason, t0, p0)
                    self._chunks = []
                    return
            self._hand_over(t0, p0, reason)

        def _hand_over(self, t0: float, p0: float, reason: _Reason | None) -> None:
            """Start uvicorn's request cycle, with the door's findings in the scope."""
            started = self.cycle is None or self.cycle.response_complete
            super().on_headers_complete()
            if started and self.cycle is not None and self.cycle.scope is self.scope:
                self.scope[ARRIVAL] = (t0, p0, reason)  # type: ignore[literal-required]
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
            app, reason, t0, p0 = held
            if b'"inputs"' in body:  # a list of queries: answered in its own shape by the app
                self._hand_over(t0, p0, reason)
                if body:
                    super().on_body(body)
                super().on_message_complete()
                return
            payload = server.shed_payload(app, reason, p0)
            keep = self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"
            head = [ok_head]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            if not keep:
                head.append(b"connection: close\r\n")
            head += [b"content-length: ", str(len(payload)).encode(), b"\r\n\r\n", payload]
            self.transport.write(b"".join(head))
            server.frontend.shed()
            if not keep:
                self.transport.close()
                return
            self.on_response_complete()

    SheddingProtocol.__name__ = SheddingProtocol.__qualname__ = "SheddingProtocol"
    return SheddingProtocol
