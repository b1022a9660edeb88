"""MobileNet-V1 for CIFAR (stride-1 stem), as in the OrthoReg code."""

from __future__ import annotations

from torch import nn

from .base import FeaturesClassifier
from .catalog import register_model

# (width, stride) of the 13 depthwise-separable blocks (docs/method.md, section 5).
MOBILENET_V1_CFG: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def _conv_bn_relu(c_in: int, c_out: int, *, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(FeaturesClassifier):
    """MobileNet-V1: 3x3 stem, 13 blocks of depthwise 3x3 + pointwise 1x1 (each + BN + ReLU), linear head.

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        cfg: ``(width, stride)`` per block.
        stem_width: Stem output channels.

    Example:
        >>> import torch
        >>> MobileNetV1(num_classes=100)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(self, *, num_classes: int = 10, in_chans: int = 3,
                 cfg: tuple[tuple[int, int], ...] = MOBILENET_V1_CFG, stem_width: int = 32):
        layers = [_conv_bn_relu(in_chans, stem_width, kernel=3, stride=1)]
        channels = stem_width
        for width, stride in cfg:
            layers.append(nn.Sequential(
                _conv_bn_relu(channels, channels, kernel=3, stride=stride, groups=channels),
                _conv_bn_relu(channels, width, kernel=1, stride=1),
            ))
            channels = width
        super().__init__(nn.Sequential(*layers), width=channels, num_classes=num_classes)


@register_model
def mobilenet_v1(*, num_classes: int = 10, in_chans: int = 3) -> MobileNetV1:
    """MobileNet-V1 (CIFAR) of the paper. Example: ``mobilenet_v1(num_classes=100)``."""
    return MobileNetV1(num_classes=num_classes, in_chans=in_chans)
