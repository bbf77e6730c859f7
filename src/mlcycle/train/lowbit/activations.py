"""Compressed saved activations (ActNN, Chen et al., ICML 2021) through saved-tensor hooks.

Training memory is dominated by the activations that the forward pass saves for backward.
ActNN stores them at 2 bits, per group with a scale and a zero point, and decompresses them
when backward needs them. Stochastic rounding keeps the gradient unbiased (Sec. 3, Theorem 1)
for every op whose backward reads a saved tensor linearly (Linear and convolution weight
gradients, products) or only through its sign (ReLU, whose zeros are kept exact below); ops
whose backward is nonlinear in it (tanh, GELU, softmax, normalisation) get a bias of the order
of the rounding variance. The forward pass itself is untouched, so it stays exact.

:func:`compress_activations` does this for any module through
``torch.autograd.graph.saved_tensors_hooks``:

- a floating tensor saved for backward (at least ``min_numel`` values, not a parameter) is
  split into groups of ``group_size`` consecutive values; each group stores its minimum (the
  zero point) and its step (the scale) in float16 when they fit (float32 otherwise) and its
  values as ``bits``-bit integers, stochastically rounded and bit-packed into ``uint8``
  (8 / bits values per byte): ``bits + 32 / group_size`` bits per value in all; in a
  nonnegative tensor with exact zeros (a ReLU output) level 0 is kept for exact zeros and the
  other levels span each group's positive values;
- boolean tensors (masks) are bit-packed losslessly, 1 bit per value; integer tensors (max-pool
  indices) are stored losslessly in the narrowest integer type that holds their range;
- a tensor saved more than once (as ``x`` and as ``x.t()``, or by two ops) is stored once;
- everything else (parameters, small tensors) is kept as is.

Its :class:`ActivationStats` counts the bytes that the plain step would keep for the same saved
tensors and the bytes the hooks store, every scale, zero point and kept tensor included.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ActivationStats",
    "CompressedActivations",
    "PackedTensor",
    "compress_activations",
    "pack",
    "packed_bits_per_value",
    "unpack",
]

SUPPORTED_BITS = (1, 2, 4, 8)
META_BYTES_PER_GROUP = 4  # a float16 scale and a float16 zero point
DEFAULT_GROUP_SIZE = 256
DEFAULT_MIN_NUMEL = 1024
CHUNK_VALUES = 2**17  # at most this many values (or 1/8 of the tensor) are packed at a time
CHUNK_VALUES_ACCELERATOR = 2**22
MIN_CHUNK_VALUES = 2**12
_CONTEXTS = itertools.count()  # numbers each context's own rounding seed
_F16_MAX = 65504.0
_F16_TINY = 6.2e-5  # smallest normal float16: smaller steps keep float32 metadata


def packed_bits_per_value(
    bits: int, group_size: int, meta_bytes: int = META_BYTES_PER_GROUP
) -> float:
    """Bits stored per value of a compressed floating tensor: payload plus group metadata."""
    return bits + 8.0 * meta_bytes / group_size


def _check(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits must be one of {SUPPORTED_BITS} (values per byte must be whole); got {bits}. "
            "ActNN's setting is bits=2."
        )
    if group_size < 8 or group_size % 8:
        raise ValueError(
            f"group_size must be a positive multiple of 8 (whole bytes per group at any bit "
            f"width); got {group_size}. Larger groups store less metadata, e.g. 256."
        )


@dataclass(eq=False)
class PackedTensor:
    """A tensor stored in low bit: what the hooks keep in place of a saved activation.

    Attributes:
        kind: ``"float"`` (lossy, grouped), ``"bool"`` (bit-packed) or ``"int"`` (narrowed).
        payload: the packed values (uint8 for float and bool; the narrow int dtype for int).
        scale: per-group step (float kinds), else None.
        zero: per-group zero point (float kinds), else the integer offset for ``"int"``.
        shape: the logical shape of the original tensor (in ``perm`` order, see below).
        dtype: the original dtype.
        bits: bits per value of ``payload`` (float kinds).
        numel: number of values.
        exact_zeros: level 0 stands for exactly 0 and levels 1.. span each group's positive
            values (see :func:`pack`).
    """

    kind: str
    payload: Tensor
    scale: Tensor | None
    zero: Tensor | int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    numel: int
    exact_zeros: bool = False
    __weakref__: Any = field(default=None, init=False, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes held: payload, scales and zero points."""
        total = self.payload.numel() * self.payload.element_size()
        for t in (self.scale, self.zero):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
        return total


