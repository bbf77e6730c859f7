"""The serving frontend against a real server on loopback: answers, 4xx errors, admin, cache, SLO.

No mocks: each module starts a :class:`~mlcycle.serve.online.Server` with thread replicas in a
background thread (``serve_in_thread``) and talks HTTP to it with httpx.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from mlcycle.serve.online import serve_in_process, serve_in_thread

EX = "mlcycle.serve.online.examples"
CONFIG = {
    "max_body_bytes": 8192,
    "max_inputs": 16,
    "models": [
        {"name": "echo", "factory": f"{EX}:noop", "input_shape": [4]},
        {"name": "anyecho", "factory": f"{EX}:noop"},
        {"name": "b_aimd", "factory": f"{EX}:noop", "batching": {"policy": "aimd"}},
        {"name": "b_none", "factory": f"{EX}:noop", "batching": {"policy": "none"}},
        {"name": "b_wait", "factory": f"{EX}:noop", "batching": {"policy": "fixed", "wait_ms": 20}},
        {"name": "picky", "factory": f"{EX}:failing", "args": {"bad": "bad"}},
        {"name": "right", "factory": f"{EX}:constant", "args": {"scores": [0.1, 0.9]}},
        {"name": "wrong", "factory": f"{EX}:constant", "args": {"scores": [0.8, 0.2]}},
        {"name": "unsure", "factory": f"{EX}:constant", "args": {"scores": [0.6, 0.4]}},
        {
            "name": "slow",
            "factory": f"{EX}:sleepy",
            "args": {"base_ms": 15.0, "per_item_ms": 1.0},
            "batching": {"policy": "aimd", "max_batch_size": 8},
        },
    ],
    "apps": [
        {"name": "echo", "slo_ms": 100, "models": ["echo"], "cache": False},
        {"name": "b_aimd", "slo_ms": 100, "models": ["b_aimd"], "cache": False},
        {"name": "b_none", "slo_ms": 100, "models": ["b_none"], "cache": False},
        {"name": "b_wait", "slo_ms": 100, "models": ["b_wait"], "cache": False},
        {"name": "any", "slo_ms": 100, "models": ["anyecho"]},
        {"name": "picky", "slo_ms": 200, "models": ["picky"], "cache": False},
        {
            "name": "bandit",
            "slo_ms": 200,
            "models": ["right", "wrong"],
            "policy": "exp3",
            "policy_args": {"gamma": 0.5, "seed": 1},
            "cache": False,
        },
        {
            "name": "ensemble",
            "slo_ms": 200,
            "models": ["right", "wrong"],
            "policy": "exp4",
            "cache": False,
        },
        {
            "name": "cascade",
            "slo_ms": 200,
            "models": ["unsure", "right"],
            "policy": "cascade",
            "thresholds": [0.9],
            "cache": False,
        },
        {"name": "slow", "slo_ms": 40, "models": ["slow"], "default": "busy", "cache": False},
    ],
}


@pytest.fixture(scope="module")
def url():
    with serve_in_thread(CONFIG) as base:
        yield base


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=10) as c:
        yield c


def error_of(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    message = resp.json()["error"]
    assert isinstance(message, str) and len(message) > 20
    return message


# ---- answers ---------------------------------------------------------------------------------


def test_predict_one_and_many(client) -> None:
    r = client.post("/echo/predict", json={"input": [1, 2, 3, 4]})
    assert r.status_code == 200
    data = r.json()
    assert data["output"] == [1, 2, 3, 4] and data["default"] is False
    assert data["model"] == "echo:1" and data["cached"] is False
    assert isinstance(data["query_id"], str) and 0 <= data["latency_ms"] < 100
    r = client.post("/echo/predict", json={"inputs": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    data = r.json()
    assert data["outputs"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert data["default"] == [False, False] and len(set(data["query_ids"])) == 2


def test_health_metrics_openapi(client) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and "echo" in health["apps"]
    assert health["models"]["echo"]["replicas_alive"] == 1
    client.post("/echo/predict", json={"input": [0, 0, 0, 0]})
    text = client.get("/metrics").text
    for series in (
        'mlcycle_app_requests_total{app="echo"}',
        'mlcycle_app_latency_seconds_bucket{app="echo",le="0.005"}',
        'mlcycle_model_batch_size_bucket{model="echo:1",le="1"}',
        'mlcycle_model_cache_hits_total{model="anyecho:1"}',
        'mlcycle_model_queue_length{model="slow:1"}',
        "# TYPE mlcycle_app_latency_seconds histogram",
    ):
        assert series in text
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in (
        "/{app}/predict",
        "/{app}/feedback",
        "/health",
        "/metrics",
        "/admin/apps",
        "/admin/models/{model}/replicas",
        "/admin/apps/{app}/link",
    ):
        assert path in schema["paths"]


# ---- 4xx with a message ------------------------------------------------------------------------


def test_malformed_json_is_400(client) -> None:
    r = client.post(
        "/echo/predict", content=b'{"input": [1, 2,', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in error_of(r, 400)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([1, 2], "JSON object"),
        ({"inputz": 1}, 'exactly one of "input"'),
        ({"input": 1, "inputs": [1]}, 'exactly one of "input"'),
        ({"inputs": 5}, "non-empty list"),
        ({"inputs": []}, "non-empty list"),
    ],
)
def test_wrong_body_shapes_are_422(client, body, needle) -> None:
    assert needle in error_of(client.post("/echo/predict", json=body), 422)


def test_wrong_input_shape_is_422(client) -> None:
    message = error_of(client.post("/echo/predict", json={"input": [1, 2, 3]}), 422)
    assert "shape [3]" in message and "[4]" in message
    message = error_of(client.post("/echo/predict", json={"inputs": [[1, 2, 3, 4], "x"]}), 422)
    assert message.startswith("inputs[1]:")
    message = error_of(client.post("/echo/predict", json={"inputs": [[0, 0, 0, 0]] * 17}), 422)
    assert "limit is 16" in message


def test_input_the_model_rejects_is_422_and_others_in_its_batch_are_answered(client) -> None:
    message = error_of(client.post("/picky/predict", json={"input": "bad"}), 422)
    assert "could not process the input" in message and "not accepted" in message

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=10) as ac:
            bodies = [{"input": "bad" if i == 3 else i} for i in range(8)]
            return await asyncio.gather(*(ac.post("/picky/predict", json=b) for b in bodies))

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert statuses.count(422) == 1 and statuses.count(200) == 7


def test_unknown_app_and_model_are_404(client) -> None:
    assert "unknown app 'nope'" in error_of(client.post("/nope/predict", json={"input": 1}), 404)
    assert "unknown model 'ghost'" in error_of(client.get("/admin/models/ghost"), 404)
    assert "no endpoint" in error_of(client.get("/a/b/c"), 404)
    body = {"model": "ghost"}
    assert "unknown model" in error_of(client.post("/admin/apps/any/link", json=body), 404)


def test_oversized_body_is_413(client) -> None:
    big = {"input": [0.5] * 4000}  # ~20 kB against an 8 kB limit
    assert "exceeds the limit of 8192 bytes" in error_of(client.post("/any/predict", json=big), 413)

    def chunks():  # no content-length: the limit holds while streaming too
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/any/predict", content=chunks())
    assert "exceeds the limit" in error_of(r, 413)


def test_wrong_method_is_405(client) -> None:
    r = client.get("/echo/predict")
    assert "use POST" in error_of(r, 405) and r.headers["allow"] == "POST"


# ---- cache -------------------------------------------------------------------------------------


def test_cache_hits_and_is_invalidated_by_a_new_version(client) -> None:
    x = {"input": {"cache": "me", "n": time.time()}}
    first, second = (client.post("/any/predict", json=x).json() for _ in range(2))
    assert first["cached"] is False and second["cached"] is True
    assert second["output"] == first["output"]
    deployed = client.post(
        "/admin/models", json={"name": "anyecho", "factory": f"{EX}:noop", "version": "2"}
    )
    assert deployed.status_code == 201, deployed.text
    third = client.post("/any/predict", json=x).json()
    assert third["cached"] is False and third["model"] == "anyecho:2"
    assert client.post("/any/predict", json=x).json()["cached"] is True
    again = client.post(
        "/admin/models", json={"name": "anyecho", "factory": f"{EX}:noop", "version": "2"}
    )
    assert "already deployed" in error_of(again, 409)


# ---- admin at runtime --------------------------------------------------------------------------


def test_admin_changes_at_runtime(client) -> None:
    r = client.post("/admin/models", json={"name": "extra", "factory": f"{EX}:noop"})
    assert r.status_code == 201 and r.json()["replicas"][0]["alive"]
    r = client.post("/admin/apps", json={"name": "late", "slo_ms": 50, "default": 0})
    assert r.status_code == 201
    r = client.post("/late/predict", json={"input": 7}).json()
    assert r["default"] is True and r["output"] == 0 and r["reason"] == "no_model"
    assert client.post("/admin/apps/late/link", json={"model": "extra"}).status_code == 200
    assert client.post("/late/predict", json={"input": 7}).json()["output"] == 7
    r = client.post("/admin/models/extra/replicas", json={"replicas": 3})
    assert r.status_code == 200 and len(r.json()["replicas"]) == 3
    assert client.get("/health").json()["models"]["extra"]["replicas_alive"] == 3
    r = client.post("/admin/models/extra/replicas", json={"replicas": 1})
    assert len(r.json()["replicas"]) == 1
    assert "linked to app(s) ['late']" in error_of(client.delete("/admin/models/extra"), 409)
    assert client.post("/admin/apps/late/unlink", json={"model": "extra"}).status_code == 200
    assert "serves version '1'" in error_of(client.delete("/admin/models/extra?version=9"), 404)
    assert client.delete("/admin/models/extra").json() == {"removed": "extra:1"}
    assert client.delete("/admin/apps/late").json() == {"removed": "late"}
    assert client.post("/late/predict", json={"input": 7}).status_code == 404
    dup = client.post("/admin/apps", json={"name": "echo"})
    assert "exists" in error_of(dup, 409)
    bad = client.post("/admin/models", json={"name": "x", "factory": "no_such_module:f"})
    assert "cannot import module 'no_such_module'" in error_of(bad, 400)
    bad = client.post("/admin/apps", json={"name": "c2", "models": ["right"], "policy": "cascade"})
    assert "needs 'thresholds'" in error_of(bad, 422)
    names = {a["name"] for a in client.get("/admin/apps").json()["apps"]}
    assert "c2" not in names and "echo" in names
    assert client.get("/admin/config").json()["host"] == "127.0.0.1"


def test_admin_token() -> None:
    cfg = {"admin_token": "s3cret", "allowed_factories": ["mlcycle"]}
    with serve_in_thread(cfg) as base, httpx.Client(base_url=base) as c:
        assert "Bearer" in error_of(c.get("/admin/apps"), 401)
        ok = c.get("/admin/apps", headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        r = c.post(
            "/admin/models",
            json={"name": "m", "factory": "os:getcwd"},
            headers={"authorization": "Bearer s3cret"},
        )
        assert "allowed_factories" in error_of(r, 403)


# ---- selection, ensembles, cascades, feedback ----------------------------------------------------


def test_exp3_learns_from_feedback(client) -> None:
    for _ in range(60):
        r = client.post("/bandit/predict", json={"input": 0}).json()
        fb = client.post("/bandit/feedback", json={"query_id": r["query_id"], "label": 1})
        assert fb.status_code == 200 and fb.json()["correct"] == (r["model"] == "right:1")
    weights = fb.json()["weights"]
    assert weights["right"] > 0.9 > weights["wrong"]


def test_exp4_combines_and_feedback_by_input(client) -> None:
    r = client.post("/ensemble/predict", json={"input": [1]}).json()
    assert r["model"] == "ensemble" and 0.0 < r["confidence"] <= 1.0
    assert len(r["output"]) == 2
    fb = client.post("/ensemble/feedback", json={"input": [1], "label": 1}).json()
    assert fb["updated"] and fb["weights"]["right"] > fb["weights"]["wrong"]
    r = client.post("/ensemble/feedback", json={"query_id": "zzz", "label": 1})
    assert "not a recent query" in error_of(r, 404)
    r = client.post("/ensemble/feedback", json={"label": 1})
    assert "needs 'query_id' or 'input'" in error_of(r, 422)


def test_cascade_defers_below_threshold(client) -> None:
    r = client.post("/cascade/predict", json={"input": 1}).json()
    assert r["model"] == "right:1" and r["output"] == [0.1, 0.9]
    assert r["confidence"] == pytest.approx(0.9)


# ---- batching at low load ----------------------------------------------------------------------


def test_batching_adds_under_a_millisecond_at_low_load(client) -> None:
    """One query at a time: AIMD and even a 20 ms delayed-batching wait cost < 1 ms at p50."""

    def p50_ms(app: str) -> float:
        ms = sorted(
            client.post(f"/{app}/predict", json={"input": [i]}).json()["latency_ms"]
            for i in range(60)
        )
        return ms[len(ms) // 2]

    for _ in range(2):  # warm all three
        p50_ms("b_none"), p50_ms("b_aimd"), p50_ms("b_wait")
    none, aimd, wait = p50_ms("b_none"), p50_ms("b_aimd"), p50_ms("b_wait")
    assert aimd - none <= 1.0, (none, aimd)
    assert wait - none <= 1.0, (none, wait)  # waits stop paying off, so they stop


# ---- the SLO under overload --------------------------------------------------------------------


def test_overload_gets_the_marked_default_within_the_slo() -> None:
    """A 15 ms model behind a 40 ms SLO, 120 queries at once: every one answered within it.

    The server runs in its own process here: sharing this process's GIL with the httpx client
    would time the client, not the server.
    """
    slo_ms = 40.0
    config = {
        "models": [CONFIG["models"][-1]],
        "apps": [{"name": "slow", "slo_ms": slo_ms, "models": ["slow"], "default": "busy"}],
    }

    async def blast(url: str) -> list[dict]:
        limits = httpx.Limits(max_connections=120, max_keepalive_connections=120)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as ac:
            await ac.post("/slow/predict", json={"input": 0})  # warm the latency fit

            async def one(i: int) -> dict:
                r = await ac.post("/slow/predict", json={"input": i})
                assert r.status_code == 200, r.text
                return r.json()

            return await asyncio.gather(*(one(i) for i in range(120)))

    with serve_in_process(config) as url:
        answers = asyncio.run(blast(url))
        text = httpx.get(f"{url}/metrics").text
    assert len(answers) == 120  # nobody left hanging
    defaults = [d for d in answers if d["default"]]
    assert defaults, "120 queries at once on a 15 ms model should not all fit a 40 ms SLO"
    reasons = ("admission", "overload", "deadline", "late")
    assert all(d["output"] == "busy" and d["reason"] in reasons for d in defaults)
    assert any(not d["default"] for d in answers)
    latencies = sorted(d["latency_ms"] for d in answers)  # measured inside the server
    assert latencies[int(0.95 * len(latencies))] <= slo_ms
    assert 'mlcycle_app_defaults_total{app="slow",reason=' in text


def test_a_fresh_server_is_ready_and_answers_its_first_query_with_the_model() -> None:
    """`mlcycle serve start` (here through serve_in_process) listens only once every model has
    loaded and run its warm-up batches, so /health says ok and the very first query gets the
    model's answer, not the default that a cold first torch call used to time out into."""
    config = {
        "models": [
            {
                "name": "mlp",
                "factory": f"{EX}:mlp",
                "args": {"hidden": 64},
                "batching": {"policy": "aimd", "max_batch_size": 16},
            }
        ],
        "apps": [{"name": "mlp", "slo_ms": 30, "models": ["mlp"], "default": "cold"}],
    }
    with serve_in_process(config) as url, httpx.Client(base_url=url, timeout=10) as c:
        first = c.post("/mlp/predict", json={"input": [0.5] * 256}).json()
        health = c.get("/health").json()
        model = c.get("/admin/models/mlp").json()
    assert first["default"] is False and len(first["output"]) == 10
    assert health["status"] == "ok" and health["models"]["mlp"]["ready"] is True
    assert model["ready"] is True and model["batching"]["compute_fit"]["batches"] >= 4


