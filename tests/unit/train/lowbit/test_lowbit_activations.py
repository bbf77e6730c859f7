"""Compressed saved activations: bit-packed storage, exact forward, unbiased, counted bytes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from mlcycle.train.lowbit.activations import (  # noqa: E402
    PackedTensor,
    compress_activations,
    pack,
    packed_bits_per_value,
    unpack,
)


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(1, 3000),
    bits=st.sampled_from([1, 2, 4, 8]),
    group_size=st.sampled_from([8, 64, 256]),
    seed=st.integers(0, 2**16),
)
def test_pack_roundtrip_is_on_a_covering_grid_and_takes_packed_bytes(
    numel: int, bits: int, group_size: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * 3 + 1
    p = pack(x, bits, group_size=group_size, generator=gen)
    y = unpack(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    groups = math.ceil(numel / group_size)
    assert p.payload.dtype == torch.uint8
    assert p.payload.numel() == groups * group_size * bits // 8  # really bit-packed
    assert p.scale is not None and p.scale.numel() == groups
    # each value moved by less than one step of its group's grid
    padded = torch.cat([x, x[-1:].expand(groups * group_size - numel)]).view(groups, -1)
    step = (padded.amax(1) - padded.amin(1)) / (2**bits - 1)
    err = (y - x).abs()
    bound = step.repeat_interleave(group_size)[:numel] * 1.26 + 1e-5  # 1.25: float16 metadata
    assert (err <= bound).all()


def test_stochastic_pack_is_unbiased_and_nearest_is_not() -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(512, generator=gen, dtype=torch.float32) * 2 - 1).double()
    n = 3000
    p = pack(x.float(), 2, generator=gen)
    draws = torch.stack([unpack(pack(x.float(), 2, generator=gen)) for _ in range(n)]).double()
    # the exact standard error of each mean, from the stored grid: sqrt(p (1 - p)) step / sqrt(n)
    step = p.scale.double().repeat_interleave(256)
    zero = p.zero.double().repeat_interleave(256)
    frac = torch.frac((x - zero) / step)
    se = (frac * (1 - frac)).sqrt() * step / math.sqrt(n)
    assert ((draws.mean(0) - x).abs() <= 5 * se + 1e-6).all()
    near = unpack(pack(x.float(), 2, stochastic=False)).double()
    assert float((near - x).abs().max()) > 0.05  # visibly off for some values


def test_relu_outputs_keep_their_zeros_exact() -> None:
    """ReLU's backward reads only ``result > 0``: level 0 is kept for exact zeros."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, generator=gen).relu()
    for bits in (2, 4, 8):
        p = pack(x, bits, generator=gen)
        assert p.exact_zeros
        assert torch.equal(unpack(p) > 0, x > 0)
    n = 1000
    mean = torch.stack([unpack(pack(x, 2, generator=gen)) for _ in range(n)]).mean(0)
    step = float(x.max()) / 2  # 2 levels above 0 at most: steps no larger than max / 2
    assert float((mean - x).abs().max()) < 6 * 0.5 * step / math.sqrt(n)


def test_lossless_kinds_bool_and_int() -> None:
    mask = torch.rand(1001) > 0.3
    p = pack(mask)
    assert p.kind == "bool" and p.nbytes == math.ceil(1001 / 8)
    assert torch.equal(unpack(p), mask)
    idx = torch.randint(100, 12_000, (7, 9))
    p = pack(idx)
    assert p.kind == "int" and p.payload.dtype == torch.int16
    assert torch.equal(unpack(p), idx)
    small = torch.randint(-3, 200, (50,))
    assert pack(small).payload.dtype == torch.uint8 and torch.equal(unpack(pack(small)), small)


def test_float16_metadata_falls_back_to_float32_when_it_would_coarsen_the_grid() -> None:
    x = 1000.3 + torch.rand(256) * 0.01  # float16 spacing at 1000 is 0.5: too coarse
    p = pack(x, 4)
    assert p.scale is not None and p.scale.dtype == torch.float32
    assert float((unpack(p) - x).abs().max()) <= 0.01
    assert pack(torch.randn(256), 4).scale.dtype == torch.float16


