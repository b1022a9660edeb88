"""CIFAR ResNets with BasicBlocks: ResNet-34 of the paper (3x3 stem, no max-pool) and ResNet-56 (He et al.).

Shortcuts that change shape are 1x1 conv + BN (option B), so a dependency graph can prune the residual
stream physically.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .catalog import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 conv + BN shortcut when the shape changes).

    Example:
        >>> import torch
        >>> BasicBlock(16, 32, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem, stages of BasicBlocks, global average pool, linear head.

    Args:
        blocks: Number of blocks per stage.
        widths: Channels per stage (the stem has ``widths[0]``).
        num_classes: Output classes.
        in_chans: Input channels.

    Example:
        >>> import torch
        >>> CifarResNet((1, 1), (8, 16), num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], *, num_classes: int = 10,
                 in_chans: int = 3):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks and widths must have the same length, got {blocks!r} and {widths!r}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, channels = [], widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stage = [BasicBlock(channels, width, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


@register_model
def resnet34(*, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """ResNet-34 (CIFAR) of the paper: blocks [3, 4, 6, 3], widths [64, 128, 256, 512]."""
    return CifarResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes=num_classes, in_chans=in_chans)


@register_model
def resnet56(*, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """ResNet-56 (He et al. CIFAR): 3 stages of 9 blocks, widths [16, 32, 64]."""
    return CifarResNet((9, 9, 9), (16, 32, 64), num_classes=num_classes, in_chans=in_chans)
