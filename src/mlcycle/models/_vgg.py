"""VGG-19 (configuration E of Simonyan & Zisserman, ICLR 2015), as torchvision builds it.

No BatchNorm by default; the classifier reads a 7x7 adaptive average pool so that any input of
at least 32x32 works (224x224 gives exactly 7x7 and the pool is then the identity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mlcycle.models._init import init_cnn

__all__ = ["CFG_E", "VGG", "build_vgg"]

# Channels of each 3x3 convolution; "M" is a 2x2/2 max-pool.
CFG_E: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """A VGG network: 3x3 convolutions and max-pools, then three linear layers.

    Args:
        cfg: layer configuration, channels or ``"M"`` for a max-pool.
        num_classes: size of the output logits.
        in_channels: channels of the input image.
        batch_norm: put a BatchNorm after every convolution.
        dropout: dropout probability in the classifier.
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = CFG_E,
        num_classes: int = 1000,
        in_channels: int = 3,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(c, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=False))
            c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(c * 7 * 7, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )

        init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        """Classify images ``x`` of shape (B, C, H, W); returns logits (B, num_classes)."""
        x = self.features(x)  # (B, 512, H/32, W/32)
        x = self.avgpool(x)  # (B, 512, 7, 7)
        x = torch.flatten(x, 1)  # (B, 512 * 7 * 7)
        return self.classifier(x)  # (B, num_classes)


def build_vgg(
    batch: int,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    batch_norm: bool = False,
    dropout: float = 0.5,
) -> tuple[VGG, tuple[Tensor]]:
    """Build VGG-19 and a batch of random images for it.

    Args:
        batch: number of example images.
        num_classes: size of the logits.
        in_channels: image channels.
        image_size: height and width of the example images (at least 32).
        batch_norm: the VGG-19-BN variant.
        dropout: classifier dropout probability.

    Returns:
        The model and ``(images,)`` with images of shape (batch, in_channels, size, size).
    """
    if image_size < 32:
        raise ValueError(
            f"VGG halves the image 5 times; image_size must be >= 32, got {image_size}"
        )
    model = VGG(
        CFG_E,
        num_classes=num_classes,
        in_channels=in_channels,
        batch_norm=batch_norm,
        dropout=dropout,
    )
    images = torch.randn(batch, in_channels, image_size, image_size)  # (B, C, H, W)
    return model, (images,)
