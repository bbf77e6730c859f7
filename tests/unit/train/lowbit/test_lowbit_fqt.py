"""Fully quantized training: exact when off, on the grid when on, unbiased gradients, the probe."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from mlcycle.train.lowbit.fqt import (  # noqa: E402
    FQTConfig,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    dequantize_model,
    fully_quantize,
    gradient_variance,
    set_config,
)
from mlcycle.train.lowbit.quantize import NearestQuantizer  # noqa: E402

OFF = FQTConfig(forward_bits=None, backward_bits=None)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding="same", padding_mode="reflect"),
        nn.Flatten(1),
        nn.Linear(8 * 4 * 4, 10),
    )


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights=None) -> list[torch.Tensor]:
    out = model(x)
    loss = F.cross_entropy(out, y, reduction="none")
    loss = (loss if weights is None else loss * weights).mean()
    return [g.detach().clone() for g in torch.autograd.grad(loss, list(model.parameters()))]


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_swap_keeps_parameters_and_state_dict_and_is_exact_when_off() -> None:
    model = small_cnn()
    x, y = batch()
    ref = grads(model, x, y)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    fully_quantize(model, OFF)
    assert isinstance(model[0], QuantConv2d) and isinstance(model[7], QuantLinear)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    for a, b in zip(ref, grads(model, x, y), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    dequantize_model(model)
    assert type(model[0]) is nn.Conv2d and not hasattr(model[0], "lowbit_config")


def test_forward_uses_quantized_input_and_weight() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    x = torch.randn(5, 16)
    q = fully_quantize(lin, FQTConfig(forward_bits=2, backward_bits=None))
    assert isinstance(q, QuantLinear)
    fq = q.lowbit_config.forward_quantizer
    expected = F.linear(fq(x), fq(lin.weight), lin.bias)
    assert torch.allclose(q(x), expected)
    assert not torch.allclose(q(x), lin(x), atol=1e-3)  # 2 bits really changes the output


def test_conv1d_and_linear_on_3d_inputs_match_float_when_off() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 5, 3, padding=1, dilation=1)
    lin = nn.Linear(5, 2)
    x = torch.randn(4, 3, 7, requires_grad=True)
    ref_out = lin(conv(x).transpose(1, 2))
    ref = torch.autograd.grad(ref_out.square().sum(), [x, conv.weight, lin.weight])
    qconv = fully_quantize(copy.deepcopy(conv), OFF)
    qlin = fully_quantize(copy.deepcopy(lin), OFF)
    assert isinstance(qconv, QuantConv1d)
    out = qlin(qconv(x).transpose(1, 2))
    got = torch.autograd.grad(out.square().sum(), [x, qconv.weight, qlin.weight])
    for a, b in zip(ref, got, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind", ["per_tensor", "per_sample", "householder"])
def test_quantized_backward_is_unbiased_for_the_qat_gradient(kind: str) -> None:
    """Mean of many FQT gradients -> the exact-backward (QAT) gradient (Theorem 1)."""
    model = small_cnn()
    x, y = batch()
    cfg = FQTConfig(forward_bits=8, backward_bits=3, backward_kind=kind)
    r = gradient_variance(model, x, y, F.cross_entropy, config=cfg, samples=24)
    # squared norm of the mean error against the variance of a mean of 24 draws: ~1 if unbiased
    assert r.bias_z < 3.0
    assert r.relative_variance > 0


def test_a_biased_backward_would_be_detected_by_the_probe() -> None:
    """The bias statistic is not vacuous: a config whose backward quantizer is swapped by hand
    for round-to-nearest (which FQTConfig refuses) makes it large."""
    model = small_cnn()
    x, y = batch()
    biased = FQTConfig(forward_bits=8, backward_bits=3)
    object.__setattr__(biased, "_bq", NearestQuantizer(3))
    r = gradient_variance(model, x, y, F.cross_entropy, config=biased, samples=8)
    assert r.bias_z > 5.0


def test_probe_orders_quantizers_on_an_outlier_heavy_batch_and_restores_the_model() -> None:
    model = small_cnn()
    x, y = batch(32)
    weights = torch.ones(32)
    weights[:2] = 100.0  # two samples dominate the gradient: outlier rows

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(out, t, reduction="none") * weights).mean()

    buffers = [b.clone() for b in model.buffers()]
    rel = {}
    for kind in ("per_tensor", "per_sample", "householder"):
        cfg = FQTConfig(forward_bits=8, backward_bits=4, backward_kind=kind)
        rel[kind] = gradient_variance(model, x, y, loss_fn, config=cfg, samples=6)
    v = {k: r.relative_variance for k, r in rel.items()}
    assert v["householder"] < v["per_sample"] < v["per_tensor"]
    assert v["per_tensor"] > 5 * v["per_sample"]
    # the model is back to float, with its buffers and no stray gradients
    assert type(model[0]) is nn.Conv2d
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_probe_keeps_an_already_quantized_model_as_it_was() -> None:
    model = fully_quantize(small_cnn(), FQTConfig(forward_bits=6, backward_bits=5))
    x, y = batch()
    gradient_variance(model, x, y, F.cross_entropy, config=FQTConfig(backward_bits=4), samples=2)
    assert isinstance(model[0], QuantConv2d)
    assert model[0].lowbit_config == FQTConfig(forward_bits=6, backward_bits=5)


def test_set_config_and_config_validation() -> None:
    model = fully_quantize(small_cnn())
    assert set_config(model, FQTConfig(backward_bits=2)) == 4  # three convs and the linear
    with pytest.raises(ValueError, match="biases the gradient"):
        FQTConfig(backward_kind="nearest")
    with pytest.raises(ValueError, match="one of"):
        FQTConfig(forward_kind="log")
    with pytest.raises(ValueError, match="from 1 to 8"):
        FQTConfig(backward_bits=12)
    with pytest.raises(TypeError, match="FQTConfig"):
        fully_quantize(model, {"backward_bits": 4})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deterministic forward"):
        x, y = batch()
        cfg = FQTConfig(forward_kind="per_tensor")
        gradient_variance(model, x, y, F.cross_entropy, config=cfg, samples=2)
    with pytest.raises(ValueError, match="samples"):
        gradient_variance(model, *batch(), F.cross_entropy, config=FQTConfig(), samples=1)


def test_uneven_same_padding_is_rejected_with_a_fix() -> None:
    conv = fully_quantize(nn.Conv2d(2, 2, 4, padding="same"), FQTConfig())
    with pytest.raises(ValueError, match="odd kernel"):
        conv(torch.randn(1, 2, 6, 6))
