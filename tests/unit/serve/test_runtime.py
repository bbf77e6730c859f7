"""A model version's runtime without HTTP: thread replicas, deadlines, admission, bad inputs."""

from __future__ import annotations

import asyncio
import time

import pytest

from mlcycle.serve.online._config import ModelConfig
from mlcycle.serve.online._metrics import ModelMetrics
from mlcycle.serve.online._runtime import (
    LATE,
    PROBE_AFTER,
    REJECTED,
    TIMEOUT,
    InputRejected,
    ModelRuntime,
)
from mlcycle.serve.online.cache import PredictionCache
from mlcycle.serve.online.replicas import ModelError, ReplicaCrashed, ThreadReplica

EX = "mlcycle.serve.online.examples"


def runtime(factory: str, **kw) -> ModelRuntime:
    cfg = ModelConfig.from_dict({"name": "m", "factory": f"{EX}:{factory}", **kw})
    return ModelRuntime(cfg, PredictionCache(16), ModelMetrics(), target_s=0.02)


def test_thread_replica_round_trip_errors_and_stop() -> None:
    async def main() -> None:
        rep = ThreadReplica(ModelConfig.from_dict({"name": "f", "factory": f"{EX}:failing"}))
        meta = await rep.start()
        assert meta["type"] == "callable" and rep.alive
        assert await rep.predict_batch([1, [2]]) == [1, [2]]
        with pytest.raises(ModelError, match="not accepted"):
            await rep.predict_batch([1, "bad"])
        await rep.stop()
        with pytest.raises(ReplicaCrashed):
            await rep.predict_batch([1])

    asyncio.run(main())


def test_deadline_timer_answers_a_query_the_model_cannot_meet() -> None:
    async def main() -> None:
        rt = runtime("sleepy", args={"base_ms": 60.0})
        await rt.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await rt.submit("x", t0 + 0.010) is TIMEOUT
        assert loop.time() - t0 < 0.050  # answered at the deadline, not when the model ended
        await rt.stop()

    asyncio.run(main())


def test_admission_refuses_what_the_queue_cannot_finish_in_time() -> None:
    async def main() -> None:
        rt = runtime("sleepy", args={"base_ms": 20.0}, batching={"policy": "none"})
        await rt.start()
        loop = asyncio.get_running_loop()
        assert await rt.submit("warm", loop.time() + 1.0) == "warm"  # fits ~20 ms per batch
        now = loop.time()
        queued = [rt.submit(i, now + 1.0) for i in range(5)]  # ~100 ms of work ahead
        late = rt.submit("late", now + 0.050)
        assert late.done() and late.result() is REJECTED  # refused at once, not at 50 ms
        assert await asyncio.gather(*queued) == list(range(5))
        await rt.stop()

    asyncio.run(main())