def _next(t: Tensor, toward: float) -> Tensor:
    """The next representable value of ``t``'s dtype toward ``toward`` (elementwise)."""
    target = torch.full_like(t, toward)
    try:
        return torch.nextafter(t, target)
    except (RuntimeError, NotImplementedError):  # older torch: no float16 kernel on the device
        return torch.nextafter(t.cpu(), target.cpu()).to(t.device)


def _round_meta(
    lo: Tensor, hi: Tensor, levels: int, *, positive: bool = False
) -> tuple[Tensor, Tensor]:
    """Zero point and step per group, rounded so that the stored grid still spans each group.

    The zero point is rounded down and the step up to the storage dtype, so every value lies in
    ``[zero, zero + levels * step]`` and stochastic rounding onto the *stored* grid is unbiased.
    float16 is used when that costs at most a quarter more step than exact (and nothing
    overflows, and with ``positive`` no zero point of a positive group rounds down to 0);
    otherwise float32, which is exact for float32 activations.
    """
    exact = (hi - lo) / levels
    for meta in (torch.float16, torch.float32):
        z = lo.to(meta)
        z = torch.where(z.float() > lo, _next(z, -math.inf), z)
        s = ((hi - z.float()) / levels).to(meta)
        short = s.float() * levels + z.float() < hi
        s = torch.where(short, _next(s, math.inf), s)
        if meta == torch.float32:
            return z, s
        finite = bool(torch.isfinite(z).all() and torch.isfinite(s).all())
        coarse = (s.float() > 1.25 * exact) & (exact > 0)
        if positive:
            coarse |= (z <= 0) & (hi > 0)
        if finite and not bool(coarse.any()):
            return z, s
    raise AssertionError("unreachable")  # pragma: no cover


