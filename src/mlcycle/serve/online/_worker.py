"""Loading a model from its factory string, and the main loop of a worker process.

Light on purpose: a spawned worker imports this module first, so it pulls in nothing of the
server (no uvicorn, no starlette); torch or scikit-learn load only if the factory needs them.

A factory is "package.module:attr" naming a callable; called with the config's ``args``, it
returns a torch.nn.Module, a scikit-learn estimator, or a callable on a batch. Each becomes a
:data:`BatchFn` (``list[Any] -> list[Any]``) whose outputs are JSON-able lists and numbers.
"""

from __future__ import annotations

import importlib
import pickle
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

BatchFn = Callable[[list[Any]], list[Any]]
# Two threads importing torch at once can see it half-initialised; models load one at a time.
LOAD_LOCK = threading.RLock()
_HEADER = struct.Struct("!Q")  # frame length prefix on the worker socket


class ModelError(Exception):
    """The model raised on a batch (bad input for it, or a bug in it)."""


class ModelLoadError(ModelError):
    """The factory could not be imported or called, or returned something unusable."""


def resolve_factory(factory: str) -> Callable[..., Any]:
    """Import "package.module:attr" and return the attribute (it must be callable)."""
    module_name, _, attr = factory.partition(":")
    try:
        with LOAD_LOCK:
            obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module raised while importing
        raise ModelLoadError(
            f"cannot import module {module_name!r} of factory {factory!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelLoadError(
                f"module {module_name!r} has no attribute {attr!r} (factory {factory!r}); "
                "name a function or class that returns the model"
            ) from None
    if not callable(obj):
        raise ModelLoadError(f"factory {factory!r} names a {type(obj).__name__}, not a callable")
    return obj


def _jsonable_rows(out: Any, n: int) -> list[Any]:
    if hasattr(out, "tolist"):  # numpy array or torch tensor
        out = out.tolist()
    if not isinstance(out, list | tuple) or len(out) != n:
        size = len(out) if isinstance(out, list | tuple) else type(out).__name__
        raise ModelError(f"the model returned {size} outputs for a batch of {n}; return one each")
    return [o.tolist() if hasattr(o, "tolist") else o for o in out]


def _torch_batch_fn(module: Any, threads: int | None) -> tuple[BatchFn, dict[str, Any]]:
    import numpy as np
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    module.eval()
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype

    def run(batch: list[Any]) -> list[Any]:
        try:
            x = torch.from_numpy(np.asarray(batch, dtype=np_dtype))
        except (ValueError, TypeError) as exc:
            raise ModelError(f"inputs do not form a numeric array of one shape: {exc}") from None
        try:
            with torch.inference_mode():
                y = module(x)
        except RuntimeError as exc:  # shape mismatch and the like
            raise ModelError(
                f"the torch module failed on a batch of shape {list(x.shape)}: {exc}"
            ) from None
        if not isinstance(y, torch.Tensor):
            raise ModelError(f"the torch module returned {type(y).__name__}; return one tensor")
        return _jsonable_rows(y, len(batch))

    shape = getattr(module, "input_shape", None)
    return run, {"type": "torch", "input_shape": list(shape) if shape else None}


def _sklearn_batch_fn(est: Any, method: str) -> tuple[BatchFn, dict[str, Any]]:
    if method == "predict_proba" and not hasattr(est, "predict_proba"):
        raise ModelLoadError(
            f"{type(est).__name__} has no predict_proba; set method to 'predict' or 'auto'"
        )
    use_proba = method == "predict_proba" or (method == "auto" and hasattr(est, "predict_proba"))
    predict = est.predict_proba if use_proba else est.predict

    def run(batch: list[Any]) -> list[Any]:
        try:
            return _jsonable_rows(predict(batch), len(batch))
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{type(exc).__name__}: {exc}") from None

    n = getattr(est, "n_features_in_", None)
    return run, {"type": "sklearn", "input_shape": [int(n)] if n else None}


def _callable_batch_fn(fn: Callable[[list[Any]], Any]) -> tuple[BatchFn, dict[str, Any]]:
    def run(batch: list[Any]) -> list[Any]:
        try:
            out = fn(batch)
        except Exception as exc:
            raise ModelError(f"{type(exc).__name__}: {exc}") from None
        return _jsonable_rows(out, len(batch))

    shape = getattr(fn, "input_shape", None)
    return run, {"type": "callable", "input_shape": list(shape) if shape else None}


