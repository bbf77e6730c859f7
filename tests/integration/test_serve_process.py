"""Process replicas: a worker killed mid-load is restarted and no query goes unanswered."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from mlcycle.serve.online import serve_in_thread

EX = "mlcycle.serve.online.examples"


def replicas(c: httpx.Client, model: str) -> list[dict]:
    return c.get(f"/admin/models/{model}").json()["replicas"]


def test_killed_worker_is_restarted_and_every_query_is_answered() -> None:
    config = {
        "models": [
            {
                "name": "slow",
                "factory": f"{EX}:sleepy",
                "args": {"base_ms": 20.0},
                "kind": "process",
                "batching": {"policy": "fixed", "max_batch_size": 4},
            }
        ],
        "apps": [{"name": "slow", "slo_ms": 4000, "models": ["slow"], "default": "sorry"}],
    }
    with serve_in_thread(config) as url, httpx.Client(base_url=url, timeout=30) as c:
        (before,) = replicas(c, "slow")
        assert before["alive"] and before["pid"] != os.getpid()

        async def load() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as ac:
                tasks = [
                    asyncio.create_task(ac.post("/slow/predict", json={"input": i}))
                    for i in range(40)
                ]
                for _ in range(200):  # until batches are in flight and queued
                    await asyncio.sleep(0.01)
                    if (await ac.get("/admin/models/slow")).json()["queue_length"] >= 8:
                        break
                os.kill(before["pid"], signal.SIGKILL)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(load())
        assert [r.status_code for r in responses] == [200] * 40
        answers = [r.json() for r in responses]
        for i, a in enumerate(answers):
            assert a["output"] == i or (a["default"] and a["output"] == "sorry")
        assert sum(not a["default"] for a in answers) >= 30  # retried on the new worker

        deadline = time.monotonic() + 30
        while True:
            (after,) = replicas(c, "slow")
            if after["alive"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert after["alive"] and after["pid"] != before["pid"] and after["restarts"] == 1
        r = c.post("/slow/predict", json={"input": "again"}).json()
        assert r["output"] == "again" and r["default"] is False
        assert 'mlcycle_model_restarts_total{model="slow:1"} 1' in c.get("/metrics").text
    with pytest.raises(ProcessLookupError):  # the server's exit took the worker with it
        os.kill(after["pid"], 0)


@pytest.mark.slow
def test_process_replica_runs_a_torch_model_and_scales() -> None:
    config = {
        "models": [
            {"name": "mlp", "factory": f"{EX}:mlp", "args": {"hidden": 64}, "kind": "process"}
        ],
        "apps": [{"name": "mlp", "slo_ms": 2000, "models": ["mlp"], "cache": False}],
    }
    with serve_in_thread(config) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/mlp/predict", json={"input": [0.1] * 256}).json()
        assert len(r["output"]) == 10 and abs(sum(r["output"]) - 1) < 1e-4
        bad = c.post("/mlp/predict", json={"input": [0.1] * 255})
        assert bad.status_code == 422 and "[256]" in bad.json()["error"]  # shape from the worker
        r = c.post("/admin/models/mlp/replicas", json={"replicas": 2}).json()
        pids = {rep["pid"] for rep in r["replicas"]}
        assert len(pids) == 2 and os.getpid() not in pids
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