def test_a_bad_input_fails_alone_and_batches_adapt() -> None:
    async def main() -> None:
        rt = runtime("failing", batching={"policy": "fixed", "max_batch_size": 8})
        await rt.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        futures = [rt.submit(x, deadline) for x in (1, 2, "bad", 4)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[:2] == [1, 2] and results[3] == 4
        assert isinstance(results[2], InputRejected) and "not accepted" in str(results[2])
        assert rt.metrics.model_errors == 1
        await rt.set_replicas(3)
        assert len(rt.info()["replicas"]) == 3
        assert await asyncio.gather(*(rt.submit(i, loop.time() + 1.0) for i in range(20))) == list(
            range(20)
        )
        await rt.set_replicas(1)
        assert len(rt.info()["replicas"]) == 1
        await rt.stop()

    asyncio.run(main())


@pytest.mark.slow  # importing scikit-learn takes seconds here
def test_a_saved_scikit_learn_model_is_served_from_its_file(tmp_path) -> None:
    import pickle

    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    path = tmp_path / "iris.pkl"
    path.write_bytes(pickle.dumps(LogisticRegression(max_iter=500).fit(x, y)))

    async def main() -> None:
        rt = runtime("from_file", args={"path": str(path)})
        await rt.start()
        assert rt.input_shape == [4]  # from n_features_in_
        loop = asyncio.get_running_loop()
        out = await rt.submit(x[0].tolist(), loop.time() + 5.0)
        assert len(out) == 3 and max(range(3), key=out.__getitem__) == y[0]  # predict_proba
        await rt.stop()

    asyncio.run(main())


def test_start_warms_up_and_seeds_the_controller() -> None:
    async def main() -> None:
        rt = runtime(
            "sleepy",
            args={"base_ms": 1.0, "per_item_ms": 0.1, "input_shape": [2]},
            batching={"policy": "aimd", "max_batch_size": 32},
        )
        await rt.start()
        assert rt.ready and rt.info()["ready"]
        assert rt.compute.count == 4 and rt.latency.count == 4  # sizes 1 and 32, twice
        assert rt._slots[0].controller.batch_size() > 1  # AIMD starts where the fit says
        assert rt.metrics.batches == 0  # warm-up batches are not traffic
        await rt.stop()
        cold = runtime("noop")  # no input shape: nothing to warm up with
        await cold.start()
        assert cold.ready and cold.compute.count == 0
        await cold.stop()

    asyncio.run(main())


def test_admission_admits_a_burst_that_one_batch_can_serve() -> None:
    """40 queries at once on a 10 ms model: one batch answers them all well in time, so none
    may get the default (counting them one batch each, or at a controller still at its start,
    refused most)."""

    async def main() -> None:
        rt = runtime(
            "sleepy",
            args={"base_ms": 10.0, "per_item_ms": 0.05, "input_shape": [1]},
            batching={"policy": "aimd", "max_batch_size": 64},
        )
        await rt.start()
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = [rt.submit([i], now + 0.080) for i in range(40)]
        assert await asyncio.gather(*futures) == [[i] for i in range(40)]
        await rt.stop()

    asyncio.run(main())


def test_admission_counts_the_model_time_not_a_busy_event_loop() -> None:
    """A batch whose answer waits for a blocked event loop looks slow to the loop, but the
    queue drains at the model's pace: the admission estimate must not grow with the loop's
    delays (that feedback refused ever more queries under load)."""

    async def main() -> None:
        rt = runtime(
            "sleepy", args={"base_ms": 5.0, "input_shape": [1]}, batching={"policy": "none"}
        )
        await rt.start()
        loop = asyncio.get_running_loop()
        for i in range(3):
            fut = rt.submit([i], loop.time() + 1.0)
            while rt._slots[0].busy_until == 0.0:  # until the batch is on the replica
                await asyncio.sleep(0)
            time.sleep(0.040)  # the loop is stuck, the model is not
            assert await fut == [i]
        assert rt.latency.count == 5 and max(rt.latency._lat) > 0.030  # the loop saw 40 ms
        assert rt.compute.mean_s(1) < 0.015  # the model took ~5 ms
        now = loop.time()
        queued = [rt.submit([i], now + 1.0) for i in range(5)]
        assert rt.predicted_finish(now) - now < 0.070  # 6 batches of ~5 ms, not of ~40 ms
        assert await asyncio.gather(*queued) == [[i] for i in range(5)]
        await rt.stop()

    asyncio.run(main())


def test_a_query_that_became_late_is_answered_before_the_model_would_run_it() -> None:
    async def main() -> None:
        rt = runtime(
            "sleepy", args={"base_ms": 60.0, "input_shape": [1]}, batching={"policy": "none"}
        )
        await rt.start()  # the fit learns ~60 ms per batch
        batches = rt.metrics.batches
        loop = asyncio.get_running_loop()
        now = loop.time()
        first = rt.submit(["a"], now + 1.0)
        second = rt.submit(["b"], now + 0.200)  # two batches of 60 ms fit: admitted
        assert not second.done()
        while rt._slots[0].busy_until == 0.0:
            await asyncio.sleep(0)
        time.sleep(0.160)  # the loop is stuck: when "a" is done, "b" has 40 ms left
        assert await second is LATE
        assert loop.time() < now + 0.200  # answered then, not at its deadline
        assert await first == ["a"]
        assert rt.metrics.batches == batches + 1  # "b" never reached the model
        assert rt.metrics.late == 1
        await rt.stop()

    asyncio.run(main())


def test_a_stale_fit_that_drops_every_query_is_probed_and_recovers() -> None:
    """A fit learned in a slow spell (here: 500 ms for a 2 ms model) must not keep the model
    idle forever: after a few late drops in a row a lone query runs, and its quick answer
    resets the fit."""

    async def main() -> None:
        rt = runtime("sleepy", args={"base_ms": 2.0}, batching={"policy": "none"})
        await rt.start()
        for _ in range(10):
            rt.compute.observe(1, 0.5)
        loop = asyncio.get_running_loop()
        answers = [await rt.submit(i, loop.time() + 0.050) for i in range(PROBE_AFTER + 3)]
        assert answers[:PROBE_AFTER] == [LATE] * PROBE_AFTER
        assert answers[PROBE_AFTER:] == [PROBE_AFTER, PROBE_AFTER + 1, PROBE_AFTER + 2]
        assert rt.compute.resets == 1 and rt.compute.mean_s(1) < 0.05
        await rt.stop()

    asyncio.run(main())


def test_logged_outputs_leave_the_garbage_collector_nothing_to_walk() -> None:
    """Query-log entries of numbers become untracked at the first collection (lists as
    tuples), so serving adds nothing for the oldest generation's full collections to walk."""
    import gc

    from mlcycle.serve.online._apps import QueryLog
    from mlcycle.serve.online.selection import zero_one_loss

    log = QueryLog(4)
    name = "".join(["m"])  # as at query time: a record built then, not a code constant
    log.add("1", "app", ("single", name), [0.2, 0.8], None)
    log.add("2", "app", ("single", name), [[1, 2], [3]], None)
    gc.collect(0)  # a young collection untracks the entry's items, the next the entry,
    gc.collect(1)  # before it could reach the oldest generation
    assert not gc.is_tracked(log.get("1"))
    gc.collect()  # nested lists take a collection per level
    assert not gc.is_tracked(log.get("2"))
    assert log.get("1")[2] == (0.2, 0.8) and zero_one_loss(log.get("1")[2], 1) == 0.0
    assert log.get("2")[2] == ((1, 2), (3,))
