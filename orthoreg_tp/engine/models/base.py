"""The shape the plain CNNs share: ``features`` -> global average pool -> linear ``classifier``."""

from __future__ import annotations

from torch import Tensor, nn


class FeaturesClassifier(nn.Module):
    """A feature extractor followed by global average pooling and one linear classifier.

    Args:
        features: The convolutional trunk.
        width: Channels ``features`` outputs.
        num_classes: Output classes.

    Example:
        >>> import torch
        >>> net = FeaturesClassifier(nn.Sequential(nn.Conv2d(3, 8, 3)), width=8, num_classes=5)
        >>> net(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 5])
    """

    def __init__(self, features: nn.Sequential, *, width: int, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)  # identity on the CIFAR VGG's 1x1 maps; any input size works
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.classifier(self.pool(self.features(x)).flatten(1))
