"""The event loop's lag: how old a request already is when its handler runs."""

from __future__ import annotations

import asyncio
import time

import pytest

from mlcycle.serve.online._lag import LoopLag


def test_the_heartbeat_reads_a_loop_that_stays_behind_not_one_stall() -> None:
    async def main() -> None:
        lag = LoopLag(period_s=0.002, window=3)
        lag.start(asyncio.get_running_loop())
        await asyncio.sleep(0.02)
        assert lag.lag_s < 0.030  # an idle loop is (nearly) on time
        time.sleep(0.050)  # one stall (the process descheduled, say)
        await asyncio.sleep(0.001)
        assert lag.max_lag_s >= 0.040 and lag.lag_s < 0.030  # seen, but not a backlog
        for _ in range(4):  # a loop that stays behind, as under more queries than it parses
            time.sleep(0.050)
            await asyncio.sleep(0)
        assert lag.lag_s >= 0.040
        await asyncio.sleep(0.03)
        assert lag.lag_s < 0.030  # caught up
        lag.stop()
        assert lag.lag_s == 0.0

    asyncio.run(main())


def test_a_request_read_during_a_long_pass_is_aged_by_it() -> None:
    """The least of the last beats shows a long pass only later; a request read while the loop
    is past its next beat is aged by how far past it, and once the beat has run, nothing is."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lag = LoopLag(period_s=0.002, window=3)
        lag.start(loop)
        await asyncio.sleep(0.02)
        assert lag.age_s(loop.time()) < 0.030
        time.sleep(0.050)  # a long pass (a clump parsed in one stretch)
        assert lag.lag_s < 0.030 and lag.age_s(loop.time()) >= 0.040
        await asyncio.sleep(0.001)  # the beat has run
        assert lag.age_s(loop.time()) < 0.030
        lag.stop()
        assert lag.age_s(loop.time()) == 0.0

    asyncio.run(main())


def test_the_period_and_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="period_s"):
        LoopLag(period_s=0)
    with pytest.raises(ValueError, match="window"):
        LoopLag(window=0)
