"""Fully quantized training (FQT): Linear and convolution layers in low bit, simulated in float.

Chen et al. ("A Statistical Framework for Low-bitwidth Training of Deep Neural Networks",
NeurIPS 2020, Sec. 3) view FQT as an estimator of the quantization-aware-training (QAT)
gradient. In the forward pass a layer quantizes its input and its weight with a forward
quantizer (deterministic here by default, as in QAT) and computes ``y = Q_f(x) * Q_f(w)``; in the
backward pass it quantizes the output gradient with an unbiased backward quantizer ``Q_b`` and
computes the input and weight gradients from ``Q_b(dy)`` and the quantized forward operands. The
forward quantizers are passed straight through (their gradient is taken as the identity, the
straight-through estimator of QAT). Because ``E[Q_b(dy)] = dy`` and every layer's backward is
linear in ``dy``, the FQT gradient is an unbiased estimator of the QAT gradient (Theorem 1),
with extra variance that depends on the backward quantizer (Sec. 4); :func:`gradient_variance`
measures it.

On the CPU every quantized tensor is dequantized back to float, so the arithmetic is float
arithmetic on grid values: the same numbers a low-bit kernel would produce, without its speed.

Example:
    >>> cfg = FQTConfig(forward_bits=8, backward_bits=4, backward_kind="householder")
    >>> fully_quantize(model, cfg)          # swaps Linear/Conv layers in place
    >>> loss_fn(model(x), y).backward()     # quantized forward and backward
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcycle.train.lowbit.quantize import KINDS, Quantizer, make_quantizer

__all__ = [
    "FQTConfig",
    "GradientVariance",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "dequantize_model",
    "fully_quantize",
    "gradient_variance",
    "set_config",
]


@dataclass(frozen=True, kw_only=True)
class FQTConfig:
    """What a fully quantized layer quantizes, and how.

    Attributes:
        forward_bits: bits of the forward input and weight, 1 to 8; None keeps them in float.
        backward_bits: bits of the output gradient in backward, 1 to 8; None keeps it exact
            (then the layer computes the QAT gradient).
        forward_kind: quantizer of the forward operands; ``"nearest"`` (per-tensor
            round-to-nearest, deterministic as in QAT) by default. Any name of
            :data:`~mlcycle.train.lowbit.quantize.KINDS`.
        backward_kind: quantizer of the output gradient; ``"per_sample"`` by default,
            ``"householder"`` for the least variance, ``"per_tensor"`` for the simplest.
            Must be unbiased (not ``"nearest"``) for the gradient to stay unbiased.
    """

    forward_bits: int | None = 8
    backward_bits: int | None = 8
    forward_kind: str = "nearest"
    backward_kind: str = "per_sample"
    _fq: Quantizer | None = field(default=None, init=False, repr=False, compare=False)
    _bq: Quantizer | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("forward_kind", "backward_kind"):
            kind = getattr(self, name)
            if kind not in KINDS:
                raise ValueError(f"{name} must be one of {', '.join(KINDS)}; got {kind!r}.")
        if self.backward_kind.startswith("nearest") and self.backward_bits is not None:
            raise ValueError(
                f"backward_kind={self.backward_kind!r} rounds deterministically, which biases "
                "the gradient; use 'per_sample', 'householder' or 'per_tensor'."
            )
        fq = (
            None
            if self.forward_bits is None
            else make_quantizer(self.forward_kind, self.forward_bits)
        )
        bq = (
            None
            if self.backward_bits is None
            else make_quantizer(self.backward_kind, self.backward_bits)
        )
        object.__setattr__(self, "_fq", fq)
        object.__setattr__(self, "_bq", bq)

    @property
    def forward_quantizer(self) -> Quantizer | None:
        """The quantizer of the forward operands (None: float)."""
        return self._fq

    @property
    def backward_quantizer(self) -> Quantizer | None:
        """The quantizer of the output gradient (None: exact)."""
        return self._bq


# ------------------------------------------------------------------------------------------
# Autograd functions


def _fwd(q: Quantizer | None, t: Tensor) -> Tensor:
    return t if q is None else q(t)


def _bwd_linear(q: Quantizer | None, g: Tensor) -> Tensor:
    """Quantize a Linear output gradient with one row per token (all leading dims)."""
    if q is None:
        return g
    return q(g.reshape(-1, g.shape[-1])).reshape(g.shape)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, cfg: FQTConfig) -> Tensor:
        xq = _fwd(cfg.forward_quantizer, x)
        wq = _fwd(cfg.forward_quantizer, w)
        ctx.save_for_backward(xq, wq)
        ctx.cfg = cfg
        ctx.has_bias = b is not None
        return F.linear(xq, wq, b)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        xq, wq = ctx.saved_tensors
        gq = _bwd_linear(ctx.cfg.backward_quantizer, g)
        g2 = gq.reshape(-1, gq.shape[-1])  # (tokens, out)
        gx = (g2 @ wq).reshape(xq.shape) if ctx.needs_input_grad[0] else None
        gw = g2.t() @ xq.reshape(-1, xq.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor,
        b: Tensor | None,
        cfg: FQTConfig,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
    ) -> Tensor:
        xq = _fwd(cfg.forward_quantizer, x)
        wq = _fwd(cfg.forward_quantizer, w)
        ctx.save_for_backward(xq, wq)
        ctx.cfg = cfg
        ctx.bias_shape = None if b is None else list(b.shape)
        ctx.conv = (stride, padding, dilation, groups)
        return torch.ops.aten.convolution(
            xq, wq, b, stride, padding, dilation, False, [0] * len(stride), groups
        )

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        xq, wq = ctx.saved_tensors
        q = ctx.cfg.backward_quantizer
        gq = g if q is None else q(g)  # one row per sample
        stride, padding, dilation, groups = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_shape is not None]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gq,
            xq,
            wq,
            ctx.bias_shape,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            groups,
            mask,
        )
        return gx, gw, gb, None, None, None, None, None


# ------------------------------------------------------------------------------------------
# Modules


class QuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward and backward are quantized per ``lowbit_config``.

    Made by :func:`fully_quantize` from an existing Linear, sharing its parameters (the
    state-dict keys do not change). Rows of the output gradient are tokens (every leading
    dimension), so per-sample and Householder quantizers work per token.
    """

    lowbit_config: FQTConfig

    def forward(self, x: Tensor) -> Tensor:
        return _LinearFn.apply(x, self.weight, self.bias, self.lowbit_config)


