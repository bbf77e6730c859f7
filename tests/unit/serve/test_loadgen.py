"""The load generator's arrival processes and statistics, and its client against a real server.

Claims checked: Poisson gaps have CV 1 and gamma gaps the CV asked for, both at the rate asked
for; goodput leaves out defaults while "within SLO" counts them; failures count in the
percentiles; open-loop latency runs from the scheduled time, and a query cut off at the end of
the drain is a timeout, never lost.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import numpy as np
import pytest

from mlcycle.serve.online import loadgen
from mlcycle.serve.online.loadgen import Sample


def _gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.asarray(times))


@pytest.mark.parametrize(
    ("make", "cv"),
    [
        (lambda: loadgen.poisson_arrivals(2000.0, 50.0, seed=1), 1.0),
        (lambda: loadgen.gamma_arrivals(2000.0, 50.0, cv=4.0, seed=1), 4.0),
        (lambda: loadgen.gamma_arrivals(2000.0, 50.0, cv=2.0, seed=2), 2.0),
    ],
)
def test_arrivals_have_the_rate_and_cv_asked_for(make: object, cv: float) -> None:
    times = make()  # type: ignore[operator]
    assert all(0 <= t < 50.0 for t in times)
    assert times == sorted(times)
    assert len(times) == pytest.approx(2000 * 50, rel=0.05)
    gaps = _gaps(times)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.06)


def test_arrivals_are_reproducible_by_seed() -> None:
    assert loadgen.gamma_arrivals(100, 2, seed=3) == loadgen.gamma_arrivals(100, 2, seed=3)
    assert loadgen.poisson_arrivals(100, 2, seed=3) != loadgen.poisson_arrivals(100, 2, seed=4)


def test_bursty_arrivals_clump() -> None:
    """At CV 4 a third of the queries come in 10 ms windows at 4x the mean rate; Poisson: ~0."""

    def busiest_share(times: list[float]) -> float:
        counts = np.bincount((np.asarray(times) / 0.01).astype(int))
        return counts[counts >= 20].sum() / counts.sum()  # 20 in 10 ms = 4x the mean rate

    assert busiest_share(loadgen.gamma_arrivals(500, 20, cv=4, seed=0)) > 0.25
    assert busiest_share(loadgen.poisson_arrivals(500, 20, seed=0)) < 0.01


@pytest.mark.parametrize(
    "call",
    [
        lambda: loadgen.poisson_arrivals(0, 1),
        lambda: loadgen.poisson_arrivals(10, -1),
        lambda: loadgen.gamma_arrivals(10, 1, cv=0),
        lambda: loadgen.gamma_arrivals(float("nan"), 1),
        lambda: loadgen.summarize([], slo_ms=0, span_s=1),
        lambda: loadgen.summarize([], slo_ms=10, span_s=0),
        lambda: loadgen.max_throughput_within_slo([], min_real_within_slo=2),
        lambda: loadgen.percentile([1.0], 101),
    ],
)
def test_bad_arguments_raise_value_error(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_percentile_matches_numpy() -> None:
    xs = list(np.random.default_rng(0).exponential(size=501))
    for q in (0, 1, 50, 99, 100):
        assert loadgen.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(loadgen.percentile([], 50))


def test_summarize_counts_defaults_as_answered_but_not_as_goodput() -> None:
    ms = 1e-3
    samples = [Sample(i * 0.01, i * 0.01, 5 * ms, 200) for i in range(90)]  # real, in SLO
    samples += [Sample(0.9, 0.9, 40 * ms, 200, default=True) for _ in range(5)]  # default, in
    samples += [Sample(0.95, 0.95, 80 * ms, 200) for _ in range(3)]  # real, late
    samples += [Sample(0.96, 0.96, 1 * ms, 503), Sample(0.97, 0.97, 2.0, loadgen.STATUS_TIMEOUT)]
    s = loadgen.summarize(samples, slo_ms=50, span_s=1.0, offered_rps=100.0)
    assert (s.n, s.answered, s.defaults, s.failed) == (100, 98, 5, 2)
    assert s.within_slo == pytest.approx(0.95)  # 90 real + 5 defaults
    assert s.real_within_slo == pytest.approx(0.90)
    assert s.default_share == pytest.approx(0.05)
    # the timeout ends at 0.97 + 2.0 but is not an answer: the span ends at the last answer
    assert s.span_s == pytest.approx(1.03)
    assert s.goodput_rps == pytest.approx(90 / 1.03)
    assert s.throughput_rps == pytest.approx(98 / 1.03)
    assert s.p50_ms == pytest.approx(5.0)
    assert s.max_ms == pytest.approx(2000.0)  # the timeout counts in the latencies
    assert s.p99_ms > 80.0
    assert s.offered_rps == 100.0 and s.concurrency is None
    assert json.dumps(s.to_dict())


def test_summarize_client_lag() -> None:
    samples = [Sample(0.0, 0.004, 0.012, 200) for _ in range(10)]  # 4 ms late, 8 ms in flight
    s = loadgen.summarize(samples, slo_ms=10, span_s=1)
    assert s.client_lag_p99_ms == pytest.approx(4)
    assert (s.within_slo, s.within_slo_from_send) == (0.0, 1.0)


def _point(throughput: float, p99_ms: float, real: float) -> loadgen.LoadSummary:
    base = loadgen.summarize([Sample(0, 0, 0.001, 200)], slo_ms=50, span_s=1)
    fields = base.to_dict() | {"throughput_rps": throughput, "p99_ms": p99_ms}
    return loadgen.LoadSummary(**(fields | {"real_within_slo": real}))


def test_max_throughput_within_slo_needs_p99_and_real_answers() -> None:
    points = [
        _point(100, 10, 1.0),
        _point(300, 45, 0.995),
        _point(900, 49, 0.5),  # meets its p99 by answering defaults
        _point(1000, 80, 0.9),  # p99 past the SLO
    ]
    best = loadgen.max_throughput_within_slo(points)
    assert best is not None and best.throughput_rps == 300
    assert loadgen.max_throughput_within_slo(points[2:]) is None


# ------------------------------------------------------------------------------------------
# The client against a real server on loopback (uvicorn + Starlette, the serve extra)


async def _with_server(run: object, keepalive_timeout: float = 5.0) -> object:
    """Run ``run(url)`` against a real uvicorn + Starlette server on loopback, in this loop."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def predict(request: Request) -> Response:
        x = (await request.json())["input"]
        if x == "slow":
            await asyncio.sleep(1.0)
        if x == "fail":
            return JSONResponse({"error": "no"}, status_code=503)
        if x == "close":
            return JSONResponse({"output": x}, headers={"Connection": "close"})
        if x == "chunked":  # a body in two chunks, no Content-Length

            async def chunks() -> object:
                yield b'{"output": "chunked", '
                yield b'"default": true}'

            return StreamingResponse(chunks(), media_type="application/json")
        return JSONResponse({"output": x, "default": x == "default"})

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="error",
        lifespan="off",
        timeout_keep_alive=keepalive_timeout,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        return await run(f"http://127.0.0.1:{port}/predict")  # type: ignore[operator]
    finally:
        server.should_exit = True
        await task