def pack(
    x: Tensor,
    bits: int = 2,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> PackedTensor:
    """Compress ``x`` (see the module docstring); :func:`unpack` restores it.

    Floating tensors are quantized per group (lossy, unbiased with ``stochastic``); boolean and
    integer tensors are stored losslessly.
    """
    _check(bits, group_size)
    shape = tuple(x.shape)
    numel = x.numel()
    if x.dtype == torch.bool:
        flat = x.reshape(-1)
        pad = (-numel) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        payload = _pack_bits(flat.to(torch.uint8), 1)
        return PackedTensor("bool", payload, None, None, shape, x.dtype, 1, numel)
    if not x.is_floating_point():
        lo = int(x.min()) if numel else 0
        span = (int(x.max()) - lo) if numel else 0
        narrow = next(
            (
                d
                for d, top in ((torch.uint8, 255), (torch.int16, 32767), (torch.int32, 2**31 - 1))
                if span <= top
            ),
            x.dtype,
        )
        payload = (x.reshape(-1) - lo).to(narrow) if narrow != x.dtype else x.reshape(-1).clone()
        return PackedTensor("int", payload, None, lo, shape, x.dtype, 0, numel)

    levels = 2**bits - 1
    if numel == 0:
        empty = torch.empty(0, 1, device=x.device)
        return PackedTensor(
            "float", empty.to(torch.uint8).reshape(-1), empty, empty, shape, x.dtype, bits, 0
        )
    # Full groups are views of x; the last, partial group is padded with its last value (which
    # leaves its range unchanged). Work happens in chunks, so temporaries stay small.
    flat = x.detach().reshape(-1)
    full = numel // group_size
    parts = [flat[: full * group_size].view(full, group_size)] if full else []
    if numel > full * group_size:
        tail = flat[full * group_size :]
        parts.append(torch.cat([tail, tail[-1:].expand(group_size - tail.numel())])[None])
    # A nonnegative tensor with zeros (a ReLU output) keeps its zeros exact: level 0 is 0 and
    # the other levels span each group's positive values, so the sign pattern that ReLU's
    # backward reads is exact and the positive values are still rounded without bias.
    exact_zeros = bits >= 2 and bool(flat.min() == 0)
    grid = levels - 1 if exact_zeros else levels
    chunk = _chunk_groups(numel, group_size, x.device)
    blocks = [part[i : i + chunk] for part in parts for i in range(0, part.shape[0], chunk)]
    if exact_zeros:  # the least positive value of each group (inf when it has none)
        lo = torch.cat([b.masked_fill(b <= 0, math.inf).amin(1, keepdim=True) for b in blocks])
        lo = torch.where(torch.isinf(lo), 0.0, lo).float()
    else:
        lo = torch.cat([b.amin(dim=1, keepdim=True) for b in blocks]).float()
    hi = torch.cat([b.amax(dim=1, keepdim=True) for b in blocks]).float()
    z, s = _round_meta(lo, hi, grid, positive=exact_zeros)
    zf = z.float()
    inv_step = torch.where(s > 0, 1.0 / s.float(), torch.zeros_like(zf))
    bytes_per_group = group_size * bits // 8
    payload = torch.empty(lo.shape[0] * bytes_per_group, dtype=torch.uint8, device=x.device)
    g0 = 0
    for block in blocks:
        g1 = g0 + block.shape[0]
        shifted = block - zf[g0:g1]  # >= 0 (for positives): z <= each group's minimum
        if stochastic:  # floor((x - z) / step + u), u ~ U[0, 1)
            v = torch.rand(block.shape, generator=generator, device=block.device)
            v.addcmul_(shifted, inv_step[g0:g1]).floor_()
        else:
            v = shifted.mul_(inv_step[g0:g1]).round_()
        v.clamp_(0, grid)
        if exact_zeros:  # level 0 only for exact zeros, 1.. for positive values
            v.add_(1).mul_(block > 0)
        q = v.to(torch.uint8)
        _pack_bits_into(q.view(-1), bits, payload[g0 * bytes_per_group : g1 * bytes_per_group])
        g0 = g1
    return PackedTensor("float", payload, s, z, shape, x.dtype, bits, numel, exact_zeros)


def unpack(p: PackedTensor) -> Tensor:
    """The tensor that :func:`pack` stored (dequantized for floating tensors)."""
    if p.kind == "bool":
        return _unpack_bits(p.payload, 1)[: p.numel].bool().reshape(p.shape)
    if p.kind == "int":
        offset = int(p.zero) if p.zero is not None else 0
        return (p.payload.to(p.dtype) + offset).reshape(p.shape)
    if not isinstance(p.scale, Tensor) or not isinstance(p.zero, Tensor):
        raise TypeError("A packed floating tensor needs scale and zero tensors; repack it.")
    out = torch.empty(p.numel, dtype=p.dtype, device=p.payload.device)
    if p.numel == 0:
        return out.reshape(p.shape)
    n_groups = p.scale.shape[0]
    group_size = p.payload.numel() * 8 // p.bits // n_groups
    bytes_per_group = group_size * p.bits // 8
    chunk = _chunk_groups(p.numel, group_size, p.payload.device)
    scale, zero = p.scale.float(), p.zero.float()
    for g0 in range(0, n_groups, chunk):
        g1 = min(n_groups, g0 + chunk)
        q = _unpack_bits(p.payload[g0 * bytes_per_group : g1 * bytes_per_group], p.bits)
        qf = q.view(g1 - g0, group_size).float()
        if p.exact_zeros:  # level k >= 1 is zero + (k - 1) * scale; level 0 is exactly 0
            vals = torch.addcmul(zero[g0:g1] - scale[g0:g1], qf, scale[g0:g1])
            vals.mul_(qf > 0)
        else:
            vals = torch.addcmul(zero[g0:g1], qf, scale[g0:g1])
        stop = min(p.numel, g1 * group_size)
        out[g0 * group_size : stop] = vals.view(-1)[: stop - g0 * group_size]
    return out.reshape(p.shape)


def _chunk_groups(numel: int, group_size: int, device: torch.device) -> int:
    """Groups handled at a time: about 1/8 of the tensor, within [4K, 128K] values on the CPU
    (up to 4M on an accelerator, where each op is a kernel launch). The temporaries of a chunk
    (~9 bytes per value) stay small beside the tensor itself."""
    most = CHUNK_VALUES if device.type == "cpu" else CHUNK_VALUES_ACCELERATOR
    values = min(most, max(MIN_CHUNK_VALUES, numel // 8))
    return max(1, values // group_size)


def _pack_bits(q: Tensor, bits: int) -> Tensor:
    """uint8 values below ``2**bits`` packed ``8 // bits`` to a byte (first value lowest)."""
    out = torch.empty(q.numel() * bits // 8, dtype=torch.uint8, device=q.device)
    _pack_bits_into(q, bits, out)
    return out


def _pack_bits_into(q: Tensor, bits: int, out: Tensor) -> None:
    """:func:`_pack_bits` into a preallocated ``out`` of ``q.numel() * bits // 8`` bytes."""
    if bits == 8:
        out.copy_(q)
        return
    per = 8 // bits
    cols = q.view(-1, per)
    out.copy_(cols[:, 0])
    for i in range(1, per):
        out |= cols[:, i] << (bits * i)


def _unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`_pack_bits`: one uint8 value per packed field."""
    if bits == 8:
        return packed
    per = 8 // bits
    mask = (1 << bits) - 1
    out = torch.empty(packed.numel(), per, dtype=torch.uint8, device=packed.device)
    for i in range(per):
        torch.bitwise_and(packed >> (bits * i), mask, out=out[:, i])
    return out.reshape(-1)


# ------------------------------------------------------------------------------------------
# The hooks


@dataclass
class ActivationStats:
    """Byte counts of the tensors saved for backward while :func:`compress_activations` ran.

    Attributes:
        original_bytes: what the plain step keeps for the same saved tensors: each storage
            counted once, and no more than its size (a tensor saved as ``x`` and ``x.t()``, or
            by two ops, counts once).
        stored_bytes: what the hooks keep: packed payloads, scales and zero points, and the
            tensors kept as they are.
        compressed: number of tensors stored in low bit (floating) or bit-packed / narrowed.
        kept: number of non-parameter tensors kept as they are (small ones).
        reused: saves answered with an already stored tensor.
        parameters: saves of parameters (never compressed, counted in neither total).
    """

    original_bytes: int = 0
    stored_bytes: int = 0
    compressed: int = 0
    kept: int = 0
    reused: int = 0
    parameters: int = 0

    @property
    def reduction(self) -> float:
        """``original_bytes / stored_bytes``: how many times less memory the activations take."""
        return self.original_bytes / self.stored_bytes if self.stored_bytes else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_bytes": self.original_bytes,
            "stored_bytes": self.stored_bytes,
            "reduction": self.reduction,
            "compressed": self.compressed,
            "kept": self.kept,
            "reused": self.reused,
            "parameters": self.parameters,
        }


@dataclass(eq=False)
class _Stored:
    """What unpack receives: the packed (or kept) tensor and how to lay it out again."""

    data: PackedTensor | Tensor
    perm: tuple[int, ...] | None  # dims of the saved tensor in packed order; None: as saved


class CompressedActivations:
    """The context manager behind :func:`compress_activations`; ``stats`` holds the counts."""

    def __init__(
        self,
        bits: int = 2,
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
        min_numel: int = DEFAULT_MIN_NUMEL,
        module: nn.Module | None = None,
        stochastic: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        _check(bits, group_size)
        if min_numel < 0:
            raise ValueError(f"min_numel must be >= 0, got {min_numel}.")
        self.bits = bits
        self.group_size = group_size
        self.min_numel = min_numel
        self.stochastic = stochastic
        self.generator = generator
        # Own generators (one per device), seeded from the global seed without drawing from the
        # global stream: compressing must not change the dropout masks the model draws.
        self._seed = (torch.initial_seed() * 1_000_003 + next(_CONTEXTS)) % (2**63)
        self._generators: dict[torch.device, torch.Generator] = {}
        self.stats = ActivationStats()
        self._param_storages: set[int] = set()
        if module is not None:
            for t in [*module.parameters(), *module.buffers()]:
                self._param_storages.add(t.untyped_storage().data_ptr())
        # canonical view -> (weak storage, version, weak stored); storage -> counted bytes
        self._cache: dict[tuple[Any, ...], tuple[Any, int, Any]] = {}
        self._storage_bytes: dict[int, tuple[Any, int, int]] = {}
        self._hooks: Any = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is not None:
            return self.generator
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    # -- parameters -------------------------------------------------------------------------
    def _is_parameter(self, t: Tensor) -> bool:
        if t.untyped_storage().data_ptr() in self._param_storages:
            return True
        if isinstance(t, nn.Parameter):
            return True
        base = t._base if t._base is not None else t
        return bool(base.is_leaf and base.requires_grad)

    # -- accounting -------------------------------------------------------------------------
    def _count_original(self, t: Tensor) -> None:
        """Add ``t``'s bytes to the plain total, each storage at most its size."""
        storage = t.untyped_storage()
        key = storage.data_ptr()
        nbytes = t.numel() * t.element_size()
        entry = self._storage_bytes.get(key)
        if entry is not None and entry[0]() is storage:
            _, counted, cap = entry
            add = min(nbytes, cap - counted)
            self._storage_bytes[key] = (entry[0], counted + add, cap)
        else:
            add = min(nbytes, storage.nbytes())
            self._storage_bytes[key] = (weakref.ref(storage), add, storage.nbytes())
        self.stats.original_bytes += add

    # -- hooks -------------------------------------------------------------------------------
    def _pack_hook(self, t: Tensor) -> Any:
        if self._is_parameter(t):
            self.stats.parameters += 1
            return t
        perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
        storage = t.untyped_storage()
        key = (
            storage.data_ptr(),
            t.storage_offset(),
            tuple((t.shape[d], t.stride(d)) for d in perm),
            t.dtype,
            t.device,
        )
        hit = self._cache.get(key)
        if hit is not None:
            storage_ref, version, stored_ref = hit
            stored = stored_ref()
            if storage_ref() is storage and version == t._version and stored is not None:
                self.stats.reused += 1
                return _Stored(stored.data, perm)
        self._count_original(t)
        compress = t.numel() >= self.min_numel and not t.is_complex()
        if compress:
            canonical = t.detach().permute(perm)
            data: PackedTensor | Tensor = pack(
                canonical,
                self.bits,
                group_size=self.group_size,
                stochastic=self.stochastic,
                generator=self._generator(t.device),
            )
            self.stats.compressed += 1
            self.stats.stored_bytes += data.nbytes
            stored = _Stored(data, perm)
        else:
            self.stats.kept += 1
            self.stats.stored_bytes += t.numel() * t.element_size()
            stored = _Stored(t, None)
        self._cache[key] = (weakref.ref(storage), t._version, weakref.ref(stored))
        return stored

    @staticmethod
    def _unpack_hook(stored: Any) -> Tensor:
        if not isinstance(stored, _Stored):
            return stored  # a parameter, saved as is
        if isinstance(stored.data, Tensor):
            return stored.data
        canonical = unpack(stored.data)
        if stored.perm is None:
            return canonical
        inverse = [0] * len(stored.perm)
        for i, d in enumerate(stored.perm):
            inverse[d] = i
        return canonical.permute(inverse)

    def __enter__(self) -> ActivationStats:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack_hook, self._unpack_hook)
        self._hooks.__enter__()
        return self.stats

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._cache.clear()
        self._storage_bytes.clear()


def compress_activations(
    bits: int = 2,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    min_numel: int = DEFAULT_MIN_NUMEL,
    module: nn.Module | None = None,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> CompressedActivations:
    """Store the tensors saved for backward in low bit while the block runs (ActNN).

    Run the forward pass inside the block; backward may run inside or after it (the packed
    tensors carry what unpacking needs). The forward result is exactly the uncompressed one.

    Args:
        bits: bits per saved floating value: 1, 2, 4 or 8 (ActNN: 2).
        group_size: values per group sharing one scale and zero point (a multiple of 8). The
            metadata costs ``32 / group_size`` bits per value: 256 gives 2.125 bits at 2 bits,
            15x less than float32.
        min_numel: tensors with fewer values are kept as they are.
        module: the model, so that its parameters and buffers are never compressed; without
            it, leaf tensors that require grad (and their views) are taken for parameters.
        stochastic: stochastic rounding (unbiased gradients); False rounds to nearest.
        generator: random generator for the rounding. When None, the context seeds its own
            (from ``torch.initial_seed()`` and a counter, so runs are reproducible) and never
            draws from the global generator: dropout masks are the same with and without
            compression.

    Returns:
        A context manager; ``with compress_activations(2) as stats:`` binds the
        :class:`ActivationStats` that counts the bytes.

    Example:
        >>> with compress_activations(bits=2, module=model) as stats:
        ...     loss = loss_fn(model(x), y)
        >>> loss.backward()
        >>> stats.reduction      # e.g. 14.1: float32 saved bytes / bytes the hooks hold
    """
    return CompressedActivations(
        bits,
        group_size=group_size,
        min_numel=min_numel,
        module=module,
        stochastic=stochastic,
        generator=generator,
    )
