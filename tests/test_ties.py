"""Tie-breaking: global ranking must remove the requested number of channels even when scores are equal."""

import torch
import torch_pruning as tp
from torch import nn

from orthoreg_tp import FloorImportance, TieBreakImportance, layer_widths, prunable_channels
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.engine.pruning import prune_round_
from orthoreg_tp.ties import break_ties

X = torch.randn(1, 3, 16, 16)


def test_break_ties_makes_equal_scores_distinct_and_keeps_order():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 2.0, float("inf"), 0.5])
    out = break_ties(scores, "layer")
    finite = out[torch.isfinite(out)]
    assert out.dtype == torch.float64
    assert finite.unique().numel() == finite.numel()  # no ties left
    assert torch.isinf(out[6])  # protected channels stay protected
    assert torch.allclose(out[torch.isfinite(out)].float(), scores[torch.isfinite(scores)])
    distinct = torch.tensor([0, 5, 7, 3])  # 1.0 < 2.0, 0.5 < 1.0, 0.0 < 0.5: order of distinct values kept
    assert out[0] < out[5] and out[7] < out[0] and out[3] < out[7]
    assert torch.equal(break_ties(scores, "layer"), out)  # deterministic (same on every rank and replay)
    assert not torch.equal(break_ties(scores, "other")[distinct], out[distinct])  # layers differ


def bn_net(tiny_cnn):
    torch.manual_seed(0)
    return tiny_cnn(3, (32, 48, 24), 10)


def global_step(model, importance, ratio):
    pruner = tp.pruner.MetaPruner(model, X, importance=importance, global_pruning=True, pruning_ratio=ratio,
                                  ignored_layers=[model[-1]])
    before = prunable_channels(pruner)
    pruner.step()
    return 1 - prunable_channels(pruner) / before


def test_tied_scores_overshoot_in_plain_global_ranking_but_not_with_tie_breaking(tiny_cnn):
    # Fresh BatchNorm gammas are all 1: every score ties with the threshold.
    widths = layer_widths(bn_net(tiny_cnn))
    bn = lambda: FloorImportance(tp.importance.BNScaleImportance(normalizer=None), widths)  # noqa: E731
    assert global_step(bn_net(tiny_cnn), bn(), 0.3) > 0.6  # torch-pruning removes every tied channel
    achieved = global_step(bn_net(tiny_cnn), TieBreakImportance(bn()), 0.3)
    total = 32 + 48 + 24
    assert round(achieved * total) == total - int(total * 0.7)  # exactly torch-pruning's own count


def test_prune_round_hits_the_ratio_with_tied_scores(tiny_cnn):
    model = bn_net(tiny_cnn)
    imp = FloorImportance(tp.importance.BNScaleImportance(normalizer=None), layer_widths(model))
    report = prune_round_(model, X, imp, ratio=0.3)
    assert abs(report.channels_removed - 0.3) < 0.01
    assert model(X).shape == (1, 10)


def test_tie_break_delegates_to_the_wrapped_importance():
    inner = FloorImportance(tp.importance.MagnitudeImportance(p=1, normalizer=None))
    assert TieBreakImportance(inner).floor is inner.floor


def test_round_to_keeps_multiples_and_reaches_the_ratio():
    model = build_model("tiny_resnet", num_classes=10)
    imp = FloorImportance(tp.importance.MagnitudeImportance(p=1, normalizer=None), layer_widths(model))
    report = prune_round_(model, X, imp, ratio=0.3, round_to=8)
    widths = layer_widths(model)
    assert all(w % 8 == 0 for name, w in widths.items() if name != "fc"), widths
    assert 0.3 - 1e-6 <= report.channels_removed < 0.45  # rounding down overshoots by less than a multiple per layer
    assert model(X).shape == (1, 10)


def test_recipe_round_to_option():
    import argparse

    import pytest

    from orthoreg_tp.engine.config import RecipeConfig, add_common_args, config_from_args

    args = add_common_args(argparse.ArgumentParser()).parse_args(["--round-to", "8"])
    assert config_from_args(args, recipe="iterative").round_to == 8
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        RecipeConfig(round_to=0).validate()


def test_per_layer_normalizer_spreads_magnitude_pruning_across_layers():
    import pytest

    from orthoreg_tp.engine.methods import build_importance, get_method

    def kept_fractions(normalizer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(32, 10))
        dense = layer_widths(model)
        prune_round_(model, X, build_importance(get_method("l1"), dense, normalizer=normalizer), ratio=0.5)
        return [layer_widths(model)[k] / dense[k] for k in ("0", "2", "4")]

    raw, mean = kept_fractions(None), kept_fractions("mean")
    # Group L1 norms differ by layer (fan-in, consumers): raw global ranking cuts one layer down to its floor.
    assert min(raw) <= 0.1
    assert min(mean) >= 0.25 and abs(sum(mean) / 3 - 0.5) < 0.05
    with pytest.raises(ValueError, match="unknown normalizer"):
        FloorImportance(tp.importance.MagnitudeImportance(), normalizer="median")
