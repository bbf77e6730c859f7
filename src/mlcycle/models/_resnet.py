"""ResNet-18/50 and a tiny ResNet, topology-equivalent to torchvision's (He et al., CVPR 2016).

The bottleneck puts its stride on the 3x3 convolution (the "ResNet v1.5" of torchvision). The
residual sum is out-of-place and every ReLU is ``inplace=False`` so that the model traces cleanly
with ``make_fx`` / AOTAutograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mlcycle.models._init import init_cnn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_resnet"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1-projected) shortcut.

    Args:
        inplanes: input channels.
        planes: channels of both convolutions (the block's output; ``expansion`` is 1).
        stride: stride of the first convolution and of the projection.
        downsample: projection for the shortcut when shape changes, else None.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape (B, inplanes, H, W)."""
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, planes, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)  # (B, planes, H/s, W/s)
        return self.relu(out + identity)  # (B, planes, H/s, W/s)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a projected or identity shortcut.

    Args:
        inplanes: input channels.
        planes: channels of the inner convolutions; the output has ``4 * planes``.
        stride: stride of the 3x3 convolution and of the projection.
        downsample: projection for the shortcut when shape changes, else None.
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape (B, inplanes, H, W)."""
        out = self.relu(self.bn1(self.conv1(x)))  # (B, p, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, p, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4p, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)  # (B, 4p, H/s, W/s)
        return self.relu(out + identity)  # (B, 4p, H/s, W/s)


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pool, linear classifier.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage; stage ``i`` has ``width * 2**i`` planes and every
            stage after the first halves the resolution.
        num_classes: size of the output logits.
        width: planes of the first stage (64 in the paper).
        in_channels: channels of the input image.
        stem: ``"imagenet"`` (7x7/2 convolution then 3x3/2 max-pool, for 224x224 inputs) or
            ``"cifar"`` (one 3x3/1 convolution, for 32x32 inputs).
        zero_init_residual: zero the last BatchNorm of every block so that blocks start as
            identities (torchvision's option; off by default as there).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        width: int = 64,
        in_channels: int = 3,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(
                in_channels, width, kernel_size=7, stride=2, padding=3, bias=False
            )
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = _conv3x3(in_channels, width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.stages = nn.Sequential(
            *(
                self._make_stage(block, width * 2**i, n, stride=1 if i == 0 else 2)
                for i, n in enumerate(layers)
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

        init_cnn(self, linear_std=None)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_stage(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        """Classify images ``x`` of shape (B, C, H, W); returns logits (B, num_classes)."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w, H/2, W/2) imagenet | (B, w, H, W) cifar
        x = self.maxpool(x)  # (B, w, H/4, W/4) imagenet | unchanged cifar
        x = self.stages(x)  # (B, w * 2**(S-1) * expansion, H', W'), H' = H/4 / 2**(S-1)
        x = self.avgpool(x)  # (B, C', 1, 1)
        x = torch.flatten(x, 1)  # (B, C')
        return self.fc(x)  # (B, num_classes)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


def build_resnet(
    batch: int,
    *,
    block: str = "basic",
    layers: Sequence[int] = (2, 2, 2, 2),
    width: int = 64,
    stem: str = "imagenet",
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    zero_init_residual: bool = False,
) -> tuple[ResNet, tuple[Tensor]]:
    """Build a :class:`ResNet` and a batch of random images for it.

    Args:
        batch: number of example images.
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks per stage.
        width: planes of the first stage.
        stem: ``"imagenet"`` or ``"cifar"``; see :class:`ResNet`.
        num_classes: size of the logits.
        in_channels: image channels.
        image_size: height and width of the example images.
        zero_init_residual: see :class:`ResNet`.

    Returns:
        The model and ``(images,)`` with images of shape (batch, in_channels, size, size).
    """
    if block not in _BLOCKS:
        raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
    model = ResNet(
        _BLOCKS[block],
        layers,
        num_classes=num_classes,
        width=width,
        in_channels=in_channels,
        stem=stem,
        zero_init_residual=zero_init_residual,
    )
    images = torch.randn(batch, in_channels, image_size, image_size)  # (B, C, H, W)
    return model, (images,)
