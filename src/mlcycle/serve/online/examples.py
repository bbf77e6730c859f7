"""Model factories for tests, benchmarks and the demo: name them in a config by string.

- ``mlcycle.serve.online.examples:noop``: echoes each input (the server's own overhead).
- ``mlcycle.serve.online.examples:mlp``: Linear(256, 1024)-ReLU-Linear(1024, 1024)-ReLU-
  Linear(1024, 10) with a softmax, one torch thread, the model of the serving peers' table.
- ``mlcycle.serve.online.examples:wide_mlp``: the same with 4096 hidden units. At batch 1 a
  call streams 72 MB of weights for ~36 MFLOP; a batch reuses them, so batching pays off more.
- ``from_file``: a model saved earlier (a pickled scikit-learn estimator or callable, or a
  whole torch module saved with ``torch.save``), e.g. one the demo trained. Only load files you
  trust: unpickling runs code.
- ``sleepy``: sleeps ``base_ms + per_item_ms * len(batch)`` and echoes (a slow model for SLO
  tests), ``constant``: returns fixed class scores (for selection and cascade tests), and
  ``failing``: raises on inputs marked bad.

Every factory takes keyword arguments from the config's ``"args"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["constant", "failing", "from_file", "mlp", "noop", "sleepy", "wide_mlp"]


def noop() -> Callable[[list[Any]], list[Any]]:
    """A batch function that returns its inputs unchanged."""

    def echo(batch: list[Any]) -> list[Any]:
        return batch

    return echo


def mlp(
    in_features: int = 256, hidden: int = 1024, classes: int = 10, seed: int = 0, threads: int = 1
) -> Any:
    """Linear-ReLU-Linear-ReLU-Linear with a softmax output, in eval mode.

    The weights come from a private ``torch.Generator`` seeded with ``seed``, drawn in the
    order and from the distributions of ``nn.Linear``'s own initialisation, so they equal those
    of the same layers built after ``torch.manual_seed(seed)`` (the serving peers' MLP in
    ``benchmarks/_serve_peers.py``), whatever else uses torch's global generator, and two MLPs
    built at once in one process (two replicas, two versions) get the same weights.

    Args:
        in_features: input width; the module's ``input_shape`` is ``[in_features]``.
        hidden: width of both hidden layers.
        classes: outputs (class probabilities).
        seed: weight initialisation seed.
        threads: torch intra-op threads (``torch.set_num_threads``).
    """
    import math

    import torch
    from torch import nn

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    widths = [(in_features, hidden), (hidden, hidden), (hidden, classes)]
    for i, (fan_in, fan_out) in enumerate(widths):
        # built on the meta device: no draw from the global generator, no wasted init
        linear = nn.Linear(fan_in, fan_out, device="meta").to_empty(device="cpu")
        with torch.no_grad():  # nn.Linear.reset_parameters, with our generator
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=gen)
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(linear.bias, -bound, bound, generator=gen)
        layers.append(linear)
        if i < len(widths) - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers, nn.Softmax(dim=-1)).eval()
    model.input_shape = [in_features]  # read by the server to check inputs at the frontend
    return model


def wide_mlp(in_features: int = 256, hidden: int = 4096, classes: int = 10, seed: int = 0) -> Any:
    """:func:`mlp` with 4096 hidden units, where batching pays off more."""
    return mlp(in_features=in_features, hidden=hidden, classes=classes, seed=seed)


def from_file(path: str) -> Any:
    """Load a model saved earlier: ``.pt``/``.pth`` with ``torch.load``, anything else with pickle.

    Args:
        path: the file; a torch module must have been saved whole (``torch.save(module, path)``).
    """
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no model file at {str(file)!r}; save one first, or fix 'path'")
    if file.suffix in (".pt", ".pth"):
        import torch

        return torch.load(file, weights_only=False)
    import pickle

    with file.open("rb") as f:
        return pickle.load(f)


def sleepy(
    base_ms: float = 5.0, per_item_ms: float = 0.0, input_shape: list[int] | None = None
) -> Callable[[list[Any]], list[Any]]:
    """Echo after sleeping ``base_ms + per_item_ms * len(batch)`` (releases the GIL)."""

    def slow(batch: list[Any]) -> list[Any]:
        time.sleep((base_ms + per_item_ms * len(batch)) / 1e3)
        return batch

    if input_shape is not None:
        slow.input_shape = input_shape  # type: ignore[attr-defined]
    return slow


def constant(scores: list[float] | None = None) -> Callable[[list[Any]], list[Any]]:
    """Return the same class scores for every input (default: [0.7, 0.3])."""
    out = list(scores) if scores is not None else [0.7, 0.3]

    def fixed(batch: list[Any]) -> list[Any]:
        return [out] * len(batch)

    return fixed


def failing(bad: Any = "bad") -> Callable[[list[Any]], list[Any]]:
    """Echo, but raise ValueError when the batch holds the input ``bad``."""

    def maybe_fail(batch: list[Any]) -> list[Any]:
        if bad in batch:
            raise ValueError(f"input {bad!r} is not accepted by this model")
        return batch

    return maybe_fail
