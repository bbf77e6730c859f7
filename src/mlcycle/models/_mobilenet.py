"""MobileNetV2 (Sandler et al., CVPR 2018), layer-for-layer as torchvision builds it.

Inverted residual blocks: a 1x1 expansion, a 3x3 depthwise convolution, a linear 1x1
projection, with ReLU6 activations and an identity shortcut where the shape is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlcycle.models._init import init_cnn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "build_mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s) of each stage; Table 2 of the paper.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Convolution (no bias), BatchNorm, ReLU6; "same" padding for odd kernels.

    Args:
        cin: input channels.
        cout: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        groups: convolution groups (``cin`` for a depthwise convolution).
    """

    def __init__(
        self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        pad = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, pad, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); residual when shapes match.

    Args:
        inp: input channels.
        oup: output channels.
        stride: stride of the depthwise convolution (1 or 2).
        expand_ratio: hidden channels are ``round(inp * expand_ratio)``.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))  # pointwise expansion
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pointwise linear projection
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape (B, inp, H, W); returns (B, oup, H/s, W/s)."""
        out = self.conv(x)  # (B, oup, H/s, W/s)
        return x + out if self.use_res_connect else out  # (B, oup, H/s, W/s)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier.

    Args:
        num_classes: size of the output logits.
        width_mult: multiplier on every layer's channels (1.0 is the standard network).
        in_channels: channels of the input image.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_channels, cin, stride=2)]
        for t, c, n, s in SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand_ratio=t))
                cin = cout
        features.append(ConvBNReLU6(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        """Classify images ``x`` of shape (B, C, H, W); returns logits (B, num_classes)."""
        x = self.features(x)  # (B, 1280, H/32, W/32)
        x = self.avgpool(x)  # (B, 1280, 1, 1)
        x = torch.flatten(x, 1)  # (B, 1280)
        return self.classifier(x)  # (B, num_classes)


def build_mobilenet_v2(
    batch: int,
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    in_channels: int = 3,
    image_size: int = 224,
    dropout: float = 0.2,
) -> tuple[MobileNetV2, tuple[Tensor]]:
    """Build MobileNetV2 and a batch of random images for it.

    Args:
        batch: number of example images.
        num_classes: size of the logits.
        width_mult: channel multiplier.
        in_channels: image channels.
        image_size: height and width of the example images.
        dropout: classifier dropout probability.

    Returns:
        The model and ``(images,)`` with images of shape (batch, in_channels, size, size).
    """
    model = MobileNetV2(
        num_classes=num_classes, width_mult=width_mult, in_channels=in_channels, dropout=dropout
    )
    images = torch.randn(batch, in_channels, image_size, image_size)  # (B, C, H, W)
    return model, (images,)
