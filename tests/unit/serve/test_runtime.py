"""A model version's runtime without HTTP: thread replicas, deadlines, admission, bad inputs."""

from __future__ import annotations

import asyncio

import pytest

from mlcycle.serve.online._config import ModelConfig
from mlcycle.serve.online._metrics import ModelMetrics
from mlcycle.serve.online._runtime import REJECTED, TIMEOUT, InputRejected, ModelRuntime
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