class _QuantConvNd:
    lowbit_config: FQTConfig

    def forward(self, x: Tensor) -> Tensor:
        conv: Any = self
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0,) * len(conv.stride)
        elif isinstance(padding, str):
            padding = _explicit_padding(conv)
        return _ConvFn.apply(
            x,
            conv.weight,
            conv.bias,
            self.lowbit_config,
            list(conv.stride),
            list(padding),
            list(conv.dilation),
            conv.groups,
        )


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """An ``nn.Conv1d`` quantized per ``lowbit_config`` (see :class:`QuantLinear`)."""


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """An ``nn.Conv2d`` quantized per ``lowbit_config``; gradient rows are samples."""


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """An ``nn.Conv3d`` quantized per ``lowbit_config`` (see :class:`QuantLinear`)."""


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
}
_UNSWAPS = {v: k for k, v in _SWAPS.items()}


def _explicit_padding(conv: Any) -> tuple[int, ...]:
    """Integer padding for ``padding="valid"`` or ``"same"`` (symmetric cases only)."""
    if conv.padding == "valid":
        return (0,) * len(conv.stride)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                f"{type(conv).__name__} with padding='same' and kernel {conv.kernel_size}, "
                f"dilation {conv.dilation} pads unevenly, which fully_quantize does not support; "
                "use an odd kernel size or explicit integer padding."
            )
        pads.append(total // 2)
    return tuple(pads)


def _swap(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def fully_quantize(model: nn.Module, config: FQTConfig | None = None) -> nn.Module:
    """Make every Linear and Conv1d/2d/3d layer of ``model`` fully quantized, in place.

    Each layer is replaced by its quantized subclass (:class:`QuantLinear`, :class:`QuantConv2d`,
    ...) sharing the same parameters and buffers; other modules are untouched. Calling it again
    on a quantized model updates the config (as :func:`set_config` does).

    Args:
        model: the model; also a single Linear or convolution.
        config: what to quantize; :class:`FQTConfig` defaults (8-bit forward, 8-bit per-sample
            backward) when None.

    Returns:
        The model (the same object unless ``model`` itself was a Linear or convolution).
    """
    config = FQTConfig() if config is None else config
    if not isinstance(config, FQTConfig):
        raise TypeError(
            f"config must be an FQTConfig, e.g. FQTConfig(backward_bits=4); got {config!r}."
        )
    root = _convert(model, config, _SWAPS)
    return root


def dequantize_model(model: nn.Module) -> nn.Module:
    """Undo :func:`fully_quantize`: every quantized layer becomes its float class again."""
    return _convert(model, None, _UNSWAPS)


def set_config(model: nn.Module, config: FQTConfig) -> int:
    """Give every quantized layer of ``model`` the config ``config``; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, _QuantConvNd)):
            m.lowbit_config = config
            count += 1
    return count


def _convert(model: nn.Module, config: FQTConfig | None, table: dict[type, type]) -> nn.Module:
    def convert_one(m: nn.Module) -> nn.Module:
        cls = table.get(type(m))
        if cls is not None:
            m = _swap(m, cls)
        if config is not None and isinstance(m, (QuantLinear, _QuantConvNd)):
            m.lowbit_config = config
        elif config is None and "lowbit_config" in m.__dict__:
            del m.__dict__["lowbit_config"]
        return m

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = convert_one(child)
            if new is not child:
                setattr(parent, name, new)
    return convert_one(model)


# ------------------------------------------------------------------------------------------
# Gradient-variance probe


@dataclass
class GradientVariance:
    """How far fully quantized gradients scatter around the exact-backward gradient.

    Attributes:
        variance: ``E ||g_q - g||^2`` over the draws, summed over parameters (g: the gradient
            with the same forward and an exact backward, i.e. the QAT gradient).
        grad_norm_sq: ``||g||^2``.
        relative_variance: ``variance / grad_norm_sq``.
        bias_norm: ``||mean(g_q) - g||``, which shrinks as ``1/sqrt(samples)`` when unbiased.
        bias_z: ``bias_norm**2 / (variance / samples)``, about 1 when the quantizer is
            unbiased (the squared norm of a mean of ``samples`` draws), much larger when not.
        per_parameter: ``{name: variance}``.
        samples: number of quantized gradients drawn.
    """

    variance: float
    grad_norm_sq: float
    relative_variance: float
    bias_norm: float
    bias_z: float
    per_parameter: dict[str, float]
    samples: int


def gradient_variance(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: Any,
    *,
    config: FQTConfig,
    samples: int = 8,
) -> GradientVariance:
    """Measure the variance that quantized backward passes add to one batch's gradient.

    The model is fully quantized with ``config`` for the probe (its own layers and config are
    restored afterwards, as are its buffers and parameter gradients). The reference is the
    gradient with the same quantized forward and an exact backward (``backward_bits=None``);
    with a deterministic forward the quantization variance is then exactly the scatter of the
    FQT gradients around it (Chen et al., NeurIPS 2020, Sec. 4, the quantization term of the
    gradient variance).

    Args:
        model: any module with Linear/convolution layers, float or already quantized.
        inputs: a tensor or a tuple of tensors for ``model(*inputs)``.
        targets: passed to ``loss_fn(output, targets)``.
        loss_fn: e.g. ``torch.nn.functional.cross_entropy``.
        config: the FQT config to probe; its forward quantizer must be deterministic
            (``"nearest"``) or off.
        samples: number of quantized backward passes, at least 2.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to estimate a variance, got {samples}.")
    fq = config.forward_quantizer
    if fq is not None and fq.stochastic:
        raise ValueError(
            f"gradient_variance needs a deterministic forward so that every draw sees the same "
            f"forward pass; got forward_kind={config.forward_kind!r}. Use forward_kind='nearest' "
            "or forward_bits=None."
        )
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    layers = {
        name: (type(m), m.__dict__.get("lowbit_config"))
        for name, m in model.named_modules()
        if type(m) in _SWAPS or type(m) in _UNSWAPS
    }
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    grads = {
        n: (None if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
    }
    probe = fully_quantize(model, dataclasses.replace(config, backward_bits=None))
    params = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]

    def one_grad() -> list[Tensor]:
        for _, p in params:
            p.grad = None
        loss_fn(probe(*args), targets).backward()
        return [
            torch.zeros_like(p) if p.grad is None else p.grad.detach().double().clone()
            for _, p in params
        ]

    try:
        ref = one_grad()
        set_config(probe, config)
        draws = [one_grad() for _ in range(samples)]
    finally:
        _restore(probe, layers)
        with torch.no_grad():
            for k, v in probe.named_buffers():
                v.copy_(buffers[k])
        for n, p in probe.named_parameters():
            p.grad = grads[n]

    per_param: dict[str, float] = {}
    total_var = 0.0
    bias_sq = 0.0
    for i, (name, _) in enumerate(params):
        stack = torch.stack([d[i] for d in draws])  # (samples, *shape)
        var = (stack - ref[i]).square().sum(dim=tuple(range(1, stack.dim()))).mean().item()
        per_param[name] = var
        total_var += var
        bias_sq += (stack.mean(0) - ref[i]).square().sum().item()
    norm_sq = float(sum(r.square().sum().item() for r in ref))
    return GradientVariance(
        variance=total_var,
        grad_norm_sq=norm_sq,
        relative_variance=total_var / norm_sq if norm_sq > 0 else float("inf"),
        bias_norm=bias_sq**0.5,
        bias_z=bias_sq / (total_var / samples) if total_var > 0 else 0.0,
        per_parameter=per_param,
        samples=samples,
    )


def _restore(model: nn.Module, layers: dict[str, tuple[type, FQTConfig | None]]) -> None:
    """Give each layer named in ``layers`` back its class and config (after the probe)."""
    for name, (cls, cfg) in layers.items():
        if not name:
            continue  # the root itself: the probe worked on a swapped copy
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, child_name)
        if type(child) is not cls:
            child = _swap(child, cls)
            setattr(parent, child_name, child)
        if cfg is None:
            child.__dict__.pop("lowbit_config", None)
        else:
            child.lowbit_config = cfg