def _raw_exchange(url: str, payload: bytes, replies: int, timeout_s: float = 10.0) -> list[bytes]:
    """Send ``payload`` on one raw connection; the bodies of the first ``replies`` responses,
    in the order they came, then b"closed" or b"open" (whether the server closed it)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
    buf = b""
    bodies: list[bytes] = []
    try:
        sock.sendall(payload)
        while len(bodies) < replies:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                head = buf[:head_end].lower()
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(buf) >= head_end + 4 + length:
                    bodies.append(buf[head_end + 4 : head_end + 4 + length])
                    buf = buf[head_end + 4 + length :]
                    continue
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection before answering"
            buf += chunk
        sock.settimeout(0.5)  # a kept connection stays quiet (uvicorn closes idle ones at 5 s)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        bodies.append(b"closed" if closed else b"open")
    finally:
        sock.close()
    return bodies


def _post(path: str, body: dict, *, close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
    head += f"content-length: {len(data)}\r\n" + ("connection: close\r\n" if close else "")
    return head.encode() + b"\r\n" + data


def test_pipelined_requests_are_answered_in_order(url) -> None:
    """A request read while the one before it on the connection is still with its (slow)
    model waits for it: responses keep the order of the requests."""
    first = _post("/slow/predict", {"input": [1.0]})
    second = _post("/echo/predict", {"input": [1.0, 2.0, 3.0, 4.0]})
    third = _post("/echo/predict", {"input": [5.0, 6.0, 7.0, 8.0]})
    one, two, three, state = _raw_exchange(url, first + second + third, 3)
    a, b, c = (json.loads(x) for x in (one, two, three))
    assert a["model"] in ("slow:1", None) and (a["model"] is None) == a["default"]
    assert b["output"] == [1.0, 2.0, 3.0, 4.0] and c["output"] == [5.0, 6.0, 7.0, 8.0]
    assert state == b"open"  # keep-alive


def test_connection_close_is_honoured(url) -> None:
    request = _post("/echo/predict", {"input": [1, 2, 3, 4]}, close=True)
    body, state = _raw_exchange(url, request, 1)
    assert json.loads(body)["output"] == [1, 2, 3, 4]
    assert state == b"closed"
