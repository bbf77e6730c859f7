"""Weight initialisation shared by the convolutional reference models."""

from __future__ import annotations

from torch import nn


def init_cnn(module: nn.Module, *, linear_std: float | None = 0.01) -> None:
    """He-normal convolutions (fan-out, ReLU gain) with zero bias, BatchNorm at (1, 0), and
    Linear layers ~ N(0, ``linear_std``) with zero bias (``None`` keeps torch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