def _body(x: object) -> bytes:
    return json.dumps({"input": x}).encode()


def _clients() -> list[object]:
    """Both clients; aiohttp's only where aiohttp is installed (it is not a dependency)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return ["raw", pytest.param("aiohttp", marks=pytest.mark.skip("aiohttp not installed"))]
    return ["raw", "aiohttp"]


@pytest.mark.parametrize("client", _clients())
def test_open_loop_records_every_query_with_status_and_default_flag(client: str) -> None:
    bodies = [_body(1), _body("default"), _body("fail"), _body(2)]
    arrivals = [i * 0.002 for i in range(100)]

    async def run(url: str) -> object:
        return await loadgen.open_loop_async(url, bodies, arrivals, drain_s=2.0, client=client)

    samples, window_s = loadgen.run_async(_with_server(run))
    assert len(samples) == 100 and window_s == pytest.approx(0.198)
    assert sorted(s.scheduled_s for s in samples) == arrivals
    assert sum(s.default for s in samples) == 25
    assert sum(s.status == 503 for s in samples) == 25
    assert all(s.sent_s >= s.scheduled_s - 1e-9 for s in samples)
    s = loadgen.summarize(samples, slo_ms=1000, span_s=window_s)
    assert (s.answered, s.defaults, s.failed) == (75, 25, 25)
    assert s.real_within_slo == pytest.approx(0.5)


def test_open_loop_cuts_off_at_the_drain_and_counts_timeouts() -> None:
    async def run(url: str) -> object:
        return await loadgen.open_loop_async(
            url, [_body("slow"), _body(1)], [0.0, 0.001], drain_s=0.2
        )

    samples, _ = loadgen.run_async(_with_server(run))
    by_status = {s.status: s for s in samples}
    assert set(by_status) == {200, loadgen.STATUS_TIMEOUT}
    assert 0.15 < by_status[loadgen.STATUS_TIMEOUT].latency_s < 0.9  # cut at 0.2 s, not 1 s


@pytest.mark.parametrize("client", _clients())
def test_client_timeout_is_a_timeout(client: str) -> None:
    async def run(url: str) -> object:
        return await loadgen.closed_loop_async(
            url, [_body("slow")], 1, 0.05, timeout_s=0.2, client=client
        )

    samples, _ = loadgen.run_async(_with_server(run))
    assert [s.status for s in samples] == [loadgen.STATUS_TIMEOUT]
    assert 0.15 < samples[0].latency_s < 0.9


def test_closed_loop_keeps_concurrency_and_drops_warmup() -> None:
    async def run(url: str) -> object:
        return await loadgen.closed_loop_async(url, [_body(1)], 4, 0.3, warmup_s=0.1)

    samples, window_s = loadgen.run_async(_with_server(run))
    assert window_s == 0.3 and len(samples) > 20
    assert all(s.scheduled_s >= 0.1 and s.status == 200 for s in samples)
    s = loadgen.summarize(samples, slo_ms=100, span_s=window_s, concurrency=4)
    assert s.concurrency == 4 and s.throughput_rps > 50
    assert statistics.median(x.latency_s for x in samples) < 0.1


def test_connection_refused_is_an_error_not_a_crash() -> None:
    import socket

    with socket.socket() as sock:  # a free port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    samples, _ = loadgen.open_loop(f"http://127.0.0.1:{port}/p", [b"{}"], [0.0, 0.0])
    assert [s.status for s in samples] == [loadgen.STATUS_ERROR] * 2


def test_raw_client_reads_chunked_and_connection_close_answers() -> None:
    bodies = [_body("chunked"), _body("close"), _body(3)]

    async def run(url: str) -> object:
        return await loadgen.open_loop_async(url, bodies, [i * 0.003 for i in range(30)])

    samples, _ = loadgen.run_async(_with_server(run))
    assert len(samples) == 30 and all(s.status == 200 for s in samples)
    assert sum(s.default for s in samples) == 10  # the chunked answers say "default": true


def test_raw_client_reconnects_when_the_server_drops_idle_connections() -> None:
    async def run(url: str) -> object:
        arrivals = [0.0, 0.01, 1.3, 1.31]  # the server closes idle connections after 1 s
        return await loadgen.open_loop_async(url, [_body(1)], arrivals, prewarm=4)

    samples, _ = loadgen.run_async(_with_server(run, keepalive_timeout=1))
    assert [s.status for s in samples] == [200] * 4


def test_default_flag_is_read_from_single_and_batch_answers() -> None:
    assert loadgen._is_default(b'{"output": 1, "default": true}')
    assert loadgen._is_default(b'{"outputs": [1, 2], "default":[false,true]}')
    assert not loadgen._is_default(b'{"output": 1, "default": false}')
    assert not loadgen._is_default(b'{"outputs": [1], "default": [false, false]}')
    assert not loadgen._is_default(b'{"output": "true"}')


def test_bad_client_arguments() -> None:
    with pytest.raises(ValueError, match="client"):
        loadgen.open_loop("http://127.0.0.1:1/p", [b"{}"], [0.0], client="curl")
    with pytest.raises(ValueError, match="http://"):
        loadgen.open_loop("https://127.0.0.1:1/p", [b"{}"], [0.0])
    with pytest.raises(TypeError, match="bytes"):
        loadgen.open_loop("http://127.0.0.1:1/p", ["{}"], [0.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="ascending"):
        loadgen.open_loop("http://127.0.0.1:1/p", [b"{}"], [0.2, 0.1])
    with pytest.raises(ValueError, match="concurrency"):
        loadgen.closed_loop("http://127.0.0.1:1/p", [b"{}"], 0, 1.0)


def test_pin_to_cores_refuses_cores_it_does_not_have() -> None:
    assert loadgen.pin_to_cores([10_000]) is False
    assert loadgen.pin_to_cores([]) is False
