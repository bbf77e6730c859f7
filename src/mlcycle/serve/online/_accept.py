"""Accepting connections: every pending one each time the listening socket is readable.

uvloop's servers accept one connection per pass of the event loop. An idle loop passes in
microseconds, but a loaded one passes every 0.2-2 ms, so a burst that opens a few hundred
connections at once (a load balancer's pool growing, or clients of a clump finding no idle
keep-alive connection) waits in the kernel's accept queue for up to a pass per connection
ahead of it. Measured here with a uvloop server whose loop was busy in 2 ms passes, 200
simultaneous connections were all accepted only after 408 ms; in a gamma (CV 4) burst at half
of this server's peak, the queries that came on new connections waited 50-280 ms before the
server saw them, far past a 50 ms SLO, and since the loop itself was not behind, nothing told
the server they were old. :class:`Acceptor` accepts in a loop until the queue is empty, so the
same 200 connections are all in within 16 ms, and hands each to the loop
(``connect_accepted_socket``) with the same protocol uvicorn would have used.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["Acceptor", "server_class"]

log = logging.getLogger("mlcycle.serve")

_RETRY = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}  # that connection is gone: next one


class Acceptor:
    """Accepts the connections of a listening socket in batches, on the running loop.

    It stands in for the ``asyncio.Server`` uvicorn keeps for each socket (``close`` and
    ``wait_closed`` are what uvicorn calls on shutdown). The socket itself stays open: it
    belongs to whoever bound it.

    Args:
        loop: the running event loop.
        sock: a bound, listening socket (it is set non-blocking).
        protocol_factory: makes the protocol of one connection.
        batch: the most connections accepted per readable event (others wait one pass).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        batch: int = 1024,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = protocol_factory
        self.batch = batch
        self._tasks: set[asyncio.Task[Any]] = set()
        self._open = True
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        sock, loop = self.sock, self.loop
        for _ in range(self.batch):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RETRY:
                    continue
                # out of file descriptors or similar: leave the rest queued, retry next pass
                log.warning("mlcycle serve: accept failed (%s); retrying", exc)
                return
            task = loop.create_task(loop.connect_accepted_socket(self.factory, conn))
            self._tasks.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("mlcycle serve: a connection failed to start: %s", task.exception())

    def close(self) -> None:
        """Stop accepting (connections already accepted go on)."""
        if self._open:
            self._open = False
            self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def server_class() -> type:
    """uvicorn's ``Server`` accepting with :class:`Acceptor` on the sockets it is given."""
    import uvicorn

    class BatchAcceptServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            if sockets is None:  # uvicorn binds its own socket: its own server accepts
                await super().startup(sockets)
                return
            await super().startup(sockets=[])  # the lifespan, and no server of its own
            if self.should_exit:
                return
            loop = asyncio.get_running_loop()
            config, state, app_state = self.config, self.server_state, self.lifespan.state

            def factory() -> asyncio.Protocol:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=state, app_state=app_state, _loop=loop
                )

            self.servers = [Acceptor(loop, s, factory) for s in sockets]  # type: ignore[misc]

    BatchAcceptServer.__name__ = BatchAcceptServer.__qualname__ = "BatchAcceptServer"
    return BatchAcceptServer
