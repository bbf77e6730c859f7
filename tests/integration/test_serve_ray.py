"""A Ray actor replica on a local Ray (started on first use, bound to loopback, then stopped)."""

from __future__ import annotations

import os

import httpx
import pytest

pytest.importorskip("ray")

from mlcycle.serve.online import serve_in_thread  # noqa: E402

EX = "mlcycle.serve.online.examples"


@pytest.mark.slow
def test_ray_replica_answers_and_stops_with_the_server() -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    config = {
        "ray_num_cpus": 1,
        "models": [
            {
                "name": "echo",
                "factory": f"{EX}:noop",
                "kind": "ray",
                "ray_options": {"num_cpus": 0},
            }
        ],
        "apps": [{"name": "echo", "slo_ms": 5000, "models": ["echo"]}],
    }
    with serve_in_thread(config) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/echo/predict", json={"inputs": [[1, 2], [3, 4]]}).json()
        assert r["outputs"] == [[1, 2], [3, 4]] and r["default"] == [False, False]
        (replica,) = c.get("/admin/models/echo").json()["replicas"]
        assert replica["kind"] == "ray" and replica["alive"]
        assert replica["pid"] != os.getpid()
    assert not ray.is_initialized()  # the local Ray this server started went with it
