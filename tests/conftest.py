import warnings

import pytest
import torch
from torch import nn

# Tiny models on a 2-core machine: one intra-op thread avoids oversubscription (and is faster for small ops).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*Unwrapped parameters detected.*")
    yield


def make_tiny_cnn(in_chans: int = 3, widths: tuple[int, ...] = (6, 8), num_classes: int = 3) -> nn.Sequential:
    """Conv(3x3, padding 1)-BN-ReLU per width, global average pool, flatten, linear head.

    With ``widths=(a, b)`` the layers are indexed 0 (conv), 1 (BN), 3 (conv), 4 (BN), 8 (linear).
    """
    layers: list[nn.Module] = []
    channels = in_chans
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


@pytest.fixture
def tiny_cnn():
    """The tests' small CNN builder: ``tiny_cnn(in_chans=3, widths=(6, 8), num_classes=3)`` (see make_tiny_cnn)."""
    return make_tiny_cnn


def write_yolo_dataset(root) -> str:
    """Four 64x64 random images per split, one box each, in ultralytics' layout; returns the data YAML's path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(4):
            pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{i}.jpg")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    return str(data)
