"""mlcycle: the machine-learning lifecycle, each stage on the systems that made it fast.

Stages live in folders that follow the life of a model (see docs/architecture.md):
``develop`` (experiments on a deadline), ``models`` (reference and dynamic networks),
``train`` (beyond the memory wall, low-bit), ``serve`` (online, pipelines, offline) and
``secure``. Importing :mod:`mlcycle` is cheap: torch, ray, mlflow and duckdb load only when
a function that needs them runs.
"""

from typing import Any

from mlcycle._version import __version__

__all__ = ["__version__", "plan", "solve"]


def __getattr__(name: str) -> Any:
    if name in ("plan", "solve"):
        from mlcycle.train.remat import solve as _solve

        return getattr(_solve, name)
    raise AttributeError(f"module 'mlcycle' has no attribute {name!r}")
