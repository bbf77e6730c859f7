"""Ray Tune trainables for the two workloads (imported only when Ray runs them).

Both read their atom count from the trial's resources (``Trainable.trial_resources``), report
``accuracy`` and ``atoms`` once per iteration, and checkpoint on demand: Tune saves a
checkpoint when a scheduler pauses a trial, and a resized trial restarts from it with its
new atom count.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ray import tune

from mlcycle.develop._workloads import synthetic_accuracy, synthetic_iter_s

__all__ = ["DigitsTrainable", "SyntheticTrainable", "atoms_of"]


def atoms_of(trainable: tune.Trainable, resource: str = "CPU") -> int:
    """Atoms the trial holds: the amount of ``resource`` in its placement group."""
    resources = trainable.trial_resources
    if resources is None:
        return 1
    return max(1, int(round(resources.required_resources.get(resource, 1))))


class SyntheticTrainable(tune.Trainable):
    """A known learning curve on simulated work: one iteration sleeps
    ``iter_s / speedup(atoms)`` seconds of real time (see :mod:`mlcycle.develop._workloads`)."""

    def setup(self, config: dict[str, Any]) -> None:
        self.atoms = atoms_of(self, config.get("atom_resource", "CPU"))
        self.iteration_done = 0

    def step(self) -> dict[str, Any]:
        time.sleep(synthetic_iter_s(self.config, self.atoms))
        self.iteration_done += 1
        return {
            "accuracy": synthetic_accuracy(self.config, self.iteration_done),
            "atoms": self.atoms,
        }

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        with open(os.path.join(checkpoint_dir, "state.json"), "w") as f:
            json.dump({"iteration": self.iteration_done}, f)

    def load_checkpoint(self, checkpoint: Any) -> None:
        with open(os.path.join(checkpoint, "state.json")) as f:
            self.iteration_done = int(json.load(f)["iteration"])


class DigitsTrainable(tune.Trainable):
    """A CNN on scikit-learn's digits, data-parallel over one process per atom; one
    iteration is one epoch (see :mod:`mlcycle.develop._digits`)."""

    def setup(self, config: dict[str, Any]) -> None:
        from mlcycle.develop._digits import DigitsTrainer

        self.atoms = atoms_of(self)
        self.trainer = DigitsTrainer(config, world_size=self.atoms)
        self.epoch = 0

    def step(self) -> dict[str, Any]:
        self.trainer.train_epoch(self.epoch)
        self.epoch += 1
        return {"accuracy": self.trainer.evaluate(), "atoms": self.atoms}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        import torch

        torch.save(
            {"epoch": self.epoch, **self.trainer.state_dict()},
            os.path.join(checkpoint_dir, "state.pt"),
        )

    def load_checkpoint(self, checkpoint: Any) -> None:
        import torch

        state = torch.load(os.path.join(checkpoint, "state.pt"), weights_only=True)
        self.epoch = int(state.pop("epoch"))
        self.trainer.load_state_dict(state)

    def cleanup(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            trainer.close()
