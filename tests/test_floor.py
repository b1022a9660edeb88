import pytest
import torch
import torch_pruning as tp
from torch import nn

from orthoreg_tp import FloorImportance, OrthoRegImportance, keep_floor, layer_widths, prunable_channels
from orthoreg_tp.floor import LayerFloor, is_protected, protect_best


def net():
    return nn.Sequential(nn.Conv2d(3, 40, 3), nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 20, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 3))


def test_protect_best_and_keep_floor():
    assert keep_floor(40, 0.05) == 3 and keep_floor(10, 0.05) == 1
    out = protect_best(torch.tensor([0.1, 5.0, 0.3, 2.0]), 2)
    assert is_protected(out).tolist() == [False, True, False, True] and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="min_keep_ratio must be in"):
        LayerFloor(1.0)


def test_floor_uses_original_widths_across_importance_objects():
    """A fresh importance scoring an already pruned model keeps the *original* network's floor."""
    model = net()
    widths = layer_widths(model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    for ratio in (0.7, 0.8):  # two rounds with a new importance object each
        imp = OrthoRegImportance(initial_widths=widths)
        imp.accumulate(model, [(x, y)], num_samples=8, progress=False)
        pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, global_pruning=True, pruning_ratio=ratio,
                                      ignored_layers=[model[6]])
        pruner.step()
    assert model[0].out_channels >= keep_floor(40, 0.05)
    assert model[3].out_channels >= keep_floor(20, 0.05)


def test_floor_importance_wraps_torch_pruning_builtins():
    model = net()
    with torch.no_grad():
        model[3].weight.mul_(1e-3)  # the second conv would be emptied by plain global L1 ranking
    imp = FloorImportance(tp.importance.MagnitudeImportance(p=1, normalizer=None), layer_widths(model))
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 8, 8), importance=imp, global_pruning=True,
                                  pruning_ratio=0.6, ignored_layers=[model[6]])
    before = prunable_channels(pruner)
    pruner.step()
    assert 1 - prunable_channels(pruner) / before == pytest.approx(0.6, abs=0.02)
    assert model[3].out_channels == keep_floor(20, 0.05)
