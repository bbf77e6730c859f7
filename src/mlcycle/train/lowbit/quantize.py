"""Unbiased low-bit quantizers: per-tensor, per-sample and block Householder, plus nearest.

A quantizer maps a tensor onto a grid of ``2**bits`` levels and returns the dequantized float
tensor (training on the CPU is simulated in float). With *stochastic rounding* a value that lies
a fraction ``p`` of a step above a level rounds up with probability ``p``, so that
``E[Q(x)] = x``: SGD on quantized gradients stays unbiased and only its variance grows (Chen et
al., "A Statistical Framework for Low-bitwidth Training of Deep Neural Networks", NeurIPS 2020,
Sec. 3 and Theorem 1). The variance of one element is ``p (1 - p) step**2 <= step**2 / 4``, and
the kinds below differ only in how large ``step`` is (Sec. 4):

- :class:`PerTensorQuantizer` (Sec. 4.1): one grid for the whole tensor; a few outlier rows set
  the step of every element.
- :class:`PerSampleQuantizer` (Sec. 4.2): one grid per row (sample), so each row pays for its own
  range only.
- :class:`HouseholderQuantizer` (Sec. 4.3, block Householder): rows are grouped into blocks of
  one large row and several small ones; inside a block the large row is scaled down, the small
  rows up, and a Householder reflection spreads the large row over the whole block before
  per-row quantization. The inverse transform then averages the large row's rounding noise over
  the block, so its variance falls roughly by the block size.
- :class:`NearestQuantizer`: deterministic round-to-nearest, for comparison; it is biased.

Rows are the first dimension: a tensor of shape ``(N, ...)`` is viewed as ``N`` rows of
``numel / N`` values; a 0-d or 1-d tensor is one row. Every quantizer returns a tensor of the
input's shape and dtype, and reports the exact expected squared error of each element
(:meth:`Quantizer.variance`), which the property tests compare with Monte Carlo draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "KINDS",
    "HouseholderQuantizer",
    "NearestQuantizer",
    "PerSampleQuantizer",
    "PerTensorQuantizer",
    "Quantizer",
    "make_quantizer",
    "stochastic_round",
]

#: Names accepted by :func:`make_quantizer`.
KINDS = ("per_tensor", "per_sample", "householder", "nearest", "nearest_per_sample")
MIN_BITS, MAX_BITS = 1, 8


def stochastic_round(v: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Round each value down or up at random, up with probability equal to its fractional part.

    ``floor(v + u)`` with ``u ~ U[0, 1)`` equals ``floor(v) + 1`` exactly when
    ``u >= 1 - frac(v)``, which has probability ``frac(v)``; hence ``E[result] = v``.
    """
    u = torch.rand(v.shape, dtype=v.dtype, device=v.device, generator=generator)
    return torch.floor(v + u)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int from {MIN_BITS} to {MAX_BITS}, e.g. bits=4.")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits must be from {MIN_BITS} to {MAX_BITS} (a grid of 2**bits levels); got {bits}. "
            "Use bits=8 for near-lossless and bits=2..4 for low-bit training."
        )
    return bits


def _rows(x: Tensor) -> Tensor:
    """``x`` as a 2-d (rows, values) tensor in a float dtype that is exact enough to quantize."""
    work = x if x.dtype == torch.float64 else x.float()
    if x.dim() <= 1:
        return work.reshape(1, -1)
    return work.reshape(x.shape[0], -1)


@dataclass
class _Grid:
    """A quantization grid over a transformed 2-d tensor ``y`` and the map back to ``x``.

    Attributes:
        y: the values to quantize, (rows, values).
        lo: the lowest level of each row's grid, (rows, 1) (or (1, 1) for one shared grid).
        step: the distance between levels, same shape as ``lo``; 1 where the range is 0.
        blocks: Householder blocks ``(row indices, reflection, scales)``; ``x`` is recovered
            from ``y`` by ``x[idx] = (reflection @ y[idx]) / scales``. Empty: ``y`` is ``x``.
    """

    y: Tensor
    lo: Tensor
    step: Tensor
    blocks: list[tuple[Tensor, Tensor, Tensor]]

    def levels(self, y: Tensor | None = None) -> Tensor:
        """Position of each value on its grid, in steps above ``lo`` (in ``[0, 2**bits - 1]``)."""
        return ((self.y if y is None else y) - self.lo) / self.step

    def back(self, yhat: Tensor) -> Tensor:
        """Undo the transform on a (..., rows, values) tensor of dequantized values."""
        if not self.blocks:
            return yhat
        out = yhat.clone()
        for idx, refl, scales in self.blocks:
            out[..., idx, :] = (refl @ yhat[..., idx, :]) / scales[:, None]
        return out

    def back_variance(self, var_y: Tensor) -> Tensor:
        """Per-element variance in ``x`` space from independent per-element variances in ``y``."""
        if not self.blocks:
            return var_y
        out = var_y.clone()
        for idx, refl, scales in self.blocks:
            out[idx] = (refl.square() @ var_y[idx]) / scales.square()[:, None]
        return out


