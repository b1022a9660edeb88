"""prune() over a CPU-sized set of timm and torchvision models, two ratios, two importances.

Checks: the output keeps its shape and stays finite, parameters shrink, and attention modules stay
self-consistent (``num_heads * head_dim`` matches the projections, ``nn.MultiheadAttention`` widths divide by
the head count).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from orthoreg_tp.adapters import prune
from torchvision.models.vision_transformer import VisionTransformer

from orthoreg_tp import OrthoRegImportance


def _tv_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=10)


MODELS = {
    "timm-test_vit": (lambda: timm.create_model("test_vit", pretrained=False, num_classes=10), 64),
    "timm-test_vit_relpos": (
        lambda: timm.create_model("test_vit_relpos", pretrained=False, num_classes=10, img_size=64),
        64,
    ),
    "timm-test_resnet": (lambda: timm.create_model("test_resnet", pretrained=False, num_classes=10), 64),
    "timm-test_efficientnet": (lambda: timm.create_model("test_efficientnet", pretrained=False, num_classes=10), 64),
    "timm-test_convnext": (lambda: timm.create_model("test_convnext", pretrained=False, num_classes=10), 64),
    "tv-resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), 32),
    "tv-mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), 32),
    "tv-shufflenet_v2": (lambda: torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10), 64),
    "tv-vit": (_tv_vit, 32),
    "tv-swin_t": (lambda: torchvision.models.swin_t(weights=None, num_classes=10), 64),
}


def _importance(kind: str, model: nn.Module, x: torch.Tensor) -> tp.importance.Importance:
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance()
    imp = OrthoRegImportance()
    imp.accumulate(model, [(x, torch.arange(x.shape[0]) % 10)], num_samples=x.shape[0], progress=False)
    return imp


def _check_attention(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            assert m.embed_dim % m.num_heads == 0, name
            assert m.head_dim * m.num_heads == m.embed_dim, name
        qkv, heads = getattr(m, "qkv", None), getattr(m, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int) and hasattr(m, "head_dim"):
            assert heads * m.head_dim * 3 == qkv.out_features, name
            if hasattr(m, "attn_dim"):
                assert m.attn_dim == heads * m.head_dim, name
            proj = getattr(m, "proj", None)
            if isinstance(proj, nn.Linear):
                assert proj.in_features == qkv.out_features // 3, name
            if isinstance(getattr(m, "scale", None), float):
                assert m.scale == pytest.approx(m.head_dim**-0.5), name


SLOW = {"tv-swin_t"}  # 3-4 s per case on a 2-core CPU


@pytest.mark.parametrize("importance", ["orthoreg", "magnitude"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_prune_runs_and_keeps_the_output(name: str, ratio: float, importance: str) -> None:
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
    imp = _importance(importance, model, x)

    report = prune(model, x, importance=imp, ratio=ratio)

    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape
    assert torch.isfinite(after).all()
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    _check_attention(model)