class Custom(nn.Module):
    """Views, transposes, a custom autograd op and in-graph integer indices: any module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))  # (B, T, 64)
        att = torch.softmax(h @ h.transpose(1, 2) / 8, dim=-1)  # h saved as h and h^T
        h = att @ h
        h = F.max_pool1d(h.transpose(1, 2), 2).transpose(1, 2).repeat_interleave(2, dim=1)
        return self.b(F.gelu(h) * torch.sigmoid(h))


def test_forward_is_exact_and_gradients_are_close_for_any_module() -> None:
    torch.manual_seed(0)
    model = Custom()
    x = torch.randn(4, 16, 32)
    ref_out = model(x)
    ref = torch.autograd.grad(ref_out.square().mean(), list(model.parameters()))
    with compress_activations(8, module=model) as stats:
        out = model(x)
    assert torch.equal(out, ref_out)  # the forward pass is untouched
    got = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    for a, b in zip(ref, got, strict=True):
        assert float((a - b).norm() / a.norm()) < 0.05
    assert stats.compressed > 0 and stats.reused > 0  # h and h^T stored once
    assert stats.parameters > 0


def test_compression_draws_nothing_from_the_global_generator() -> None:
    """Dropout masks (and every later random draw) are the same with and without it."""
    model = nn.Sequential(nn.Linear(32, 256), nn.Dropout(0.5), nn.ReLU(), nn.Linear(256, 8))
    x = torch.randn(16, 32)
    torch.manual_seed(7)
    ref = model(x)
    ref_next = torch.rand(3)
    torch.manual_seed(7)
    with compress_activations(2, module=model) as stats:
        out = model(x)
    assert stats.compressed > 0
    assert torch.equal(out, ref) and torch.equal(torch.rand(3), ref_next)


def _gradients(stochastic: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` flattened gradients with 2-bit activations, stacked, and the exact gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    x = torch.randn(32, 16)
    params = list(model.parameters())
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x).square().mean(), params)])
    draws = []
    for _ in range(n):
        with compress_activations(2, module=model, min_numel=0, stochastic=stochastic):
            loss = model(x).square().mean()
        draws.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(draws).double(), ref.double()


def test_two_bit_gradients_are_unbiased_and_nearest_rounding_is_not() -> None:
    """Linear layers read their saved input linearly and ReLU reads only its sign, which the
    packing keeps exact: the gradient is unbiased (ActNN, Theorem 1).

    ``||mean of n draws - exact||^2`` has expectation ``tr(Cov) / n`` when unbiased (about that
    value in many dimensions); a biased rounding misses by far more.
    """
    n = 200
    d, ref = _gradients(stochastic=True, n=n)
    expected = float(d.var(0).sum()) / n
    assert float((d.mean(0) - ref).square().sum()) < 2.0 * expected
    near, _ = _gradients(stochastic=False, n=1)
    assert float((near[0] - ref).square().sum()) > 20.0 * expected


def test_parameters_are_never_compressed_even_without_the_module() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(2048, 2)  # its weight is large enough to be compressed if mistaken for one
    x0 = torch.randn(3, 2048, requires_grad=True)
    with compress_activations(2) as stats:
        h = x0 * 1.0  # an activation: compressed
        out = lin(h)
    gx, gw = torch.autograd.grad(out.sum(), [x0, lin.weight])
    assert stats.parameters >= 1 and stats.compressed >= 1
    # d out / d h reads the weight: exact only if the weight was kept as it is
    assert torch.allclose(gx, lin.weight.sum(0).expand(3, -1), rtol=0, atol=1e-6)
    # d out / d weight reads h: compressed to 2 bits, so close but not equal
    assert not torch.allclose(gw, x0.detach().sum(0).expand(2, -1), rtol=0, atol=1e-6)


def test_small_tensors_are_kept_and_counted_and_backward_can_run_after_the_block() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    with compress_activations(2, module=model) as stats:
        out = model(x)
    assert stats.compressed == 0 and stats.kept > 0
    assert stats.stored_bytes == stats.original_bytes  # nothing to gain below min_numel
    out.sum().backward()  # outside the block: the stored tensors carry what they need


@pytest.mark.parametrize(("name", "kw"), [("resnet18", {}), ("gpt2-tiny", {"seq_len": 16})])
def test_memory_falls_10x_at_2_bits_and_7x_at_4_bits(name: str, kw: dict) -> None:
    """The acceptance figures, by the hooks' own count, every byte they hold included."""
    from mlcycle.models import build

    model, inputs = build(name, batch=1 if name == "resnet18" else 8, **kw)
    reductions = {}
    for bits in (2, 4):
        with compress_activations(bits, module=model) as stats:
            model(*inputs)
        reductions[bits] = stats.reduction
    assert reductions[2] >= 10, reductions
    assert reductions[4] >= 7, reductions


def test_stats_count_payload_and_metadata() -> None:
    x = torch.randn(64, 256, requires_grad=False)
    w = nn.Parameter(torch.randn(256, 256))
    with compress_activations(2) as stats:
        torch.tanh(x @ w)
    # x (64*256) and tanh's result (64*256), 2 bits + 32/256 bits each
    expected = 2 * 64 * 256 * packed_bits_per_value(2, 256) / 8
    assert stats.stored_bytes == expected
    assert stats.original_bytes == 2 * 64 * 256 * 4
    assert stats.reduction == pytest.approx(32 / 2.125)


def test_bad_arguments_say_what_is_valid() -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        compress_activations(3)
    with pytest.raises(ValueError, match="multiple of 8"):
        compress_activations(2, group_size=100)
    with pytest.raises(ValueError, match="min_numel"):
        compress_activations(2, min_numel=-1)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.randn(4), 5)
    bad = PackedTensor(
        "float", torch.zeros(1, dtype=torch.uint8), None, None, (4,), torch.float32, 2, 4
    )
    with pytest.raises(TypeError, match="scale and zero"):
        unpack(bad)
