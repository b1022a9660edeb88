"""Regressions of issue 14 (items 4 and 5): each reproduced on a tiny model, the timm models it was found on slow.

- torch-pruning's own importances on channel-multiplier depthwise convs (``groups == in_channels <
  out_channels``: PiT's pooling, FastViT's patch embedding): ``IndexError`` inside the importance.
- torch-pruning's ``tests/test_reshape.py`` (Linear -> view -> ConvTranspose2d) over iterative steps.
- Blocks frozen under the default global ranking (timm ``efficientvit_b0``, ``test_nfnet``, ``tnt_s_legacy``,
  ``crossvit_tiny_240``).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from orthoreg_tp.adapters import build_pruner, prune

from orthoreg_tp import OrthoRegImportance

# torch-pruning's built-in criteria (magnitude, Taylor, Hessian, BN-scale, LAMP, FPGM), local and group forms
BUILTIN_IMPORTANCES = {
    "magnitude": tp.importance.MagnitudeImportance,
    "group_magnitude": tp.importance.GroupMagnitudeImportance,
    "taylor": tp.importance.TaylorImportance,
    "group_taylor": tp.importance.GroupTaylorImportance,
    "hessian": tp.importance.HessianImportance,
    "bn_scale": tp.importance.BNScaleImportance,
    "lamp": tp.importance.LAMPImportance,
    "fpgm": tp.importance.FPGMImportance,
}


def _builtin_importance(name: str, model: nn.Module, x: torch.Tensor) -> object:
    """A torch-pruning importance, with the gradients Taylor/Hessian read computed on ``x``."""
    imp = BUILTIN_IMPORTANCES[name]()
    if name == "hessian":
        imp.zero_grad()
        for sample in x.split(1):
            model.zero_grad()
            model(sample).sum().backward()
            imp.accumulate_grad(model)
    elif "taylor" in name:
        model.zero_grad()
        model(x).sum().backward()
    return imp


class MultiplierNet(nn.Module):
    """Two channel-multiplier depthwise convs (x2, x3) on a residual stream, as PiT's pooling and FastViT's stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.mix = nn.Conv2d(16, 16, 1)
        self.pool2 = nn.Conv2d(16, 48, 3, stride=2, padding=1, groups=16)
        self.head = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.bn(self.stem(x))))
        y = self.pool2(y + self.mix(y))
        return self.head(y.mean((2, 3)))


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of ``before`` survive in ``after`` (rows are distinct random vectors), in order."""
    flat_before, flat_after = before.flatten(1), after.flatten(1)
    return [int((flat_before == row).all(1).nonzero()[0]) for row in flat_after]


@pytest.mark.parametrize("name", list(BUILTIN_IMPORTANCES))
def test_builtin_importances_prune_channel_multiplier_convs(name: str) -> None:
    model, x = MultiplierNet(), torch.randn(2, 3, 16, 16)
    stem, pool, pool2 = model.stem.weight.detach().clone(), model.pool.weight.detach().clone(), model.pool2.weight
    pool2 = pool2.detach().clone()
    report = prune(model, x, importance=_builtin_importance(name, model, x), ratio=0.5)
    assert model(x).shape == (2, 5) and not report.frozen
    kept = _kept_rows(stem, model.stem.weight)
    assert 0 < len(kept) < 8
    # input channel c of a x2 (x3) conv owns output channels 2c, 2c+1 (3c..3c+2): whole blocks follow the stem
    assert _kept_rows(pool, model.pool.weight) == [2 * c + k for c in kept for k in range(2)]
    assert model.pool.groups == model.pool.in_channels == len(kept)
    assert _kept_rows(pool2, model.pool2.weight) == [6 * c + k for c in kept for k in range(6)]
    assert model.pool2.groups == model.pool2.in_channels == 2 * len(kept)


def test_a_channel_multiplier_conv_on_the_model_input_keeps_its_inputs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 12, 3, groups=3), nn.ReLU(), nn.Conv2d(12, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    prune(model, x, importance=tp.importance.MagnitudeImportance(), ratio=0.5)
    assert model[0].in_channels == model[0].groups == 3 and model[0].out_channels % 3 == 0 < model[0].out_channels
    assert model(x).shape[1] == 4


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["pit_xs_224", "fastvit_sa12"])
@pytest.mark.parametrize("name", ["magnitude", "group_magnitude", "taylor", "lamp", "fpgm"])
def test_builtin_importances_prune_timm_hybrids(model_name: str, name: str) -> None:
    # (BN-scale scores batch norms only: PiT has none, FastViT's sit in groups that are kept; the tiny model
    # above covers it)
    kwargs = {"img_size": 64} if model_name.startswith("pit") else {}
    model, x = timm.create_model(model_name, pretrained=False, **kwargs).eval(), torch.randn(1, 3, 64, 64)
    report = prune(model, x, importance=_builtin_importance(name, model, x), ratio=0.5)
    assert report.params_after < 0.8 * report.params_before and not report.frozen
    assert model(x).shape == (1, 1000)


class ReshapeNet(nn.Module):
    """torch-pruning's ``tests/test_reshape.py`` model: Linear -> view -> ConvTranspose2d, flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(512, 4096)
        self.conv1 = nn.ConvTranspose2d(256, 128, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1)
        self.final = nn.Linear(16384, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.linear(x)).view(-1, self.conv1.in_channels, 4, 4)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.final(torch.flatten(x, 1))


