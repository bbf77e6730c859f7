"""A small multilayer perceptron, sized for scikit-learn's 8x8 digits (64 features, 10 classes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "build_mlp"]


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last).

    Args:
        in_features: input features.
        hidden: widths of the hidden layers; ``len(hidden) + 1`` Linear layers in all.
        num_classes: size of the output logits.
        dropout: dropout probability after every hidden activation (0 disables it).
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 128, 64),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_features
        for h in hidden:
            layers += [nn.Linear(c, h), nn.ReLU(inplace=False)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            c = h
        layers.append(nn.Linear(c, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Classify ``x`` of shape (B, in_features); returns logits (B, num_classes)."""
        return self.net(x)  # (B, num_classes)


def build_mlp(
    batch: int,
    *,
    in_features: int = 64,
    hidden: Sequence[int] = (128, 128, 64),
    num_classes: int = 10,
    dropout: float = 0.0,
) -> tuple[MLP, tuple[Tensor]]:
    """Build an :class:`MLP` and a batch of random feature vectors for it.

    Args:
        batch: number of example rows.
        in_features: input features.
        hidden: hidden-layer widths.
        num_classes: size of the logits.
        dropout: dropout probability after hidden activations.

    Returns:
        The model and ``(x,)`` with ``x`` of shape (batch, in_features).
    """
    model = MLP(in_features=in_features, hidden=hidden, num_classes=num_classes, dropout=dropout)
    x = torch.randn(batch, in_features)  # (B, in_features)
    return model, (x,)
