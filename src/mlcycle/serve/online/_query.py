"""What waits in a model's queue: a query with its deadline, and why one got no answer.

Split from :mod:`mlcycle.serve.online._runtime`, which re-exports these names.
"""

from __future__ import annotations

import asyncio
from typing import Any


class _Reason:
    """A marker that a query got no model answer, and why."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"<no answer: {self.why}>"


TIMEOUT = _Reason("deadline")  # the deadline timer fired first
CRASHED = _Reason("crash")  # the replica crashed twice under the query
REJECTED = _Reason("admission")  # predicted to miss the deadline; never queued
LATE = _Reason("late")  # could no longer finish by its deadline when its batch was formed
STOPPED = _Reason("undeployed")  # the model went away while the query waited
PROBE_AFTER = 8  # late drops in a row, no batch between: run the next one (the fit may be stale)


class InputRejected(Exception):
    """The model raised on this input alone; the message says why (a 422 for the client)."""


class Query:
    """One input waiting for one model."""

    __slots__ = ("input", "future", "deadline", "retried", "timer", "digest")

    def __init__(
        self, x: Any, future: asyncio.Future[Any], deadline: float, digest: bytes | None
    ) -> None:
        self.input = x
        self.future = future
        self.deadline = deadline
        self.retried = False
        self.timer: asyncio.TimerHandle | None = None
        self.digest = digest


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(TIMEOUT)
