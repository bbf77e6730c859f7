"""Online serving (Clipper): HTTP frontend, adaptive batching, cache, model selection, cascades.

Crankshaw et al., "Clipper: A Low-Latency Online Prediction Serving System", NSDI 2017: a
layer between applications and models that batches queries adaptively against a latency SLO,
caches predictions, selects and combines models from feedback, and answers with a default
when the SLO cannot be met. Modules:

- :mod:`.server`: :class:`Server` (raw ASGI on uvicorn), :func:`serve_in_thread`.
- :mod:`.replicas`: thread, process and Ray replicas behind one async interface.
- :mod:`.batching`: AIMD and latency-model batch-size controllers.
- :mod:`.cache`: LRU prediction cache keyed by (model, version, input hash).
- :mod:`.selection`, :mod:`.cascade`: Exp3/Exp4 model selection, IDK cascades.
- :mod:`.examples`: model factories (noop, mlp, wide_mlp) for tests, benchmarks and the demo.

Importing this package is cheap: the server, uvicorn and torch load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Server": "server",
    "serve_in_thread": "server",
    "serve_in_process": "_launch",
    "HTTPError": "server",
    "ServerConfig": "_config",
    "ModelConfig": "_config",
    "AppConfig": "_config",
    "BatchingConfig": "_config",
    "ConfigError": "_config",
    "Replica": "replicas",
    "ThreadReplica": "replicas",
    "ProcessReplica": "replicas",
    "RayReplica": "replicas",
    "ReplicaCrashed": "replicas",
    "make_replica": "replicas",
    "ModelError": "_worker",
    "ModelLoadError": "_worker",
    "load_model": "_worker",
    "AIMDBatcher": "batching",
    "LatencyModel": "batching",
    "LatencyModelBatcher": "batching",
    "FixedBatcher": "batching",
    "NoBatching": "batching",
    "PredictionCache": "cache",
    "input_digest": "cache",
    "Exp3": "selection",
    "Exp4": "selection",
    "IDKCascade": "cascade",
}

_SUBMODULES = frozenset(
    {"batching", "cache", "cascade", "examples", "loadgen", "replicas", "selection", "server"}
)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name in _SUBMODULES:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
