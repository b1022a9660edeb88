"""Latency budgets and round_to="auto" in the one pruning path."""

import pytest
import torch
import torch_pruning as tp
from orthoreg_tp.adapters import PruneConfig, prune
from torch import nn

from orthoreg_tp._inputs import latency_inputs


def wide_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
        nn.Conv2d(96, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10),
    )


X = torch.randn(8, 3, 16, 16)
FAST = {"latency_repeats": 5, "latency_warmup": 1}


def test_latency_budget_is_searched_and_recorded():
    model = wide_net()
    report = prune(model, X, importance=tp.importance.GroupMagnitudeImportance(), target=("latency", 0.5),
                   tolerance=0.5, **FAST)
    assert report.target == ("latency", 0.5)
    accepted = [f for r, f in report.trials if r == report.ratio]
    assert accepted and accepted[-1] <= 0.5  # the kept trial was measured within the budget
    assert report.macs_fraction < 0.75
    lat = report.latency
    assert set(lat) == {"dense", "pruned", "ratio"}
    assert lat["ratio"] == accepted[-1]  # the report shows the timing the budget accepted, not a re-timing
    assert lat["dense"]["interleaved_with"] == 2 and lat["dense"]["batch_size"] == 8
    assert lat["pruned"]["samples"] == 5 and lat["dense"]["clock"] == "cpu-process-time"
    assert model(X).shape == (8, 10)


def test_round_to_auto_keeps_the_fastest_multiple():
    model = wide_net()
    report = prune(model, X, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5, round_to="auto", **FAST)
    candidates = report.latency["candidates"]
    assert set(candidates) == {"1", "8", "16", "32"}
    best = min(candidates, key=lambda k: (candidates[k], int(k)))
    widths = [m.out_channels for m in model if isinstance(m, nn.Conv2d)]
    assert all(w % int(best) == 0 for w in widths), (best, widths)
    assert report.config["round_to"] == "auto"
    assert model(X).shape == (8, 10)


def test_latency_inputs_and_bad_options():
    assert latency_inputs(torch.zeros(3, 2), 7).shape == (7, 2)
    assert latency_inputs((torch.zeros(2, 2),), 4)[0].shape == (4, 2)
    with pytest.raises(ValueError, match="latency_batch_size needs tensor"):
        latency_inputs({"x": torch.zeros(1)}, 4)
    with pytest.raises(ValueError, match="round_to must be"):
        PruneConfig(ratio=0.5, round_to="fast")
    with pytest.raises(ValueError, match="latency_repeats"):
        PruneConfig(target=("latency", 0.5), latency_repeats=0)
    assert PruneConfig.from_dict(PruneConfig(target=("latency", 0.5), round_to="auto").to_dict()).round_to == "auto"
