"""The two workloads `mlcycle tune` runs, as plain data: search spaces, schedules, curves.

- **synthetic**: a known learning curve per configuration and a known scaling function. Its
  trainable does no arithmetic: an iteration *sleeps* ``iter_s / speedup(atoms)`` seconds of
  real time and then reports the curve's accuracy at that iteration. Time is real wall-clock
  time (the deadline is as honest as for a real model); only the work is simulated, so the
  atoms can be logical (``ray.init(num_cpus=8)`` on a 2-core machine).
- **digits**: a small convolutional network (64 and 128 channels, global batch 128) on
  scikit-learn's bundled 8x8 digits (offline), trained data-parallel with one process per
  atom (torch.distributed, gloo); one iteration is one epoch, 27 at most. See
  :mod:`mlcycle.develop._digits`.

The synthetic curve: with ``x = log10(lr / 0.03)``, the plateau is ``0.97 - 0.1 x**2`` (plus a
per-trial offset of sd 0.01) and the time constant ``10 * 10**(-0.6 x)`` iterations, so a large
learning rate learns fast to a low plateau and a small one slowly to a high one: early rungs
favour the fast learners, as on real models. Accuracy after ``e`` iterations is
``0.1 + (plateau - 0.1) * (1 - exp(-e / tau))`` plus noise of sd 0.003.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlcycle.develop._policy import amdahl_speedup

__all__ = [
    "WORKLOADS",
    "WorkloadSpec",
    "synthetic_accuracy",
    "synthetic_iter_s",
    "workload_spec",
]

SYNTHETIC_SERIAL_FRACTION = 0.1  # the synthetic trainable's Amdahl serial fraction
SYNTHETIC_ITER_S = 2.0  # seconds per iteration on one atom (real time, slept)
SYNTHETIC_MAX_T = 27  # iterations of a complete trial
SYNTHETIC_TAU_ITERS = SYNTHETIC_MAX_T / 8  # the best learning rate's time constant


def synthetic_accuracy(config: dict[str, Any], iteration: int) -> float:
    """The synthetic trainable's accuracy after ``iteration`` iterations (deterministic)."""
    x = math.log10(config["lr"] / 0.03)
    offset = random.Random(config["seed"]).gauss(0.0, 0.01)
    plateau = min(0.99, max(0.2, 0.97 - 0.1 * x * x + offset))
    tau = config.get("tau_iters", 10.0) * 10 ** (-0.6 * x)
    noise = random.Random(config["seed"] * 1_000_003 + iteration).gauss(0.0, 0.003)
    acc = 0.1 + (plateau - 0.1) * (1.0 - math.exp(-iteration / tau)) + noise
    return min(1.0, max(0.0, acc))


def synthetic_iter_s(config: dict[str, Any], atoms: int) -> float:
    """Seconds one synthetic iteration takes on ``atoms`` atoms."""
    speedup = amdahl_speedup(config.get("serial_fraction", SYNTHETIC_SERIAL_FRACTION))
    return config.get("iter_s", SYNTHETIC_ITER_S) / speedup(atoms)


def _sample_synthetic(rng: random.Random) -> dict[str, Any]:
    return {"lr": 10 ** rng.uniform(-4.0, 0.0), "seed": rng.randrange(2**31)}


def _sample_digits(rng: random.Random) -> dict[str, Any]:
    return {
        "lr": 10 ** rng.uniform(-3.5, -0.5),
        "momentum": rng.choice([0.0, 0.5, 0.9]),
        "weight_decay": 10 ** rng.uniform(-6.0, -2.5),
        "seed": rng.randrange(2**31),
    }


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload: its trainable, search space and the ASHA ladder every scheduler uses.

    Attributes:
        name: "synthetic" or "digits".
        trainable: import path ``module:Class`` of the Ray Tune trainable.
        sample: draws one configuration from the search space.
        constants: added to every configuration (workload settings, not searched).
        max_t: iterations of a complete trial (the top rung).
        grace_period: iterations before the first rung.
        reduction_factor: ASHA's eta.
        scaling: the known speedup curve (synthetic), or None to measure it (digits).
        prior_serial_fraction: HyperSched's prior when the curve is measured.
        resize_overhead_s: HyperSched's prior for the restart overhead.
        metric: the reported result key; higher is better.
    """

    name: str
    trainable: str
    sample: Callable[[random.Random], dict[str, Any]]
    constants: dict[str, Any] = field(default_factory=dict)
    max_t: int = 81
    grace_period: int = 1
    reduction_factor: float = 3.0
    scaling: Callable[[int], float] | None = None
    prior_serial_fraction: float = 0.1
    resize_overhead_s: float = 8.0
    metric: str = "accuracy"


WORKLOADS = ("synthetic", "digits")


def workload_spec(name: str, **overrides: Any) -> WorkloadSpec:
    """The named workload, with ``overrides`` of its fields (e.g. ``max_t=27``).

    Synthetic constants can be overridden through ``iter_s`` and ``serial_fraction``.
    """
    if name == "synthetic":
        constants = {
            "iter_s": overrides.pop("iter_s", SYNTHETIC_ITER_S),
            "serial_fraction": overrides.pop("serial_fraction", SYNTHETIC_SERIAL_FRACTION),
            "tau_iters": overrides.pop("tau_iters", SYNTHETIC_TAU_ITERS),
        }
        spec = WorkloadSpec(
            name="synthetic",
            trainable="mlcycle.develop._trainables:SyntheticTrainable",
            sample=_sample_synthetic,
            constants=constants,
            max_t=SYNTHETIC_MAX_T,
            scaling=amdahl_speedup(constants["serial_fraction"]),
        )
    elif name == "digits":
        spec = WorkloadSpec(
            name="digits",
            trainable="mlcycle.develop._trainables:DigitsTrainable",
            sample=_sample_digits,
            constants={
                "batch_size": overrides.pop("batch_size", 128),
                "width": overrides.pop("width", 2),
            },
            max_t=27,
            scaling=None,
            prior_serial_fraction=0.2,
        )
    else:
        raise ValueError(
            f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)} "
            "(synthetic: known curves, sleeps; digits: a CNN on sklearn's digits)."
        )
    if overrides:
        fields = set(WorkloadSpec.__dataclass_fields__)
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown workload options {unknown}; valid ones are {sorted(fields)} "
                "(and iter_s, serial_fraction, tau_iters for synthetic; batch_size, width "
                "for digits)."
            )
        spec = WorkloadSpec(**{**spec.__dict__, **overrides})
    return spec
