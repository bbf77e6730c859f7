"""Defaults at the door: the frontend's backlog, and the shed decision, in process."""

from __future__ import annotations

import asyncio
import math
import socket
import time

import pytest

from mlcycle.serve.online._lag import LoopLag
from mlcycle.serve.online._shed import OVERLOAD, FrontendLoad, Intake, received_age_s, run_now
from mlcycle.serve.online.server import Server


def _spin(seconds: float) -> None:
    """Use ``seconds`` of this process's CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_cost_is_measured_on_busy_windows() -> None:
    load = FrontendLoad(window=4, min_span_s=0.0, min_busy=0.1)  # other work may share the core
    assert load.backlog_s() == 0.0  # nothing measured: no backlog is claimed
    for _ in range(4):  # a busy window: 2 ms of CPU per request
        load.enter()
        _spin(0.002)
        load.leave()
    assert load.inflight == 0
    assert 0.0015 <= load.cost_s <= 0.01
    measured = load.cost_s
    load.min_busy = 0.5
    for _ in range(4):  # an idle window of dearer requests (3 ms each, 20 ms apart): it stays
        load.enter()
        _spin(0.003)
        time.sleep(0.020)
        load.leave()
    assert load.cost_s == measured
    for _ in range(3):
        load.enter()
    assert load.backlog_s() == pytest.approx(3 * measured)
    load.waiting = 2  # two of them parsed and waiting for their model: half their work left
    assert load.backlog_s() == pytest.approx(2 * measured)


def test_an_idle_window_can_only_lower_the_cost() -> None:
    """An estimate far too high sheds nearly everything and leaves the process idle: such a
    window's CPU time over its requests bounds their cost from above, and it comes down."""
    load = FrontendLoad(window=4, min_span_s=0.0)
    load.cost_s = 1.0  # a second per request: far too high
    for _ in range(2):
        load.enter()
        time.sleep(0.002)
        load.leave()
    for _ in range(2):
        time.sleep(0.002)
        load.shed()
    assert load.cost_s < 0.01


def test_answers_leaving_together_do_not_drag_the_cost_down() -> None:
    """The work of a request is spread over its stay: parsing when it comes in, the model's
    share while it waits, the answer when it leaves. Under load a clump is parsed (and part of
    it shed at the door) in one stretch and a batch's answers leave together in another; a
    window that held only the latter read the answers' cost alone (0.1 ms here, of 0.33), and
    when windows with defaults could only lower the estimate it ratcheted down to that, so the
    door let in several times what the loop could answer in time."""
    true_s = 0.0002 + 0.002 / 64 + 0.0001  # what an answered request costs
    load = FrontendLoad(window=64, min_span_s=0.0, min_busy=0.1)
    load.cost_s = true_s  # measured before the load rose
    for _ in range(4):
        for _ in range(64):  # a clump: half let in and parsed, half shed at the door
            load.enter()
            _spin(0.0002)
            _spin(0.00005)
            load.shed()
        _spin(0.002)  # the model's batch
        for _ in range(64):  # its answers leave together, one of them a default
            _spin(0.0001)
            load.leave()
    assert 0.7 * true_s <= load.cost_s <= 1.6 * true_s, load.cost_s


def test_a_window_behind_all_along_measures_the_cpu_share() -> None:
    class Beat:  # the loop's heartbeat: how many beats, and how many of them late
        beats = late_beats = 0

    beat = Beat()
    load = FrontendLoad(window=4, min_span_s=0.0, min_busy=0.1, lag=beat)  # type: ignore[arg-type]
    for _ in range(4):  # the loop behind at every beat, the process on its core half the time
        load.enter()
        _spin(0.002)
        time.sleep(0.002)
        beat.beats += 1
        beat.late_beats += 1
        load.leave()
    assert 0.55 <= load.share <= 0.95
    share = load.share
    for _ in range(4):  # one beat on time: the loop was idle some of the window, no share
        load.enter()
        _spin(0.001)
        time.sleep(0.002)
        beat.beats += 1
        beat.late_beats += 1 if beat.beats % 4 else 0
        load.leave()
    assert load.share == share


def test_the_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        FrontendLoad(window=0)
    with pytest.raises(ValueError, match="min_span_s"):
        FrontendLoad(min_span_s=-1.0)
    with pytest.raises(ValueError, match="headroom"):
        FrontendLoad(headroom=0.0)
    with pytest.raises(ValueError, match="door_cost"):
        FrontendLoad(door_cost=0.0)


