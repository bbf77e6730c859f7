"""Tests of the reference model registry: shapes, gradients, sizes, determinism, traceability."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from mlcycle.models import MODELS, build, list_models  # noqa: E402

NAMES = [
    "resnet18",
    "resnet50",
    "vgg19",
    "mobilenet_v2",
    "unet",
    "gpt2-small",
    "resnet-tiny",
    "unet-tiny",
    "gpt2-tiny",
    "mlp",
]


def test_registry_names() -> None:
    assert list_models() == NAMES
    assert set(MODELS) == set(NAMES)
    assert all(MODELS[n].summary for n in NAMES)


@pytest.mark.parametrize(
    ("name", "kw", "in_shape", "out_shape"),
    [
        ("resnet-tiny", {}, (2, 3, 32, 32), (2, 10)),
        ("unet-tiny", {}, (2, 3, 32, 32), (2, 2, 32, 32)),
        ("gpt2-tiny", {}, (2, 16), (2, 16, 64)),
        ("mlp", {}, (2, 64), (2, 10)),
        ("resnet18", {"image_size": 64}, (2, 3, 64, 64), (2, 1000)),
    ],
)
def test_forward_backward(
    name: str, kw: dict, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> None:
    model, inputs = build(name, **kw)
    assert len(inputs) == 1 and tuple(inputs[0].shape) == in_shape
    out = model(*inputs)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == out_shape
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no grad for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite grad for {pname}"


def test_token_inputs_are_int64_in_vocab() -> None:
    _, (idx,) = build("gpt2-tiny", batch=3)
    assert idx.dtype == torch.int64 and idx.shape == (3, 16)
    assert 0 <= int(idx.min()) and int(idx.max()) < 64


def test_overrides() -> None:
    model, (x,) = build("resnet-tiny", batch=3, image_size=16, num_classes=5)
    assert x.shape == (3, 3, 16, 16) and model(x).shape == (3, 5)
    model, (idx,) = build("gpt2-tiny", batch=1, seq_len=8)
    assert idx.shape == (1, 8) and model(idx).shape == (1, 8, 64)
    model, (x,) = build("unet-tiny", in_channels=1, num_classes=4, image_size=16)
    assert x.shape == (2, 1, 16, 16) and model(x).shape == (2, 4, 16, 16)


def test_dtype() -> None:
    model, (x,) = build("mlp", dtype=torch.float64)
    assert x.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(x).dtype == torch.float64
    model, (idx,) = build("gpt2-tiny", dtype=torch.bfloat16)
    assert idx.dtype == torch.int64
    assert model.wte.weight.dtype == torch.bfloat16
    assert model.h[0].attn.mask.dtype == torch.bool  # non-floating buffers keep their dtype


def test_deterministic_and_leaves_caller_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    m1, (x1,) = build("resnet-tiny")
    assert torch.equal(torch.rand(4), expected)
    m2, (x2,) = build("resnet-tiny")
    assert torch.equal(x1, x2)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    _, (x3,) = build("resnet-tiny", seed=1)
    assert not torch.equal(x1, x3)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model") as info:
        build("resnet1000")
    for name in NAMES:
        assert name in str(info.value)


def test_unknown_keyword() -> None:
    with pytest.raises(TypeError, match="seq_len"):
        build("resnet-tiny", seq_len=4)


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="multiple"):
        build("unet-tiny", image_size=30)
    with pytest.raises(ValueError, match="seq_len"):
        build("gpt2-tiny", seq_len=17)
    with pytest.raises(ValueError, match="batch"):
        build("mlp", batch=0)


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, mlcycle.models as m; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'resnet18' in m.list_models(); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("name", "kw", "lo", "hi", "in_shape", "out_shape"),
    [
        ("resnet18", {}, 11.6e6, 11.8e6, (2, 3, 224, 224), (2, 1000)),
        ("resnet50", {}, 25.5e6, 25.7e6, (2, 3, 224, 224), (2, 1000)),
        ("vgg19", {}, 143.6e6, 143.8e6, (2, 3, 224, 224), (2, 1000)),
        ("mobilenet_v2", {}, 3.4e6, 3.6e6, (2, 3, 224, 224), (2, 1000)),
        ("unet", {}, 30e6, 32e6, (2, 3, 256, 256), (2, 2, 256, 256)),
        ("gpt2-small", {}, 162e6, 164e6, (2, 256), (2, 256, 50257)),
        ("gpt2-small", {"tie_weights": True}, 124e6, 125e6, (2, 256), (2, 256, 50257)),
    ],
)
def test_full_size_on_meta(
    name: str,
    kw: dict,
    lo: float,
    hi: float,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> None:
    model, inputs = build(name, device="meta", **kw)
    n = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert lo <= n <= hi, f"{name}: {n:,} parameters"
    assert tuple(inputs[0].shape) == in_shape and inputs[0].is_meta
    out = model(*inputs)  # shape propagation only: meta tensors do no arithmetic
    assert tuple(out.shape) == out_shape


def test_gpt2_is_causal() -> None:
    model, (idx,) = build("gpt2-tiny", batch=1)
    model.eval()  # no dropout
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_dropout_draws_from_rng() -> None:
    model, (idx,) = build("gpt2-tiny")
    torch.manual_seed(0)
    a = model(idx)
    torch.manual_seed(0)
    b = model(idx)
    c = model(idx)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _joint_targets(name: str, **kw: object) -> set[str]:
    """Trace one forward+backward of ``name`` with make_fx; return the aten ops it calls."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    model, inputs = build(name, **kw)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def step(params: dict, buffers: dict, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = functional_call(model, {**params, **buffers}, inputs)
        return torch.autograd.grad(out.square().mean(), list(params.values()))

    graph = make_fx(step)(params, buffers, *inputs)
    return {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}


def test_gpt2_traces_with_explicit_attention() -> None:
    targets = _joint_targets("gpt2-tiny")
    assert "aten.masked_fill.Scalar" in targets
    assert any("softmax" in t for t in targets)
    assert not any("scaled_dot_product" in t for t in targets)


def test_resnet_traces_without_inplace_relu() -> None:
    targets = _joint_targets("resnet-tiny", image_size=8)
    assert "aten.relu.default" in targets
    assert "aten.relu_.default" not in targets
