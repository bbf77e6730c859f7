"""Quantizers: unbiased, exact variance formulas, and Householder <= per-sample <= per-tensor."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from mlcycle.train.lowbit.quantize import (  # noqa: E402
    HouseholderQuantizer,
    NearestQuantizer,
    PerSampleQuantizer,
    PerTensorQuantizer,
    _assign_blocks,
    _householder,
    make_quantizer,
    stochastic_round,
)

STOCHASTIC = ("per_tensor", "per_sample", "householder")


def outlier_tensor(rows: int, cols: int, outliers: int, scale: float, seed: int) -> torch.Tensor:
    """Gaussian rows with log-normal magnitudes; ``outliers`` rows ``scale`` times larger."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    mags = torch.exp(0.5 * torch.randn(rows, 1, generator=gen, dtype=torch.float64))
    mags[torch.randperm(rows, generator=gen)[:outliers]] *= scale
    return x * mags


shapes = st.one_of(
    st.tuples(st.integers(1, 24)),
    st.tuples(st.integers(1, 12), st.integers(1, 16)),
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5)),
)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(STOCHASTIC),
    shape=shapes,
    bits=st.integers(1, 8),
    outlier_scale=st.sampled_from([1.0, 10.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_stochastic_rounding_is_unbiased(
    kind: str, shape: tuple[int, ...], bits: int, outlier_scale: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if x.dim() >= 2:
        x[0] *= outlier_scale
    q = make_quantizer(kind, bits)
    n = 2000
    draws = q.sample(x, n, generator=gen)
    assert draws.shape == (n, *shape) and draws.dtype == x.dtype
    mean = draws.mean(dim=0)
    sigma = q.variance(x).sqrt()
    tol = 1e-9 * float(x.abs().max()) + 1e-12
    # every element within 5 standard errors (P(miss) ~ 6e-7 per element when unbiased)
    assert ((mean - x).abs() <= 5 * sigma / math.sqrt(n) + tol).all()
    # and the sum of the errors within 5 of its own standard error
    total_se = math.sqrt(float(q.variance(x).sum()) / n)
    assert abs(float((mean - x).sum())) <= 5 * total_se + tol * x.numel()


def test_nearest_rounding_is_biased_and_would_fail_the_unbiasedness_check() -> None:
    x = torch.linspace(0, 1, 64, dtype=torch.float64).reshape(8, 8)
    near = NearestQuantizer(2)
    sr = PerTensorQuantizer(2)  # the same grid, rounded stochastically
    n = 2000
    mean = near.sample(x, n).mean(dim=0)
    se = sr.variance(x).sqrt() / math.sqrt(n)
    z = (mean - x).abs() / se.clamp_min(1e-300)
    assert float(z.max()) > 50  # the bias is deterministic: many standard errors off
    assert torch.equal(near.expected(x), near(x))  # deterministic
    assert float(near.variance(x).sum()) > 0  # its squared error is a bias, not a variance


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(STOCHASTIC),
    rows=st.integers(2, 24),
    cols=st.integers(1, 32),
    bits=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_exact_variance_matches_monte_carlo(
    kind: str, rows: int, cols: int, bits: int, seed: int
) -> None:
    x = outlier_tensor(rows, cols, outliers=1, scale=50.0, seed=seed)
    q = make_quantizer(kind, bits)
    gen = torch.Generator().manual_seed(seed + 1)
    n = 1000
    sq = (q.sample(x, n, generator=gen) - x).square().sum(dim=tuple(range(1, x.dim() + 1)))
    exact = float(q.variance(x).sum())
    se = float(sq.std()) / math.sqrt(n)
    assert abs(float(sq.mean()) - exact) <= 5 * se + 1e-9 * exact + 1e-15


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(8, 48),
    cols=st.integers(16, 96),
    bits=st.integers(1, 8),
    outliers=st.integers(1, 3),
    scale=st.floats(30.0, 1000.0),
    seed=st.integers(0, 2**16),
)
def test_variance_ordering_on_outlier_heavy_tensors(
    rows: int, cols: int, bits: int, outliers: int, scale: float, seed: int
) -> None:
    """Householder <= per-sample <= per-tensor (Chen et al., NeurIPS 2020, Sec. 4), exactly in
    expectation; and Householder well below per-sample when a few rows are >= 100x larger."""
    outliers = max(1, min(outliers, rows // 8))  # outlier rows are a few of the batch
    x = outlier_tensor(rows, cols, outliers=outliers, scale=scale, seed=seed)
    v = {k: float(make_quantizer(k, bits).variance(x).sum()) for k in STOCHASTIC}
    assert v["householder"] <= v["per_sample"] <= v["per_tensor"]
    if scale >= 100:
        assert v["householder"] <= 0.5 * v["per_sample"]


def test_variance_ratios_on_a_gradient_sized_tensor() -> None:
    """The benchmark's tensor: 128 x 512, 4 rows 100x larger, at 4, 5 and 8 bits."""
    x = outlier_tensor(128, 512, outliers=4, scale=100.0, seed=0)
    for bits in (4, 5, 8):
        v = {k: float(make_quantizer(k, bits).variance(x).sum()) for k in STOCHASTIC}
        assert v["per_tensor"] >= 20 * v["per_sample"]
        assert v["per_sample"] >= 10 * v["householder"]


def test_variance_grows_about_fourfold_per_bit_removed() -> None:
    """Each bit removed doubles the step, so (for dense rows) the variance grows ~4x: more
    than 2x in standard deviation (NeurIPS 2020, Sec. 4)."""
    x = outlier_tensor(64, 256, outliers=2, scale=100.0, seed=0)
    for kind in ("per_sample", "householder"):
        v = [float(make_quantizer(kind, b).variance(x).sum()) for b in range(2, 9)]
        ratios = [a / b for a, b in zip(v, v[1:], strict=False)]
        assert all(4.0 <= r < 6.0 for r in ratios), (kind, ratios)


def test_householder_matches_per_sample_without_outliers_and_never_exceeds_it() -> None:
    x = torch.randn(32, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ps = float(PerSampleQuantizer(4).variance(x).sum())
    bhq = float(HouseholderQuantizer(4).variance(x).sum())
    assert bhq <= ps
    assert bhq >= 0.5 * ps  # no outliers: little to gain


def test_householder_is_exact_on_its_grid_and_undoes_its_transform() -> None:
    x = outlier_tensor(16, 32, outliers=2, scale=100.0, seed=1)
    q = HouseholderQuantizer(8)
    grid = q._grid(x)
    assert grid.blocks, "an outlier-heavy tensor should get Householder blocks"
    back = grid.back(grid.y)
    assert torch.allclose(back, x, rtol=0, atol=1e-10 * float(x.abs().max()))


def test_reflection_is_orthogonal_and_spreads_the_first_row() -> None:
    for size in (1, 2, 5, 16):
        h = _householder(size, dtype=torch.float64, device="cpu")
        assert torch.allclose(h @ h, torch.eye(size, dtype=torch.float64), atol=1e-12)
        e1 = torch.zeros(size, dtype=torch.float64)
        e1[0] = 1
        assert torch.allclose(h @ e1, torch.full((size,), size**-0.5, dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(ranges=st.lists(st.floats(0.0, 1e4), min_size=1, max_size=64))
def test_blocks_partition_rows_with_the_largest_as_leaders(ranges: list[float]) -> None:
    r = torch.tensor(ranges, dtype=torch.float64)
    blocks = _assign_blocks(r)
    used = [i for leader, smalls in blocks for i in (leader, *smalls)]
    assert len(used) == len(set(used))  # no row twice
    for leader, smalls in blocks:
        assert smalls and all(r[leader] >= r[s] for s in smalls)


def test_constant_and_degenerate_inputs_are_exact() -> None:
    for kind in (*STOCHASTIC, "nearest"):
        q = make_quantizer(kind, 2)
        c = torch.full((4, 5), 3.25)
        assert torch.equal(q(c), c)
        assert torch.equal(q(torch.tensor(1.5)), torch.tensor(1.5))
        empty = torch.empty(0, 3)
        assert q(empty).shape == (0, 3)


def test_levels_and_values_lie_on_the_grid() -> None:
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    for bits in (1, 2, 3, 8):
        out = PerSampleQuantizer(bits)(x)
        lo = x.amin(dim=1, keepdim=True)
        step = (x.amax(dim=1, keepdim=True) - lo) / (2**bits - 1)
        k = (out - lo) / step
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert int(k.round().unique().numel()) <= 2**bits


def test_dtype_and_shape_are_kept() -> None:
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(3, 4, 5).to(dtype)
        for kind in (*STOCHASTIC, "nearest_per_sample"):
            out = make_quantizer(kind, 4)(x)
            assert out.shape == x.shape and out.dtype == dtype


def test_stochastic_round_probability_equals_fraction() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.full((200_000,), 2.3, dtype=torch.float64)
    r = stochastic_round(v, generator=gen)
    assert set(r.unique().tolist()) == {2.0, 3.0}
    assert abs(float((r == 3).double().mean()) - 0.3) < 0.005


def test_bad_arguments_say_what_is_valid() -> None:
    with pytest.raises(ValueError, match="from 1 to 8"):
        PerTensorQuantizer(9)
    with pytest.raises(ValueError, match="from 1 to 8"):
        HouseholderQuantizer(0)
    with pytest.raises(TypeError, match="int"):
        PerSampleQuantizer(4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_sample"):
        make_quantizer("per_channel", 4)
    with pytest.raises(TypeError, match="floating"):
        PerTensorQuantizer(4)(torch.arange(5))
    with pytest.raises(ValueError, match="n must be"):
        PerTensorQuantizer(4).sample(torch.randn(3), 0)
