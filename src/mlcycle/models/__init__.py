"""Reference networks the planners and demos use; dynamic networks (SkipNet, TAFE-Net) come later.

Every model is plain PyTorch with random weights (nothing is downloaded, torchvision is not
used) and is written to trace cleanly with ``make_fx`` / AOTAutograd: no data-dependent Python
control flow, no in-place activations, no ``.item()``. Each ``forward`` takes the example inputs
positionally and returns one tensor, the logits.

>>> from mlcycle.models import build, list_models
>>> model, inputs = build("resnet-tiny", batch=4)   # doctest: +SKIP
>>> model(*inputs).shape                             # doctest: +SKIP
torch.Size([4, 10])

Importing this package does not import torch; :func:`build` imports it, and the private module
that holds the architecture, on first use.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["MODELS", "ModelSpec", "build", "list_models"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model.

    Attributes:
        name: the registry name.
        module: private module of this package that holds the architecture, e.g. ``"_resnet"``.
        factory: function in ``module`` called as ``factory(batch, **kwargs)``; it returns the
            model and a tuple of example inputs.
        preset: keyword arguments that make this variant; :func:`build`'s own keyword
            arguments override them.
        summary: one line for listings.
    """

    name: str
    module: str
    factory: str
    preset: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""

    def resolve(self) -> Callable[..., tuple[Any, tuple[Any, ...]]]:
        """Import the architecture module (and torch) and return the factory function."""
        mod = importlib.import_module(f"{__name__}.{self.module}")
        return getattr(mod, self.factory)


def _spec(name: str, module: str, factory: str, summary: str, **preset: Any) -> ModelSpec:
    return ModelSpec(name, module, factory, MappingProxyType(preset), summary)


_SPECS = (
    _spec(
        "resnet18", "_resnet", "build_resnet",
        "ResNet-18, BasicBlocks [2,2,2,2], 224x224, 1000 classes (11.7M params)",
        block="basic", layers=(2, 2, 2, 2),
    ),
    _spec(
        "resnet50", "_resnet", "build_resnet",
        "ResNet-50 (v1.5), Bottlenecks [3,4,6,3], 224x224, 1000 classes (25.6M params)",
        block="bottleneck", layers=(3, 4, 6, 3),
    ),
    _spec(
        "vgg19", "_vgg", "build_vgg",
        "VGG-19 (config E, no BatchNorm), 224x224, 1000 classes (143.7M params)",
    ),
    _spec(
        "mobilenet_v2", "_mobilenet", "build_mobilenet_v2",
        "MobileNetV2, width 1.0, ReLU6, 224x224, 1000 classes (3.5M params)",
    ),
    _spec(
        "unet", "_unet", "build_unet",
        "U-Net, depth 4, width 64, BatchNorm+ReLU, 3x256x256 -> 2 classes per pixel (31.0M)",
    ),
    _spec(
        "gpt2-small", "_gpt2", "build_gpt2",
        "GPT-2 small, 12 layers, d=768, 12 heads, context 1024, seq 256, untied (163.0M)",
    ),
    _spec(
        "resnet-tiny", "_resnet", "build_resnet",
        "ResNet, BasicBlocks [2,2], width 8, 3x3 stem, 32x32, 10 classes (for tests)",
        block="basic", layers=(2, 2), width=8, stem="cifar", image_size=32, num_classes=10,
    ),
    _spec(
        "unet-tiny", "_unet", "build_unet",
        "U-Net, depth 2, width 8, 3x32x32 -> 2 classes per pixel (for tests)",
        depth=2, width=8, image_size=32,
    ),
    _spec(
        "gpt2-tiny", "_gpt2", "build_gpt2",
        "GPT-2, 2 layers, d=32, 2 heads, vocab 64, context and seq 16 (for tests)",
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, seq_len=16,
    ),
    _spec(
        "mlp", "_mlp", "build_mlp",
        "MLP, 4 Linear layers 64-128-128-64-10 with ReLU (for the 8x8 digits)",
    ),
)  # fmt: skip

#: The registry: name -> :class:`ModelSpec`, in the order :func:`list_models` reports.
MODELS: Mapping[str, ModelSpec] = MappingProxyType({s.name: s for s in _SPECS})


def list_models() -> list[str]:
    """Return the registered model names, full-size networks first, then the tiny ones."""
    return list(MODELS)


def build(
    name: str,
    *,
    batch: int = 2,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    **kw: Any,
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Build a registered model with random weights and a batch of example inputs.

    Weights and inputs are drawn after seeding the CPU generator with ``seed`` (as
    ``torch.manual_seed(seed)`` would), inside :func:`torch.random.fork_rng`, so the same call
    always gives the same tensors and the caller's RNG state is left as it was. The model is
    built on the CPU and then moved, so every device gets the same weights; ``device="meta"``
    instead builds on the meta device directly (no memory, no initialisation: for counting
    parameters and shapes). The model is returned in training mode.

    Args:
        name: a name from :func:`list_models`.
        batch: batch size of the example inputs.
        dtype: floating dtype of the parameters, buffers and floating inputs (token ids stay
            int64); float32 when None.
        device: where to put the model and inputs; the CPU when None.
        seed: the RNG seed.
        **kw: overrides of the architecture's keyword arguments, e.g. ``image_size``,
            ``num_classes``, ``in_channels`` (image models), ``seq_len``, ``n_layer``,
            ``tie_weights`` (GPT-2), ``width``, ``depth`` (U-Net).

    Returns:
        ``(model, inputs)``; ``model(*inputs)`` returns the logits.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or a bad size.
        TypeError: for a keyword the architecture does not take (the message lists those it does).
    """
    spec = MODELS.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")

    import torch

    factory = spec.resolve()
    accepted = [p for p in inspect.signature(factory).parameters if p != "batch"]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise TypeError(
            f"{name!r} takes no keyword(s) {', '.join(unknown)}; it accepts {', '.join(accepted)}"
        )
    kwargs = {**spec.preset, **kw}

    target = torch.device(device) if device is not None else torch.device("cpu")
    build_on = target if target.type == "meta" else torch.device("cpu")
    with torch.random.fork_rng(devices=[]), build_on:
        torch.random.default_generator.manual_seed(seed)
        model, inputs = factory(batch, **kwargs)

    model = model.to(device=target, dtype=dtype)
    inputs = tuple(
        x.to(device=target, dtype=dtype if x.is_floating_point() else x.dtype) for x in inputs
    )
    return model, inputs