def _orthoreg_on(model: nn.Module, x: torch.Tensor, imp: OrthoRegImportance) -> OrthoRegImportance:
    imp.reset()
    model.zero_grad()
    F.cross_entropy(model(x), torch.tensor([3])).backward()
    imp.accumulate_grad(model, num_samples=1)
    model.zero_grad()
    return imp


@pytest.mark.slow
def test_torch_pruning_reshape_chain_over_iterative_steps() -> None:
    model, x = ReshapeNet(), torch.randn(1, 512)
    imp = _orthoreg_on(model, x, OrthoRegImportance())
    pruner = build_pruner(model, x, importance=imp, iterative_steps=5, pruning_ratio=0.5,
                          ignored_layers=[model.final], root_module_types=[nn.ConvTranspose2d, nn.Linear])
    widths = []
    for step in range(5):
        if step:
            _orthoreg_on(model, x, imp)  # OrthoReg scores the current (pruned) weights
        pruner.step()
        assert model.linear.out_features == 16 * model.conv1.in_channels  # whole 4x4 maps removed
        assert model(x).shape == (1, 10)
        widths.append((model.conv1.in_channels, model.conv1.out_channels, model.conv2.out_channels))
    # torch-pruning's linear schedule, int(width * (1 - 0.1 * step)) per layer: the viewed channels are ranked
    # once each, not once per feature of the Linear (which removed 209 of 256 in the first step)
    assert widths == [(230, 115, 57), (204, 102, 51), (179, 89, 44), (153, 76, 38), (128, 64, 32)]


def test_prune_counts_the_viewed_channels_once() -> None:
    model, x = ReshapeNet(), torch.randn(1, 512)
    report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5,
                   ignored_layers=[model.final])
    assert report.channels_before == 256 + 128 + 64 and report.channels_after == report.channels_before // 2
    assert model.linear.out_features == 16 * model.conv1.in_channels and model(x).shape == (1, 10)


# ------------------------------------------------------------------------------------------ frozen blocks
def _orthoreg_once(model: nn.Module, x: torch.Tensor) -> OrthoRegImportance:
    """OrthoReg's importance accumulated on one random batch (as the prunability sweep does)."""
    imp = OrthoRegImportance()
    out = model(x)
    F.cross_entropy(out, torch.zeros(x.shape[0], dtype=torch.long)).backward()
    imp.accumulate_grad(model, num_samples=x.shape[0], consume=True)
    return imp


def _timm_at_64(name: str) -> nn.Module:
    model = timm.create_model(name, pretrained=False).eval()
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    except Exception:
        model = timm.create_model(name, pretrained=False, img_size=64).eval()
    return model


@pytest.mark.parametrize(
    "name",
    [
        "test_nfnet",  # a 1x1 ScaledStdConv2d left with one input channel by the floor
        pytest.param("efficientvit_b0", marks=pytest.mark.slow),  # LiteMLA reshapes with a fixed head width
        pytest.param("tnt_s_legacy_patch16_224", marks=pytest.mark.slow),  # pixel embedding reshape (in_dim)
        pytest.param("crossvit_tiny_240", marks=pytest.mark.slow),  # token concat + class-token slice
    ],
)
def test_no_block_frozen_under_global_ranking(name: str) -> None:
    torch.manual_seed(0)
    model, x = _timm_at_64(name), torch.randn(1, 3, 64, 64)
    report = prune(model, x, importance=_orthoreg_once(model, x), ratio=0.5)
    assert report.frozen == ()
    assert report.params_after < 0.8 * report.params_before and model(x).shape == (1, 1000)
