"""A tiny CNN for quick runs and tests (digits, 16x16 or 32x32 inputs): seconds per epoch on a CPU."""

from __future__ import annotations

from torch import nn

from .base import FeaturesClassifier
from .catalog import register_model


class TinyCNN(FeaturesClassifier):
    """Three conv-BN-ReLU blocks (two followed by max-pool), global average pool, linear head.

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        widths: Channels of the three convs.

    Example:
        >>> import torch
        >>> TinyCNN(num_classes=10, in_chans=1)(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, *, num_classes: int = 10, in_chans: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        layers: list[nn.Module] = []
        channels = in_chans
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        super().__init__(nn.Sequential(*layers), width=channels, num_classes=num_classes)


@register_model
def tiny_cnn(*, num_classes: int = 10, in_chans: int = 3) -> TinyCNN:
    """The tiny CNN used by the quick preset and the tests."""
    return TinyCNN(num_classes=num_classes, in_chans=in_chans)


@register_model
def tiny_resnet(*, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """A two-stage CIFAR ResNet (one block per stage, widths 16/32): residual coupling in seconds."""
    from .resnet import CifarResNet

    return CifarResNet((1, 1), (16, 32), num_classes=num_classes, in_chans=in_chans)