def load_model(
    factory: str, args: dict[str, Any] | None = None, method: str = "auto", threads: int | None = 1
) -> tuple[BatchFn, dict[str, Any]]:
    """Build a model from its factory and wrap it as a batch function.

    Returns:
        The batch function and metadata: ``type`` (torch, sklearn, callable) and
        ``input_shape`` (from an ``input_shape`` attribute, or scikit-learn's
        ``n_features_in_``; None when unknown).

    Raises:
        ModelLoadError: the factory cannot be imported or called, or returns no model.
    """
    with LOAD_LOCK:  # the factory may import torch or scikit-learn on first use
        return _load(factory, args, method, threads)


def _load(
    factory: str, args: dict[str, Any] | None, method: str, threads: int | None
) -> tuple[BatchFn, dict[str, Any]]:
    make = resolve_factory(factory)
    try:
        obj = make(**(args or {}))
    except Exception as exc:
        raise ModelLoadError(f"factory {factory!r} raised {type(exc).__name__}: {exc}") from None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return _torch_batch_fn(obj, threads)
    if hasattr(obj, "fit") and (hasattr(obj, "predict") or hasattr(obj, "predict_proba")):
        return _sklearn_batch_fn(obj, method)
    if callable(obj):
        return _callable_batch_fn(obj)
    raise ModelLoadError(
        f"factory {factory!r} returned a {type(obj).__name__}; return a torch.nn.Module, a "
        "scikit-learn estimator, or a callable taking a list of inputs"
    )


# ---- framing on the worker socket ------------------------------------------------------------


def encode_frame(message: Any) -> bytes:
    """A length-prefixed pickle of ``message``."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> Any:
    head = _recv_exact(sock, _HEADER.size)
    if head is None:
        return None
    body = _recv_exact(sock, _HEADER.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def process_main(sock: socket.socket) -> None:
    """A worker process: load the model, then answer batches until told to stop or EOF.

    Messages in: ("load", factory, args, method, threads) once, then ("batch", id, inputs) or
    ("stop",). Out: ("ready", meta) or ("error", msg) once, then ("ok", id, outputs, seconds)
    or ("fail", id, msg, seconds) per batch, ``seconds`` the model's own time on the batch.
    The parent's death closes the socket, so an orphaned worker exits by itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
    first = _recv_frame(sock)
    if first is None or first[0] != "load":
        return
    _, factory, args, method, threads = first
    try:
        fn, meta = load_model(factory, args, method, threads)
    except BaseException as exc:  # report any failure to load, then exit
        msg = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        sock.sendall(encode_frame(("error", msg)))
        return
    sock.sendall(encode_frame(("ready", meta)))
    while True:
        msg = _recv_frame(sock)
        if msg is None or msg[0] == "stop":
            return
        _, batch_id, inputs = msg
        start = time.perf_counter()
        try:
            out = fn(inputs)
            frame = encode_frame(("ok", batch_id, out, time.perf_counter() - start))
        except Exception as exc:
            text = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
            frame = encode_frame(("fail", batch_id, text, time.perf_counter() - start))
        sock.sendall(frame)


class RayWorker:
    """The body of a Ray actor replica (wrapped with ``ray.remote`` by the server)."""

    def __init__(self, factory: str, args: dict[str, Any], method: str, threads: int | None):
        self._fn, self._meta = load_model(factory, args, method, threads)

    def ready(self) -> dict[str, Any]:
        return self._meta

    def predict_batch(self, inputs: list[Any]) -> tuple[bool, Any, float]:
        """(ok, outputs or the error's message, the model's seconds on the batch)."""
        start = time.perf_counter()
        try:
            out = self._fn(inputs)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, ModelError) else repr(exc)
            return False, msg, time.perf_counter() - start
        return True, out, time.perf_counter() - start

    def pid(self) -> int:
        import os

        return os.getpid()


if __name__ == "__main__":  # python -m mlcycle.serve.online._worker FD (see replicas.py)
    process_main(socket.socket(fileno=int(sys.argv[1])))