def _server() -> Server:
    from mlcycle.serve.online import _admin
    from mlcycle.serve.online._config import AppConfig

    server = Server()
    _admin.add_app(server, AppConfig.from_dict({"name": "a", "slo_ms": 50, "default": [0.5]}))
    return server


def test_the_door_sheds_when_the_backlog_alone_misses_the_deadline() -> None:
    server = _server()
    app = server.apps["a"]
    assert server.door_app(b"/a/predict") is app
    for url in (b"/b/predict", b"/a/b/predict", b"/%61/predict", b"/predict"):
        assert server.door_app(url) is None
    now = 100.0
    assert server.shed_reason(app, now, now) is None  # no models linked: the app path answers
    budget_s = app.budget_s  # the 50 ms SLO less the margin for sending
    server.frontend.cost_s = 0.001
    server.frontend.inflight = 10  # 10 ms ahead of it: fits (in half the budget, for arrivals)
    assert server.shed_reason(app, now, now) is None
    server.frontend.inflight = int(0.6 * budget_s * 1e3)  # more than half the budget
    assert server.shed_reason(app, now, now) is OVERLOAD
    server.frontend.inflight = 10  # arrived 30 ms ago (the loop's lag): 10 ms is too many
    assert server.shed_reason(app, now - 0.030, now) is OVERLOAD
    server.frontend.share = 0.25  # a process that gets a quarter of its core: 40 ms
    assert server.shed_reason(app, now, now) is OVERLOAD


def test_a_shed_payload_is_the_usual_default_answer() -> None:
    import orjson

    server = _server()
    app = server.apps["a"]
    body = orjson.loads(server.shed_payload(app, OVERLOAD, time.perf_counter() - 0.002))
    assert body["query_id"] and body["output"] == [0.5] and body["default"] is True
    assert body["reason"] == "overload" and body["model"] is None and body["cached"] is False
    assert body["confidence"] is None and 1.5 <= body["latency_ms"] < 1000
    assert list(body) == [
        "query_id",
        "output",
        "default",
        "model",
        "cached",
        "confidence",
        "reason",
        "latency_ms",
    ]
    again = orjson.loads(server.shed_payload(app, OVERLOAD, time.perf_counter()))
    assert again["query_id"] != body["query_id"]
    m = app.metrics
    assert m.requests == 2 and m.defaults == {"overload": 2} and m.latency.count == 2
    assert app.feedback(body["query_id"], None, 0)["correct"] is None  # logged for /feedback


class _Model:
    """A model runtime's stand-in whose queue would be done with a query ``finish_s`` from
    now."""

    _closing = False

    def __init__(self, finish_s: float) -> None:
        self.finish_s = finish_s

    def predicted_finish(self, now: float) -> float:
        return now + self.finish_s

    def set_target(self, target_s: float) -> None:
        pass


def test_the_door_leaves_the_model_its_time() -> None:
    """A query let in waits about the backlog to be parsed and has its model deadline moved up
    by the backlog, so the door lets it in only when the model's time fits in what is left:
    otherwise it would end as a default after the frontend had done all its work."""
    from mlcycle.serve.online import _admin
    from mlcycle.serve.online._config import AppConfig
    from mlcycle.serve.online._query import REJECTED

    server = Server()
    model = _Model(0.020)
    server.models["m"] = model  # type: ignore[assignment]
    config = {"name": "a", "slo_ms": 50, "default": [0.5], "models": ["m"]}
    app = _admin.add_app(server, AppConfig.from_dict(config))
    now = 100.0
    assert app.budget_s == pytest.approx(0.044)  # the 50 ms SLO less the margin for sending
    server.frontend.cost_s = 0.001
    server.frontend.inflight = 10  # 10 ms to be parsed, 10 ms earlier deadline, 20 ms model
    assert server.shed_reason(app, now, now) is None
    server.frontend.inflight = 14  # 2 x 14 + 20 > 44: it could only end as a late default
    assert server.shed_reason(app, now, now) is OVERLOAD
    server.frontend.waiting = 8  # 8 of them parsed, waiting for their model: 10 ms of work
    assert server.shed_reason(app, now, now) is None
    model.finish_s = 0.050  # the model's queue alone would take it past its deadline
    assert server.shed_reason(app, now, now) is REJECTED
    model._closing = True  # undeploying: no model would take it
    model.finish_s = 0.0
    assert server.shed_reason(app, now, now) is REJECTED


