"""A minimal HTTP/1.1 keep-alive client for the load generator: POST bytes, read the answer.

Why not aiohttp: a load generator on one core must send and read bursts of hundreds of queries
within a few ms, or it charges its own lag to the server. aiohttp spends ~0.15-0.25 ms of CPU per
query (its request and response objects, header multidicts, timers); this client spends a small
fraction of that, because the request bytes are built once per body and a response is parsed
only as far as its status line and Content-Length (chunked bodies are read too). It speaks just
enough HTTP/1.1 for JSON APIs on loopback: one request in flight per connection (no
pipelining), a pool of keep-alive connections opened ahead of time, reconnects when the server
closed an idle one.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any
from urllib.parse import urlsplit

__all__ = ["RawHTTPClient"]

_MAX_HEADER_BYTES = 64 * 1024


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.buf = bytearray()
        self.closed = False
        self.got_bytes = False  # any byte of the current answer arrived
        self.keep_alive = True

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc or 'EOF'}"))

    def eof_received(self) -> bool:
        return False  # close the transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = self._parse()
        except ValueError as exc:
            waiter.set_exception(ConnectionError(f"bad HTTP answer: {exc}"))
            self.close()
            return
        if parsed is not None:
            waiter.set_result(parsed)

    # -- parsing
    def _parse(self) -> tuple[int, bytes] | None:
        """(status, body) once the whole answer is in the buffer, else None."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEADER_BYTES:
                raise ValueError("headers longer than 64 KiB")
            return None
        head = bytes(self.buf[:end]).split(b"\r\n")
        status = int(head[0].split(None, 2)[1])
        length, chunked = None, False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                self.keep_alive = False
        start = end + 4
        if chunked:
            body, used = self._dechunk(start)
            if body is None:
                return None
            del self.buf[:used]
            return status, body
        if length is None:
            if status in (204, 304) or 100 <= status < 200:
                length = 0
            else:  # the body runs to the end of the connection
                self.keep_alive = False
                return None
        if len(self.buf) < start + length:
            return None
        body = bytes(self.buf[start : start + length])
        del self.buf[: start + length]
        return status, body

    def _dechunk(self, pos: int) -> tuple[bytes | None, int]:
        out = bytearray()
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None, 0
            size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                trailer_end = self.buf.find(b"\r\n", pos)
                if trailer_end < 0:
                    return None, 0
                return bytes(out), trailer_end + 2
            if len(self.buf) < pos + size + 2:
                return None, 0
            out += self.buf[pos : pos + size]
            pos += size + 2

    # -- use
    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.got_bytes = False
        self.buf.clear()
        if self.transport is None or self.closed:
            self.waiter.set_exception(ConnectionError("connection closed"))
        else:
            self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _chain(source: asyncio.Future[tuple[int, bytes]], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


def _expire(waiter: asyncio.Future[tuple[int, bytes]]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer within the client timeout"))


class RawHTTPClient:
    """POST JSON bodies to one ``http://`` URL over a pool of keep-alive connections.

    ``await client.post(body)`` returns ``(status, response body)`` and raises
    ``ConnectionError`` or ``TimeoutError``. At most ``max_connections`` connections are open;
    a query finding none free waits for one (the wait counts in its latency). ``prewarm``
    connections are opened by :meth:`start` so that a burst does not pay for TCP handshakes.
    """

    def __init__(
        self, url: str, *, max_connections: int = 1024, timeout_s: float = 30.0, prewarm: int = 0
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be http://host:port/path, got {url!r}")
        if not (isinstance(max_connections, int) and max_connections >= 1):
            raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.prewarm = min(prewarm, max_connections)
        self._idle: list[_Connection] = []
        self._open = 0
        self._free = asyncio.Condition()  # binds to the running loop on first use
        self._waiting = 0  # queries waiting for a connection
        self._requests: dict[bytes, bytes] = {}

    def _request(self, body: bytes) -> bytes:
        req = self._requests.get(body)
        if req is None:
            head = (
                f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            req = head.encode("latin-1") + body
            if len(self._requests) < 4096:
                self._requests[body] = req
        return req

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    async def start(self) -> None:
        """Open the ``prewarm`` connections (failures are left for the queries to meet)."""
        if self.prewarm:
            results = await asyncio.gather(
                *(self._connect() for _ in range(self.prewarm)), return_exceptions=True
            )
            for conn in results:
                if isinstance(conn, _Connection):
                    self._open += 1
                    self._idle.append(conn)

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A connection and whether it was reused (idle in the pool) rather than new."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
            self._open -= 1
        if self._open >= self.max_connections:
            self._waiting += 1
            try:
                async with self._free:
                    await self._free.wait_for(
                        lambda: bool(self._idle) or self._open < self.max_connections
                    )
            finally:
                self._waiting -= 1
            return await self._acquire()
        self._open += 1
        try:
            return await self._connect(), False
        except BaseException:
            self._open -= 1
            await self._notify()
            raise

    async def _notify(self) -> None:
        if self._waiting:
            async with self._free:
                self._free.notify()

    def _put_back(self, conn: _Connection, reusable: bool) -> None:
        """Return ``conn`` to the pool, or close it (not reusable, or the server closes it)."""
        if reusable and not conn.closed and conn.keep_alive:
            self._idle.append(conn)
        else:
            conn.close()
            self._open -= 1

    async def _release(self, conn: _Connection, reusable: bool) -> None:
        self._put_back(conn, reusable)
        await self._notify()

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body``; ``(status, response body)``."""
        data = self._request(body)
        for attempt in range(2):
            conn, reused = await self._acquire()
            ok = False
            waiter = conn.send(data)
            timer = waiter.get_loop().call_later(self.timeout_s, _expire, waiter)
            try:
                result = await waiter  # cheaper than asyncio.wait_for, one timer per query
                ok = True
                return result
            except ConnectionError:
                # a pooled connection the server closed while idle: retry once on a new one
                if attempt == 0 and reused and not conn.got_bytes:
                    continue
                raise
            finally:
                timer.cancel()
                await self._release(conn, ok)
        raise ConnectionError("unreachable")  # pragma: no cover

    def post_now(self, body: bytes) -> asyncio.Future[tuple[int, bytes]] | None:
        """POST ``body`` at once on an idle pooled connection, without a task or a timer: the
        future of ``(status, response body)``, or None when no connection is idle (then use
        :meth:`post`). For open-loop senders, which must put a clump of queries on the wire
        within a few ms: a task and a timer per query cost the sender about a third of its
        time. The connection goes back to the pool when the answer is in; a pooled connection
        the server closed while idle is retried once on a new one, as :meth:`post` does."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                self._open -= 1
                continue
            waiter = conn.send(self._request(body))
            result: asyncio.Future[tuple[int, bytes]] = waiter.get_loop().create_future()
            waiter.add_done_callback(partial(self._answered, conn, result=result, body=body))
            return result
        return None

    def _answered(
        self,
        conn: _Connection,
        waiter: asyncio.Future[tuple[int, bytes]],
        *,
        result: asyncio.Future[tuple[int, bytes]],
        body: bytes,
    ) -> None:
        ok = not waiter.cancelled() and waiter.exception() is None
        self._put_back(conn, ok)
        if self._waiting:
            asyncio.ensure_future(self._notify())
        if result.done():  # cut off by the sender
            return
        if ok:
            result.set_result(waiter.result())
        elif not waiter.cancelled() and not conn.got_bytes:  # closed while idle: once more
            retry = asyncio.ensure_future(self.post(body))
            retry.add_done_callback(lambda r: _chain(r, result))
        else:
            result.set_exception(
                ConnectionError("cancelled") if waiter.cancelled() else waiter.exception()  # type: ignore[arg-type]
            )

    async def close(self) -> None:
        """Close every pooled connection."""
        for conn in self._idle:
            with contextlib.suppress(Exception):
                conn.close()
        self._idle.clear()
        self._open = 0
