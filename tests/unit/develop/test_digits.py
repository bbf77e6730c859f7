"""The real workload's data parallelism: N processes train the same model as one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from mlcycle.develop._digits import DigitsTrainer, load_digits_split  # noqa: E402

CONFIG = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "seed": 7, "batch_size": 64}


def params(trainer: DigitsTrainer) -> list:
    return [p.detach().clone() for p in trainer.replica.model.parameters()]


def test_digits_split_is_fixed_and_offline() -> None:
    x_train, y_train, x_val, y_val = load_digits_split()
    assert x_train.shape == (1437, 1, 8, 8) and x_val.shape == (360, 1, 8, 8)
    assert float(x_train.max()) <= 1.0 and set(y_val.tolist()) == set(range(10))


@pytest.mark.slow
def test_a_checkpoint_resumes_on_two_workers_as_it_would_on_one() -> None:
    """Epoch 0 on one process, checkpoint; epoch 1 on one process and, from the checkpoint,
    on two processes (gloo all-reduce): the same parameters, as a resize must give."""
    one = DigitsTrainer(CONFIG, world_size=1)
    one.train_epoch(0)
    state = one.state_dict()
    one.train_epoch(1)
    two = DigitsTrainer(CONFIG, world_size=2)
    try:
        two.load_state_dict(state)
        two.train_epoch(1)
        diff = max(
            float((a - b).abs().max()) for a, b in zip(params(one), params(two), strict=True)
        )
        assert diff < 1e-4
        assert two.evaluate() == pytest.approx(one.evaluate(), abs=1 / 360)
    finally:
        two.close()
        one.close()
    assert all(proc.poll() is not None for proc in two._helpers) or not two._helpers


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        DigitsTrainer(CONFIG, world_size=0)
