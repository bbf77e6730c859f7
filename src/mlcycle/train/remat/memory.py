"""Measure the peak memory of a training step: live tensor bytes on the CPU, the allocator on CUDA.

On CUDA the caching allocator keeps the score (:func:`cuda_peak` wraps
``torch.cuda.max_memory_allocated``). The CPU has no such counter, so :class:`LiveBytes` keeps
one: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees the tensor outputs of
every ATen op run inside the block, including the ops that autograd's backward engine runs (it
runs them through the dispatcher on the calling thread for CPU tensors), and counts the bytes of
each *storage* it has not seen before. A ``weakref.finalize`` on the storage's Python object
takes those bytes off again when the storage dies: PyTorch preserves a storage's Python object
for as long as the C++ storage lives, so the finalizer fires exactly when the last tensor (view
or base) that uses the storage goes away, and a view never counts twice since it shares its
base's storage. The peak is updated at every allocation.

This measures a rematerialized step's real peak against the planner's simulated one
(:func:`mlcycle.train.remat.simulate`) and measures eager peers (``torch.utils.checkpoint``,
plain autograd) the same way.

What it does not see (each is also outside the simulator's model):

- scratch memory that a kernel allocates and frees internally (the mode is off while an op runs,
  so an op's internal temporaries are invisible; only its outputs count);
- allocator overheads: alignment padding, and the reserve of a caching allocator (bytes are
  counted per storage, ``storage.nbytes()``, as if each allocation were exact);
- tensors that existed before the block and were not passed as ``baseline`` (their bytes are
  never counted, not even when an op inside the block writes into them in place or views them),
  and memory allocated outside ATen (NumPy arrays, ``torch.from_numpy`` buffers created before
  the block, C++ extensions that bypass the dispatcher);
- ops run on other threads (dispatch modes are thread-local), e.g. the backward of CUDA tensors,
  which the autograd engine runs on a device thread: use :func:`cuda_peak` there.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes", "cuda_peak", "measure_peak"]


def _storage_of(obj: Any) -> torch.UntypedStorage | None:
    """The untyped storage behind a tensor (or the storage itself), or None when it has none."""
    if isinstance(obj, torch.UntypedStorage):
        return obj
    if isinstance(obj, torch.TypedStorage):
        return obj.untyped()
    if not isinstance(obj, torch.Tensor) or obj.is_sparse or obj.is_nested:
        return None
    try:
        return obj.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # e.g. wrapper subclasses
        return None


class _Mode(TorchDispatchMode):
    """The dispatch mode behind :class:`LiveBytes`: reports each op's inputs and outputs."""

    def __init__(self, tracker: LiveBytes) -> None:
        super().__init__()
        self._tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._tracker._observe(args, kwargs, out)
        return out


