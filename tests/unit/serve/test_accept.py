"""Accepting connections in batches: every pending connection per readable event."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mlcycle.serve.online._accept import Acceptor


class _Echo(asyncio.Protocol):
    made: list[_Echo] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _Echo.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_one_readable_event_accepts_every_pending_connection(loop_kind: str) -> None:
    """uvloop's own server takes one connection per loop pass (under load, a pass per
    connection ahead); the acceptor empties the kernel's queue in one go."""
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    sock = _listener()
    port = sock.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]  # queued
    _Echo.made = []
    try:

        async def main() -> None:
            acceptor = Acceptor(asyncio.get_running_loop(), sock, _Echo)
            acceptor._accept()  # one readable event
            with pytest.raises(BlockingIOError):  # nothing left in the accept queue
                sock.accept()
            assert len(acceptor._tasks) == 64
            await acceptor.wait_closed()
            assert len(_Echo.made) == 64
            for c in clients:  # each connection is served by its protocol
                c.sendall(b"ping")
            for c in clients:
                c.settimeout(5)
                reply = b""
                while len(reply) < 4:
                    reply += await asyncio.get_running_loop().run_in_executor(None, c.recv, 4)
                assert reply == b"PING"
            acceptor.close()
            late = socket.create_connection(("127.0.0.1", port))  # queued, never accepted
            await asyncio.sleep(0.05)
            assert len(_Echo.made) == 64
            late.close()
            for p in _Echo.made:
                p.transport.close()

        loop.run_until_complete(main())
    finally:
        for c in clients:
            c.close()
        sock.close()
        loop.close()