def test_the_door_keeps_new_parsing_from_holding_up_waiting_answers() -> None:
    """A query let in earlier and waiting for its model must still get its answer out: the
    parsing queued ahead of a new query (and its own) may fill at most half of the time left
    to the earliest such deadline."""
    server = _server()
    app = server.apps["a"]
    front = server.frontend
    front.cost_s = 0.001
    now = 100.0
    ticket = front.wait(now + 0.010)  # parsed, waiting: due in 10 ms
    front.inflight = 4  # it and 3 not yet parsed: 4 ms of parsing ahead with a new one
    assert server.shed_reason(app, now, now) is None
    front.inflight = 6  # 6 ms: more than half of its 10 ms
    assert server.shed_reason(app, now, now) is OVERLOAD
    assert front.earliest_s(now + 0.011) == math.inf  # past due: nothing left to protect
    front.done(ticket)
    assert front.waiting == 0 and front.earliest_s(now) == math.inf
    assert server.shed_reason(app, now, now) is None


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is Linux's")
def test_a_request_is_aged_by_when_the_kernel_received_it() -> None:
    """The door ages a request by the kernel's receive time (tcp_info), which sees the wait
    in the socket that the loop's heartbeat misses."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    try:
        for wait_s in (0.0, 0.030, 0.080):
            client.sendall(b"POST /app/predict HTTP/1.1\r\n\r\n")
            time.sleep(wait_s + 0.002)  # the data is in the server's socket, unread
            age = received_age_s(server_side)
            assert wait_s - 0.006 <= age <= wait_s + 0.010, (wait_s, age)
            server_side.recv(1024)
    finally:
        for s in (client, server_side, listener):
            s.close()


def test_run_now_takes_the_first_step_at_once_and_the_rest_from_callbacks() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        steps: list[object] = []

        async def handler() -> int:
            steps.append("start")
            value = await fut
            steps.append(value)
            await asyncio.sleep(0)  # a bare yield
            return value * 2

        results: list[object] = []
        run_now(handler(), results.append, loop)
        assert steps == ["start"] and results == []  # up to its first wait, synchronously
        fut.set_result(21)
        await asyncio.sleep(0.01)
        assert steps == ["start", 21] and results == [42]

        async def broken() -> None:
            await asyncio.sleep(0)
            raise RuntimeError("boom")

        run_now(broken(), results.append, loop)  # logged, and done(None): a 500 for the client
        await asyncio.sleep(0.01)
        assert results == [42, None]

    asyncio.run(main())


def test_intake_reads_kept_connections_in_order_a_slice_at_a_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lag = LoopLag(period_s=0.005)
        intake = Intake(lag, slice_s=0.001)
        assert not intake.overdue()  # no heartbeat: never overdue
        lag._due = time.perf_counter() - 0.010  # the loop is 10 ms past its beat
        assert intake.overdue()
        read: list[int] = []

        class Kept:
            def __init__(self, i: int) -> None:
                self.i = i

            def read_kept(self) -> None:
                read.append(self.i)
                time.sleep(0.0004)

        for i in range(12):
            intake.defer(Kept(i), loop)
        assert intake.deferred == 12 and read == []
        await asyncio.sleep(0)  # one turn while overdue: one slice (1 ms), not all of it
        assert 1 <= len(read) < 12 and read == list(range(len(read)))
        lag._due = math.inf  # caught up: the rest in the next turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert read == list(range(12))

    asyncio.run(main())


def test_the_collector_runs_between_bursts_not_in_them() -> None:
    import gc

    server = Server()
    was = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        garbage = [[] for _ in range(2000)]
        for g in garbage:
            g.append(g)  # reference cycles: only the collector frees them
        del garbage
        young = gc.get_count()[0]
        assert young >= 2000
        server.frontend.inflight = 3  # requests in hand: a burst, no collection
        server._collect_when_idle(0.0)
        assert gc.get_count()[0] >= young
        server.frontend.inflight = 0
        server._collect_when_idle(0.010)  # the heartbeat 10 ms late: the loop is busy
        assert gc.get_count()[0] >= young
        server._collect_when_idle(0.0)  # idle: collected
        assert gc.get_count()[0] < 700
    finally:
        if was:
            gc.enable()
