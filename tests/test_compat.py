"""Fails loudly when torch-pruning changes the internals orthoreg_tp relies on (see orthoreg_tp/_compat.py)."""

import torch
import torch_pruning as tp
from torch import nn

from orthoreg_tp import _compat


def model_and_pruner():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    pruner = tp.pruner.MetaPruner(
        model,
        torch.randn(1, 3, 8, 8),
        importance=tp.importance.MagnitudeImportance(),
        global_pruning=True,
        ignored_layers=[model[7]],
    )
    return model, pruner


def test_handler_direction():
    assert _compat.handler_direction(tp.prune_conv_out_channels)
    assert not _compat.handler_direction(tp.prune_conv_in_channels)
    assert _compat.handler_direction(tp.prune_batchnorm_out_channels)
    assert _compat.handler_direction(tp.prune_depthwise_conv_in_channels)  # in == out for depthwise


def test_prunable_channel_count_matches_torch_pruning():
    _, pruner = model_and_pruner()
    assert _compat.prunable_channel_count(pruner) == pruner.initial_total_channels


def test_group_internals():
    model, pruner = model_and_pruner()
    group = pruner.DG.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    assert _compat.current_width(group) == 8
    assert _compat.root_indices(group, 0) == list(range(8))
    assert _compat.layer_name(group, model[0]) == "0"
    scores = torch.tensor([1.0, 3.0])
    assert torch.allclose(_compat.normalize_scores(scores, "mean"), scores / 2)
    assert _compat.normalize_scores(scores, None) is scores
