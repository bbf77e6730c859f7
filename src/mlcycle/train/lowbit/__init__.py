"""Low-bit training that stays unbiased: stochastic rounding, quantized gradients, ActNN.

- :mod:`.quantize`: unbiased stochastic-rounding quantizers at 1 to 8 bits, per tensor, per
  sample and block Householder (Chen et al., "A Statistical Framework for Low-bitwidth Training
  of Deep Neural Networks", NeurIPS 2020, Sec. 4), and round-to-nearest for comparison.
- :mod:`.fqt`: fully quantized training: Linear and convolution layers quantize their forward
  operands and their backward gradients (simulated in float on the CPU), and a probe of the
  gradient variance that this adds (NeurIPS 2020, Sec. 3-4).
- :mod:`.activations`: the tensors saved for backward stored at 1, 2, 4 or 8 bits per group,
  bit-packed, through saved-tensor hooks, for any module (ActNN, Chen et al., ICML 2021).
- :mod:`.plan`: a rematerialization graph with compressed activation bytes, so that
  :mod:`mlcycle.train.remat` plans with them (torch-free).

Importing this package does not import torch; the names below load their module on first use.

>>> from mlcycle.train.lowbit import compress_activations
>>> with compress_activations(bits=2, module=model) as stats:   # doctest: +SKIP
...     loss = loss_fn(model(x), y)
>>> loss.backward(); stats.reduction                             # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "KINDS",
    "ActivationStats",
    "CompressedActivations",
    "FQTConfig",
    "GradientVariance",
    "HouseholderQuantizer",
    "NearestQuantizer",
    "PackedTensor",
    "PerSampleQuantizer",
    "PerTensorQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "Quantizer",
    "compress_activations",
    "compressed_graph",
    "compression_ratio",
    "demo_summary",
    "dequantize_model",
    "fully_quantize",
    "gradient_variance",
    "make_quantizer",
    "pack",
    "run_bench",
    "set_config",
    "stochastic_round",
    "unpack",
]

_HOME = {
    **dict.fromkeys(
        (
            "KINDS",
            "HouseholderQuantizer",
            "NearestQuantizer",
            "PerSampleQuantizer",
            "PerTensorQuantizer",
            "Quantizer",
            "make_quantizer",
            "stochastic_round",
        ),
        "quantize",
    ),
    **dict.fromkeys(
        (
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
        ),
        "fqt",
    ),
    **dict.fromkeys(
        (
            "ActivationStats",
            "CompressedActivations",
            "PackedTensor",
            "compress_activations",
            "pack",
            "unpack",
        ),
        "activations",
    ),
    **dict.fromkeys(("compressed_graph", "compression_ratio"), "plan"),
    **dict.fromkeys(("demo_summary", "run_bench"), "_bench"),
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
