"""VGG-13 for CIFAR as in the OrthoReg code: conv(bias) -> ReLU -> BatchNorm, one linear classifier."""

from __future__ import annotations

from torch import nn

from .base import FeaturesClassifier
from .catalog import register_model

VGG13_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(FeaturesClassifier):
    """Plain VGG for 32x32 inputs: 3x3 convs with bias, each followed by ReLU then BatchNorm (docs/method.md).

    Args:
        cfg: Layer widths, ``"M"`` for a 2x2 max-pool.
        num_classes: Output classes.
        in_chans: Input channels.

    Example:
        >>> import torch
        >>> VGG(VGG13_CFG, num_classes=100)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(self, cfg: tuple[int | str, ...] = VGG13_CFG, *, num_classes: int = 10, in_chans: int = 3):
        layers: list[nn.Module] = []
        channels = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1, bias=True), nn.ReLU(inplace=True),
                           nn.BatchNorm2d(int(v))]
                channels = int(v)
        super().__init__(nn.Sequential(*layers), width=channels, num_classes=num_classes)


@register_model
def vgg13(*, num_classes: int = 10, in_chans: int = 3) -> VGG:
    """VGG-13 (CIFAR) of the paper. Example: ``vgg13(num_classes=100)``."""
    return VGG(VGG13_CFG, num_classes=num_classes, in_chans=in_chans)
