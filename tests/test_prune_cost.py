"""prune()'s shortcuts give what the long way gives.

The first dependency graph is built from the reference trace's recorded forward pass (no second forward), the
traces keep no activations, groups are walked once per graph generation and the ranking's scores are reused
by the step.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from orthoreg_tp.adapters import prune
from orthoreg_tp.adapters._internal.autograd import structure_only, walk_graph
from orthoreg_tp.adapters._internal.hostgraph import RobustDependencyGraph
from orthoreg_tp.adapters._internal.tracing import trace_outputs


class SharedBlock(nn.Module):
    """One conv called twice (a reused module) between two convs, plus a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.shared, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.cat([self.shared(x), self.shared(x.relu())], dim=1))


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "timm test_vit": (timm.create_model("test_vit", pretrained=False, img_size=64).eval(),
                          torch.randn(1, 3, 64, 64)),
        "timm test_resnet": (timm.create_model("test_resnet", pretrained=False).eval(), torch.randn(1, 3, 64, 64)),
        "shufflenet": (torchvision.models.shufflenet_v2_x0_5(weights=None).eval(), torch.randn(1, 3, 64, 64)),
        "shared block": (SharedBlock().eval(), torch.randn(1, 3, 12, 12)),
    }


def _groups(graph: RobustDependencyGraph) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Every group as sorted ``(node, handler, indices)`` triples: comparable across graphs of one model."""
    return [
        sorted((dep.target.name, dep.handler.__name__, tuple(idxs)) for dep, idxs in group)
        for group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear))
    ]


@pytest.mark.parametrize("name", list(_models()))
def test_graph_from_the_recorded_pass_equals_the_traced_graph(name: str) -> None:
    model, x = _models()[name]
    for p in model.parameters():
        p.requires_grad_(True)
    traced = RobustDependencyGraph().build_dependency(model, x)
    trace = trace_outputs(model, x)
    replayed = RobustDependencyGraph().build_dependency(model, x, recording=trace.recording)
    assert sorted(n.name for n in replayed.module2node.values()) == sorted(n.name for n in traced.module2node.values())
    assert _groups(replayed) == _groups(traced)


def test_traces_keep_no_activations() -> None:
    x = torch.randn(2, 8, requires_grad=True)
    layer = nn.Linear(8, 8)
    with structure_only():
        y = layer(x).relu()
    saved = [fn._saved_result for fn in walk_graph([y], lambda f: True) if hasattr(fn, "_saved_result")]
    assert saved and all(t.device.type == "meta" and t.shape == (2, 8) for t in saved)
    model, x = _models()["shared block"]
    trace = trace_outputs(model, x)
    assert trace.outputs[0].grad_fn is None and trace.recording.output.grad_fn is not None


@pytest.mark.parametrize("name", ["timm test_resnet", "shared block"])
def test_prune_matches_the_long_way(name: str) -> None:
    """A user forward function turns off the recorded pass: the same channels go either way."""
    model, x = _models()[name]
    short = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5, global_ranking=False)
    model, x = _models()[name]
    long = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5, global_ranking=False,
                 forward_fn=lambda m, inputs: m(inputs))
    assert short.history and short.history == long.history
    assert short.params_after == long.params_after and short.macs_after == long.macs_after


def test_score_cache_calls_the_importance_once_per_group() -> None:
    """The ranking and the first attempt share a graph: each group is scored once."""
    calls: list[int] = []
    inner = tp.importance.GroupMagnitudeImportance()

    def counting(group: tp.dependency.Group) -> torch.Tensor:
        calls.append(id(group))
        return inner(group)

    model, x = _models()["timm test_resnet"]
    prune(model, x, importance=counting, ratio=0.5, global_ranking=False)
    assert calls and len(calls) == len(set(calls))