class LiveBytes:
    """Context manager that tracks live tensor bytes and their peak (the CPU's allocator counter).

    Counts the distinct storages created by ATen ops inside the ``with`` block, plus the storages
    of ``baseline`` (parameters, inputs, optimizer state... anything alive before the block that
    should count), and records the highest total reached. Gradients that autograd accumulates into
    ``.grad`` during the block are counted like any other new storage; ``.grad`` tensors that
    already exist before the block count only when passed in ``baseline``.

    Example:
        >>> with LiveBytes(baseline=[*model.parameters(), x]) as mem:
        ...     model(x).sum().backward()
        >>> mem.peak_bytes  # doctest: +SKIP

    After the block exits, the counters are frozen: ``live_bytes`` is the value at exit.

    Attributes:
        peak_bytes: Highest live bytes seen during the block, baseline included.
        live_bytes: Current live bytes (baseline storages still alive plus new storages alive).
        baseline_bytes: Bytes of the distinct storages of the ``baseline`` tensors that are alive
            when the block is entered.
    """

    def __init__(
        self,
        *,
        baseline: Iterable[torch.Tensor] = (),
        device: str | torch.device | None = None,
    ) -> None:
        """Create the tracker (it starts counting on ``__enter__``).

        Args:
            baseline: Tensors alive before the block whose memory counts (parameters, inputs,
                buffers, existing gradients). Nested lists/tuples/dicts are flattened; storages
                shared by several tensors (views, tied weights) count once. Only weak references
                are kept, so a baseline tensor freed inside the block is taken off.
            device: Count only storages on this device (``"cpu"``, ``"cuda:0"``; a device without
                an index matches all indices of its type). ``None`` counts every device except
                ``meta`` (fake tensors have no real memory).
        """
        self._device = None if device is None else torch.device(device)
        self._lock = threading.RLock()
        self._sizes: dict[int, int] = {}  # StorageImpl address -> bytes counted for it
        self._finalizers: dict[int, weakref.finalize] = {}
        self._mode: _Mode | None = None
        self._active = False
        self._baseline: list[weakref.ref[torch.UntypedStorage]] = []
        seen: set[int] = set()
        total = 0
        for leaf in tree_leaves(list(baseline)):
            storage = _storage_of(leaf)
            if storage is None or not self._counts(storage):
                continue
            key = storage._cdata
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
            self._baseline.append(weakref.ref(storage))
        self.baseline_bytes = total
        self.live_bytes = total
        self.peak_bytes = total

    def _counts(self, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage`` is on the tracked device and has bytes."""
        dev = storage.device
        if self._device is None:
            if dev.type == "meta":
                return False
        elif dev.type != self._device.type or (
            self._device.index is not None and dev.index != self._device.index
        ):
            return False
        return storage.nbytes() > 0

    def _add(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Start counting ``storage`` (caller holds the lock)."""
        key = storage._cdata
        self._sizes[key] = nbytes
        self._finalizers[key] = weakref.finalize(storage, self._on_free, key)
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes

    def _on_free(self, key: int) -> None:
        """Finalizer: the storage ``key`` was deallocated."""
        with self._lock:
            self._finalizers.pop(key, None)
            nbytes = self._sizes.pop(key, None)
            if nbytes is not None and self._active:
                self.live_bytes -= nbytes

    def _observe(self, args: Any, kwargs: Any, out: Any) -> None:
        """Count the storages of ``out`` that no input shares and that are not yet counted."""
        outputs = [s for s in map(_storage_of, tree_leaves(out)) if s is not None]
        if not outputs:
            return
        with self._lock:
            if not self._active:
                return
            inputs: set[int] | None = None
            for storage in outputs:
                key = storage._cdata
                known = self._sizes.get(key)
                if known is not None:
                    nbytes = storage.nbytes()  # resize_ / set_ may have changed its size
                    if nbytes != known:
                        self._sizes[key] = nbytes
                        self.live_bytes += nbytes - known
                        if self.live_bytes > self.peak_bytes:
                            self.peak_bytes = self.live_bytes
                    continue
                if not self._counts(storage):
                    continue
                if inputs is None:
                    inputs = {
                        s._cdata
                        for s in map(_storage_of, tree_leaves((args, kwargs)))
                        if s is not None
                    }
                if key in inputs:  # a view or in-place result of a tensor that predates us
                    continue
                self._add(storage, storage.nbytes())

    def __enter__(self) -> LiveBytes:
        with self._lock:
            if self._active:
                raise RuntimeError("LiveBytes is not reentrant; use a new tracker")
            self._sizes.clear()
            self._finalizers.clear()
            self._active = True
            self.live_bytes = 0
            self.peak_bytes = 0
            for ref in self._baseline:
                storage = ref()
                if storage is not None and storage._cdata not in self._sizes:
                    self._add(storage, storage.nbytes())
            self.baseline_bytes = self.live_bytes
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        mode, self._mode = self._mode, None
        try:
            if mode is not None:
                mode.__exit__(exc_type, exc, tb)
        finally:
            with self._lock:
                self._active = False
                for fin in self._finalizers.values():
                    fin.detach()
                self._finalizers.clear()
                self._sizes.clear()


def measure_peak(
    fn: Callable[[], Any],
    *,
    baseline: Iterable[torch.Tensor] = (),
    device: str | torch.device | None = None,
) -> int:
    """Run ``fn()`` inside :class:`LiveBytes` and return its peak live bytes.

    What ``fn`` returns counts toward the peak (it was alive when ``fn`` returned) and is then
    dropped. Tensors allocated on a fake/meta device (``FakeTensorMode``) never count.

    Args:
        fn: The step to measure, e.g. ``lambda: model(x).sum().backward()``.
        baseline: Tensors alive before the step whose memory counts (see :class:`LiveBytes`).
        device: Only count storages on this device (see :class:`LiveBytes`).

    Returns:
        The peak live bytes, ``baseline`` included.
    """
    with LiveBytes(baseline=baseline, device=device) as mem:
        fn()
    return mem.peak_bytes


def cuda_peak(fn: Callable[[], Any], device: str | torch.device | int | None = None) -> int:
    """Run ``fn()`` and return CUDA's peak allocated bytes during it (``max_memory_allocated``).

    Resets the peak statistics of ``device`` first and synchronizes after ``fn`` so that queued
    kernels have run. The figure counts every tensor allocated on the device (parameters and
    anything else already resident included), not the caching allocator's reserve.

    Args:
        fn: The step to measure.
        device: The CUDA device; ``None`` is the current device.

    Returns:
        The peak bytes allocated on ``device`` while ``fn`` ran.

    Raises:
        RuntimeError: If CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_peak needs CUDA; use measure_peak / LiveBytes on the CPU")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
