"""Defaults at the door: the frontend's backlog, and the shed decision, in process."""

from __future__ import annotations

import time

import pytest

from mlcycle.serve.online._shed import OVERLOAD, FrontendLoad
from mlcycle.serve.online.server import Server


def _spin(seconds: float) -> None:
    """Use ``seconds`` of this process's CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_cost_is_measured_on_busy_windows_only() -> None:
    load = FrontendLoad(window=4, min_busy=0.1)  # a low bar: other work may share the core
    assert load.backlog_s() == 0.0  # nothing measured: no backlog is claimed
    for _ in range(4):  # a busy window: 2 ms of CPU per request
        load.enter()
        _spin(0.002)
        load.leave()
    assert load.inflight == 0
    assert 0.0015 <= load.cost_s <= 0.01
    measured = load.cost_s
    for _ in range(4):  # an idle window (sleeping, not working): the cost stays
        load.enter()
        time.sleep(0.005)
        load.leave()
    assert load.cost_s == measured
    for _ in range(3):
        load.enter()
    assert load.backlog_s() == pytest.approx(3 * measured)


def test_a_window_with_sheds_can_only_lower_the_cost() -> None:
    """Defaults at the door are cheap: counting them would make answers look cheap. But an
    estimate far too high sheds nearly everything, so such windows bound it from above (their
    CPU time over the requests they answered), and it comes down."""
    load = FrontendLoad(window=4)
    load.cost_s = 1e-5  # lower than what these answers cost: stays
    for _ in range(3):
        load.enter()
        _spin(0.0002)
        load.leave()
    load.shed()
    assert load.cost_s == 1e-5
    load.cost_s = 1.0  # a second per request: far too high
    for _ in range(2):
        load.enter()
        _spin(0.0002)
        load.leave()
    load.enter()
    load.refused()  # given the default by the app's own path
    load.leave()
    load.shed()
    assert load.cost_s < 0.01


def test_the_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        FrontendLoad(window=0)
    with pytest.raises(ValueError, match="headroom"):
        FrontendLoad(headroom=0.0)


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
