"""How far behind the event loop runs: the age a request already has when its handler starts.

A server's deadlines start when its handler runs, but a request can wait before that: in the
socket until the loop polls it, then in the loop's ready queue until its task runs. When the
loop is busy (a burst, or more queries than the frontend can parse) that wait is one pass of
the loop over everything ready, and it is invisible to the handler, so a query could be
answered "within its budget" long after its client's SLO had passed. :class:`LoopLag` measures
the pass with a heartbeat: a callback due every ``period_s`` that records how late it ran; a
callback is late by the time the loop spent on other work since it fell due, which is the wait
a request arriving then would have had. The lag is the *least* lateness of the last
``window`` beats, so it is the loop's sustained backlog: a single stall (the process
descheduled by another on a busy machine, after which every request is late whatever the
server does) does not count, while a loop that stays behind (more queries than it can parse)
does. The server starts each query's deadline that much earlier, so under such load it
answers with the default in time instead of answering late, and skipping the model for those
queries frees the loop to catch up. (Measured on a loaded 2-core machine, a Poisson load at
1.7x what the server could take: goodput 210-1160/s with the lag, 13-80/s without it.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

__all__ = ["LoopLag"]


class LoopLag:
    """A heartbeat on an event loop; :attr:`lag_s` is how late it has been running lately.

    Args:
        period_s: the heartbeat's period (the lag is refreshed at least this often).
        window: the lag is the least lateness of this many last beats.
        floor_s: lateness below this counts as none (uvloop's timers tick in whole
            milliseconds, so a callback due now can run up to a millisecond late on an idle
            loop).
    """

    def __init__(self, period_s: float = 0.002, window: int = 6, floor_s: float = 0.001) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0 seconds, got {period_s}")
        if window < 1:
            raise ValueError(f"window must be >= 1 beats, got {window}")
        self.period_s = period_s
        self.floor_s = floor_s
        self._late = [0.0] * window
        self._i = 0
        self.lag_s = 0.0
        self.max_lag_s = 0.0  # the largest lag seen (for /metrics)
        self.beats = 0  # heartbeats so far, and of them those that ran late (past floor_s):
        self.late_beats = 0  # a span in which every beat was late is one the loop was behind
        self._due = math.inf  # the next beat's due time (perf_counter); none when stopped
        self._due_loop = math.inf  # the next beat's due time on the loop's clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.on_beat: Callable[[float], None] | None = None  # called with each beat's lateness

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the heartbeat on ``loop`` (the running loop)."""
        self.stop()
        self._loop = loop
        self._due = time.perf_counter() + self.period_s
        self._due_loop = loop.time() + self.period_s
        self._handle = loop.call_later(self.period_s, self._beat)

    def stop(self) -> None:
        """Stop the heartbeat; the lag reads zero."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.lag_s = 0.0
        self._late = [0.0] * len(self._late)
        self._due = self._due_loop = math.inf

    def _beat(self) -> None:
        now = time.perf_counter()
        late = now - self._due
        lates = self._late
        lates[self._i] = late
        self.beats += 1
        if late > self.floor_s:
            self.late_beats += 1
        self._i = (self._i + 1) % len(lates)
        least = min(lates)
        self.lag_s = least if least > self.floor_s else 0.0
        if late > self.max_lag_s:
            self.max_lag_s = late
        self._due = now + self.period_s
        loop = self._loop
        self._due_loop = loop.time() + self.period_s  # type: ignore[union-attr]
        self._handle = loop.call_later(self.period_s, self._beat)  # type: ignore[union-attr]
        if self.on_beat is not None:
            self.on_beat(late)

    def overdue_s(self) -> float:
        """How far past the next beat's due time the loop is now (negative: not yet due, or
        the heartbeat stopped)."""
        return time.perf_counter() - self._due

    def age_s(self, now: float) -> float:
        """How long a request read at loop time ``now`` may have waited unseen: the sustained
        lag, or, when the loop has been busy past its next beat, how far past it. The least of
        the last beats shows a long pass only once three beats have seen it, so the first pass
        of a burst (a clump read and parsed in one stretch, 10-30 ms here) would otherwise age
        the requests that came in during it by nothing, and their answers and defaults left
        late; a stall that is over (the beat has run) ages nothing after it."""
        over = now - self._due_loop
        return over if over > self.floor_s and over > self.lag_s else self.lag_s
