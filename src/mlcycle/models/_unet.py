"""U-Net (Ronneberger et al., MICCAI 2015) with "same" padding, BatchNorm and ReLU.

The encoder halves the resolution ``depth`` times and doubles the channels each time; the decoder
upsamples with a stride-2 transposed convolution, concatenates the encoder feature map of the same
resolution (``torch.cat`` on channels), and convolves. Every convolution pads, so the output has
the input's height and width and no cropping is needed; the input size must be a multiple of
``2**depth``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlcycle.models._init import init_cnn

__all__ = ["DoubleConv", "Down", "Up", "UNet", "build_unet"]


class DoubleConv(nn.Sequential):
    """(3x3 convolution, BatchNorm, ReLU) twice.

    Args:
        cin: input channels.
        cout: output channels of both convolutions.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=False),
            nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=False),
        )


class Down(nn.Sequential):
    """2x2 max-pool then :class:`DoubleConv`: (B, cin, H, W) -> (B, cout, H/2, W/2).

    Args:
        cin: input channels.
        cout: output channels.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(cin, cout))


class Up(nn.Module):
    """Upsample by a transposed convolution, concatenate the skip, :class:`DoubleConv`.

    Args:
        cin: channels of the input from below; the skip has ``cin // 2``.
        cout: output channels.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin // 2 + cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Merge ``x`` (B, cin, H, W) with ``skip`` (B, cout, 2H, 2W); returns (B, cout, 2H, 2W)."""
        x = self.up(x)  # (B, cin/2, 2H, 2W)
        x = torch.cat([skip, x], dim=1)  # (B, cout + cin/2, 2H, 2W)
        return self.conv(x)  # (B, cout, 2H, 2W)


class UNet(nn.Module):
    """U-Net for per-pixel classification.

    Args:
        in_channels: channels of the input image.
        num_classes: classes per pixel (channels of the output logits).
        width: channels of the first level; level ``i`` has ``width * 2**i``.
        depth: number of down- (and up-) sampling steps.
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 2, width: int = 64, depth: int = 4
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        chans = [width * 2**i for i in range(depth + 1)]  # e.g. 64, 128, 256, 512, 1024
        self.inc = DoubleConv(in_channels, chans[0])
        self.downs = nn.ModuleList(Down(chans[i], chans[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(chans[i + 1], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], num_classes, kernel_size=1)

        init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        """Segment ``x`` of shape (B, C, H, W); returns logits (B, num_classes, H, W)."""
        x = self.inc(x)  # (B, w, H, W)
        skips = [x]
        for down in self.downs:
            x = down(x)  # (B, w * 2**(i+1), H / 2**(i+1), W / 2**(i+1))
            skips.append(x)
        skips.pop()  # the bottom level is x itself: (B, w * 2**depth, H / 2**depth, W / 2**depth)
        for up in self.ups:
            x = up(x, skips.pop())  # (B, w * 2**i, H / 2**i, W / 2**i), i = depth-1 .. 0
        return self.head(x)  # (B, num_classes, H, W)


def build_unet(
    batch: int,
    *,
    in_channels: int = 3,
    num_classes: int = 2,
    width: int = 64,
    depth: int = 4,
    image_size: int = 256,
) -> tuple[UNet, tuple[Tensor]]:
    """Build a :class:`UNet` and a batch of random images for it.

    Args:
        batch: number of example images.
        in_channels: image channels.
        num_classes: classes per pixel.
        width: channels of the first level.
        depth: number of down-/up-sampling steps.
        image_size: height and width of the example images, a multiple of ``2**depth``.

    Returns:
        The model and ``(images,)`` with images of shape (batch, in_channels, size, size).
    """
    if image_size % 2**depth:
        raise ValueError(
            f"image_size must be a multiple of 2**depth = {2**depth}, got {image_size}"
        )
    model = UNet(in_channels=in_channels, num_classes=num_classes, width=width, depth=depth)
    images = torch.randn(batch, in_channels, image_size, image_size)  # (B, C, H, W)
    return model, (images,)