def _row_grid(y: Tensor, levels: int, *, per_row: bool) -> tuple[Tensor, Tensor]:
    """``lo`` and ``step`` of a grid of ``levels + 1`` points spanning each row (or all of y)."""
    if per_row:
        lo = y.amin(dim=1, keepdim=True)
        hi = y.amax(dim=1, keepdim=True)
    else:
        lo = y.amin().reshape(1, 1)
        hi = y.amax().reshape(1, 1)
    step = (hi - lo) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    return lo, step


class Quantizer:
    """Quantize a tensor onto a ``2**bits``-level grid and dequantize it (the base class).

    Subclasses choose the grid (:meth:`_grid`); this class rounds and reports statistics.

    Args:
        bits: bits per value, 1 to 8; the grid has ``2**bits`` levels (``2**bits - 1`` steps).
        stochastic: round stochastically (unbiased) rather than to the nearest level.

    Example:
        >>> q = PerSampleQuantizer(bits=4)
        >>> g_hat = q(g)               # same shape and dtype as g; E[g_hat] == g
        >>> q.variance(g).sum()        # exact E ||g_hat - g||^2
    """

    kind = "base"

    def __init__(self, bits: int, *, stochastic: bool = True) -> None:
        self.bits = _check_bits(bits)
        self.stochastic = bool(stochastic)

    @property
    def levels(self) -> int:
        """Number of steps of the grid, ``2**bits - 1`` (the B of the paper)."""
        return 2**self.bits - 1

    def __repr__(self) -> str:
        extra = "" if self.stochastic else ", stochastic=False"
        return f"{type(self).__name__}(bits={self.bits}{extra})"

    # -- the grid -----------------------------------------------------------------------------
    def _grid(self, x2: Tensor) -> _Grid:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- rounding -----------------------------------------------------------------------------
    def sample(self, x: Tensor, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent quantizations of ``x``, stacked: shape ``(n, *x.shape)``.

        The grid (and for Householder the transform) is computed once; only the rounding is
        drawn ``n`` times, so this is how the unbiasedness checks draw 10,000 roundings.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1 (number of quantized copies), got {n}.")
        if not x.is_floating_point():
            raise TypeError(f"Quantizers take floating tensors; got dtype {x.dtype}.")
        if x.numel() == 0:
            return x.expand(n, *x.shape).clone()
        grid = self._grid(_rows(x))
        v = grid.levels().expand(n, *grid.y.shape)
        if self.stochastic:
            q = stochastic_round(v, generator=generator)
        else:
            q = torch.round(v)
        q = q.clamp_(0, self.levels)
        out = grid.back(q * grid.step + grid.lo)
        return out.reshape(n, *x.shape).to(x.dtype)

    def __call__(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """One quantization of ``x`` (dequantized, same shape and dtype)."""
        return self.sample(x, 1, generator=generator)[0]

    # -- statistics ---------------------------------------------------------------------------
    def expected(self, x: Tensor) -> Tensor:
        """``E[Q(x)]``: ``x`` itself for stochastic rounding, the rounded ``x`` for nearest."""
        if self.stochastic:
            return x.clone()
        return self.sample(x, 1)[0]

    def variance(self, x: Tensor) -> Tensor:
        """Exact ``E[(Q(x) - x)**2]`` of every element, shape of ``x`` (float64).

        For stochastic rounding, ``p (1 - p) step**2`` per rounded value, carried back through
        the Householder transform when there is one; for nearest rounding the squared error.
        """
        if x.numel() == 0:
            return torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        if not self.stochastic:
            return (self.sample(x, 1)[0].double() - x.double()).square()
        grid = self._grid(_rows(x).double())
        v = grid.levels()
        p = (v - torch.floor(v)).clamp_(0, 1)
        var_y = p * (1 - p) * grid.step.square()
        return grid.back_variance(var_y).reshape(x.shape)


class PerTensorQuantizer(Quantizer):
    """One grid over the whole tensor, from its minimum to its maximum (PTQ, Sec. 4.1).

    Its variance is at most ``numel * R**2 / (4 B**2)`` with ``R`` the range of the tensor: a
    single outlier row sets the step for every row.
    """

    kind = "per_tensor"

    def _grid(self, x2: Tensor) -> _Grid:
        lo, step = _row_grid(x2, self.levels, per_row=False)
        return _Grid(x2, lo, step, [])


class PerSampleQuantizer(Quantizer):
    """One grid per row (sample), from the row's minimum to its maximum (PSQ, Sec. 4.2).

    Its variance is at most ``D / (4 B**2) * sum_i R_i**2`` with ``R_i`` the range of row ``i``
    and ``D`` the values per row: each row pays only for its own range.
    """

    kind = "per_sample"

    def _grid(self, x2: Tensor) -> _Grid:
        lo, step = _row_grid(x2, self.levels, per_row=True)
        return _Grid(x2, lo, step, [])


class NearestQuantizer(Quantizer):
    """Deterministic round-to-nearest on a per-tensor (or per-row) grid: biased, for comparison.

    Args:
        bits: bits per value.
        per_sample: one grid per row instead of one per tensor.
    """

    kind = "nearest"

    def __init__(self, bits: int, *, per_sample: bool = False) -> None:
        super().__init__(bits, stochastic=False)
        self.per_sample = bool(per_sample)
        if self.per_sample:
            self.kind = "nearest_per_sample"

    def __repr__(self) -> str:
        extra = ", per_sample=True" if self.per_sample else ""
        return f"NearestQuantizer(bits={self.bits}{extra})"

    def _grid(self, x2: Tensor) -> _Grid:
        lo, step = _row_grid(x2, self.levels, per_row=self.per_sample)
        return _Grid(x2, lo, step, [])


class HouseholderQuantizer(Quantizer):
    """Block Householder quantizer (BHQ, Chen et al., NeurIPS 2020, Sec. 4.3).

    Gradients of a minibatch are outlier-heavy: a few samples have gradients orders of magnitude
    larger than the rest. BHQ groups the rows into blocks, each of one large row (range
    ``lam``) and ``k`` small rows (ranges up to ``mu``), and quantizes ``T x`` per row, with
    ``T = H diag(s)`` on each block:

    1. ``diag(s)`` scales the large row by 1 and the small rows by ``t``;
    2. the Householder reflection ``H = I - 2 n n^T / |n|^2``, ``n = e_1 - 1/sqrt(k+1)``, maps the
       large row onto the all-equal direction, so every row of the block carries ``1/sqrt(k+1)``
       of it;
    3. after per-row stochastic rounding, ``x_hat = diag(1/s) H y_hat`` (``H`` is its own
       inverse). The large row of ``x_hat`` averages the independent noise of ``k + 1`` rows,
       which divides its variance by about ``k + 1``; the small rows' share of it is divided
       by ``t**2``.

    With range-sized noise, the block's variance is about ``(lam / sqrt(k+1) + t mu)**2 (1 +
    k / t**2)``, least at ``t**3 = lam k / (mu sqrt(k+1))``. Rows are sorted by range; the large
    rows are the largest ``G`` whose share ``(N - G) lam_g / sum(lam)`` of the small rows is at
    least one, and each gets a number of small rows proportional to its range. For each block
    the exact expected variance (``p (1 - p) step**2`` carried through ``T^-1``) is computed
    for ``t`` at 1/4 to 4 times that value; the best is kept, and a block that would not beat
    plain per-sample quantization is left per-sample. The quantizer is therefore never worse
    than :class:`PerSampleQuantizer` in expectation, and it is unbiased because ``T`` depends
    only on ``x``: ``E[x_hat] = T^-1 E[y_hat] = T^-1 T x = x``.

    The blocks are handled one at a time in Python; cost is ``O(N D)`` per block candidate.
    """

    kind = "householder"

    #: Multiples of the analytic ``t`` that are evaluated exactly for each block.
    T_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)

    def __init__(self, bits: int) -> None:
        super().__init__(bits, stochastic=True)

    def __repr__(self) -> str:
        return f"HouseholderQuantizer(bits={self.bits})"

    def _grid(self, x2: Tensor) -> _Grid:
        lo, step = _row_grid(x2, self.levels, per_row=True)
        n_rows = x2.shape[0]
        if n_rows < 2:
            return _Grid(x2, lo, step, [])
        ranges = (x2.amax(dim=1) - x2.amin(dim=1)).double()
        y = x2.clone()
        blocks: list[tuple[Tensor, Tensor, Tensor]] = []
        for leader, smalls in _assign_blocks(ranges):
            idx = torch.tensor([leader, *smalls], device=x2.device)
            found = self._best_block(x2[idx], ranges[leader].item(), ranges[smalls].max().item())
            if found is None:
                continue
            refl, scales = found
            y[idx] = refl @ (x2[idx] * scales[:, None])
            blocks.append((idx, refl, scales))
        if blocks:
            lo, step = _row_grid(y, self.levels, per_row=True)
        return _Grid(y, lo, step, blocks)

    def _best_block(self, xb: Tensor, lam: float, mu: float) -> tuple[Tensor, Tensor] | None:
        """The reflection and row scales of the best candidate for one block, or None when
        per-sample quantization of these rows has no larger expected variance."""
        size = xb.shape[0]
        k = size - 1
        dtype = xb.dtype
        refl = _householder(size, dtype=dtype, device=xb.device)
        plain = _block_variance(
            xb[None],
            torch.eye(size, dtype=dtype, device=xb.device)[None],
            torch.ones(1, size, dtype=dtype, device=xb.device),
            self.levels,
        )
        if lam <= 0:
            return None
        t0 = (lam * k / (max(mu, lam * 1e-6) * math.sqrt(size))) ** (1.0 / 3.0)
        ts = torch.tensor([t0 * f for f in self.T_FACTORS], dtype=dtype, device=xb.device)
        scales = torch.ones(len(ts), size, dtype=dtype, device=xb.device)
        scales[:, 1:] = ts[:, None]
        scales = scales / scales.amax(dim=1, keepdim=True)  # keep values at the input's scale
        cand = _block_variance(xb[None].expand(len(ts), -1, -1), refl[None], scales, self.levels)
        best = int(torch.argmin(cand))
        if not cand[best] < plain[0]:
            return None
        return refl, scales[best]


def _householder(size: int, *, dtype: torch.dtype, device: Any) -> Tensor:
    """The reflection that swaps ``e_1`` and the unit all-equal vector ``1/sqrt(size)``."""
    n = torch.full((size,), -1.0 / math.sqrt(size), dtype=dtype, device=device)
    n[0] += 1.0
    eye = torch.eye(size, dtype=dtype, device=device)
    norm_sq = n.dot(n)
    if norm_sq <= 0:  # size 1: e_1 is already the all-equal vector
        return eye
    return eye - 2.0 * torch.outer(n, n) / norm_sq


def _block_variance(xb: Tensor, refl: Tensor, scales: Tensor, levels: int) -> Tensor:
    """Exact expected squared error, summed over a block, for each candidate (batched).

    ``xb``: (c, size, D) rows; ``refl``: (c or 1, size, size); ``scales``: (c, size). The block
    is transformed to ``y = refl @ (scales * x)``, quantized per row, and mapped back.
    """
    y = refl @ (xb * scales[..., None])
    lo = y.amin(dim=2, keepdim=True)
    step = (y.amax(dim=2, keepdim=True) - lo) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    v = (y - lo) / step
    p = (v - torch.floor(v)).clamp_(0, 1)
    var_y = p * (1 - p) * step.square()
    var_x = (refl.square() @ var_y) / scales.square()[..., None]
    return var_x.sum(dim=(1, 2))


def _assign_blocks(ranges: Tensor) -> list[tuple[int, list[int]]]:
    """Blocks of one large row and its small rows, from the rows' ranges (Sec. 4.3).

    Rows sorted by range, largest first: the large rows are the first ``G``, the largest ``G``
    for which the last of them would still get at least one small row when the ``N - G`` small
    rows are shared in proportion to range; each large row takes the next small rows in order
    (cumulative rounding of its share). Large rows with no share are left alone.
    """
    n_rows = ranges.numel()
    values, order = torch.sort(ranges, descending=True)
    if n_rows < 2 or values[0] <= 0:
        return []
    cum = torch.cumsum(values, 0)
    g_count = 0
    for g in range(1, n_rows):
        if (n_rows - g) * values[g - 1] >= cum[g - 1]:
            g_count = g
        else:
            break
    if g_count == 0:
        return []
    n_small = n_rows - g_count
    bounds = torch.round(n_small * cum[:g_count] / cum[g_count - 1]).long().tolist()
    order_list = order.tolist()
    blocks: list[tuple[int, list[int]]] = []
    start = 0
    for g in range(g_count):
        stop = bounds[g]
        smalls = order_list[g_count + start : g_count + stop]
        if smalls:
            blocks.append((order_list[g], smalls))
        start = stop
    return blocks


def make_quantizer(kind: str, bits: int) -> Quantizer:
    """A quantizer by name.

    Args:
        kind: ``"per_tensor"``, ``"per_sample"``, ``"householder"`` (stochastic, unbiased),
            ``"nearest"`` or ``"nearest_per_sample"`` (deterministic, biased).
        bits: bits per value, 1 to 8.

    Raises:
        ValueError: an unknown kind or a bit width outside 1..8.
    """
    if kind == "per_tensor":
        return PerTensorQuantizer(bits)
    if kind == "per_sample":
        return PerSampleQuantizer(bits)
    if kind == "householder":
        return HouseholderQuantizer(bits)
    if kind == "nearest":
        return NearestQuantizer(bits)
    if kind == "nearest_per_sample":
        return NearestQuantizer(bits, per_sample=True)
    raise ValueError(f"Unknown quantizer kind {kind!r}; choose one of {', '.join(KINDS)}.")
