"""The robust dependency graph and ``build_pruner``: host bugs reproduced, fixed per instance, nothing patched.

Each host bug of ``adapters/graph.py``'s docstring has a reproduction that is ``xfail(strict=True)`` against
plain torch-pruning (an upstream fix shows itself as an XPASS failure) and passes through ``build_pruner``.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from orthoreg_tp.adapters import (
    Fixup,
    PruningSpec,
    RobustDependencyGraph,
    adapted_pruner_class,
    build_pruner,
    prepare,
)
from orthoreg_tp.adapters._internal import hostgraph as graph_module
from test_adapters_chunks import C2f
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping

import orthoreg_tp

# ------------------------------------------------------------------------------------------ tiny models


class ChannelsLastSubsample(nn.Module):
    """LeViT's ``Subsample``: a spatial ``x[:, ::2, ::2]`` on a channels-last ``[B, H, W, C]`` tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)[:, ::2, ::2])


class SplitPaths(nn.Module):
    """SKNet-like: chunks of unequal width read by different layers, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.p, self.q = nn.Conv2d(3, 16, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(12, 6, 1)
        self.o = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(self.a(x), [self.p.in_channels, self.q.in_channels], dim=1)
        return self.o(self.p(x1) + self.q(x2))


class PartialConv(nn.Module):
    """FasterNet's partial convolution: ``cat((conv(x1), x2))`` of a split, plus a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.p, self.o = nn.Conv2d(3, 16, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        x1, x2 = torch.split(y, [self.p.in_channels, y.shape[1] - self.p.in_channels], dim=1)
        return self.o(torch.cat((self.p(x1), x2), 1) + y)


class GroupNormNoBias(nn.Module):
    """timm's ``GroupNorm1NoBias`` (PoolFormerV2): an affine GroupNorm whose bias is ``None``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.o = nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.Conv2d(8, 3, 1)
        self.n.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.n(self.a(x)))


class ReusedOnChunks(nn.Module):
    """torch-pruning's ``tests/test_split.py``: one block applied to two chunks of a split."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(d, d, 1), nn.BatchNorm2d(d), nn.GELU(), nn.Conv2d(d, d * 4, 1), nn.BatchNorm2d(d * 4)
        )
        self.block2_1 = nn.Sequential(nn.Conv2d(d, d, 1), nn.BatchNorm2d(d))
        self.block2_2 = nn.Sequential(nn.Conv2d(2 * d, d, 1), nn.BatchNorm2d(d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.block1(x)
        c1, c2 = self.block2_1[0].in_channels, self.block2_2[0].in_channels
        x1, x2, x3 = torch.split(x, [c1, c1, c2], dim=1)
        return self.block2_1(x1), self.block2_1(x2), self.block2_2(x3)


class LinearToDeconv(nn.Module):
    """torch-pruning's ``tests/test_reshape.py``: ``Linear -> view(-1, C, 4, 4) -> ConvTranspose2d``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 256)
        self.t1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.t2 = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.final = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.lin(x)).view(-1, self.t1.in_channels, 4, 4)
        x = F.relu(self.t2(F.relu(self.t1(x))))
        return self.final(torch.flatten(x, 1))


def _shufflenet() -> tuple[nn.Module, torch.Tensor]:
    return torchvision.models.shufflenet_v2_x0_5(weights=None), torch.randn(1, 3, 32, 32)


CASES = {
    "reshape: channel_shuffle divides by 0 (ShuffleNet)": _shufflenet,
    "slice: spatial slice of channels-last taken for channels (LeViT)": lambda: (
        ChannelsLastSubsample(),
        torch.randn(1, 4, 4, 4),
    ),
    "split: chunks paired with consumers in trace order (SKNet)": lambda: (SplitPaths(), torch.randn(1, 3, 4, 4)),
    "concat: split input sized before the split (FasterNet)": lambda: (PartialConv(), torch.randn(1, 3, 4, 4)),
    "groupnorm: bias None (PoolFormerV2)": lambda: (GroupNormNoBias(), torch.randn(1, 3, 4, 4)),
    "chunk: equal chunks consumed apart, two of them concatenated (YOLO's C2f)": lambda: (
        nn.Sequential(C2f(3, 16), nn.Conv2d(16, 3, 1)),
        torch.randn(1, 3, 8, 8),
    ),
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prune(model: nn.Module, x: torch.Tensor, robust: bool, **kwargs) -> None:
    imp = tp.importance.GroupMagnitudeImportance()
    spec = prepare(model, x)
    if robust:
        build_pruner(model, x, importance=imp, spec=spec, pruning_ratio=0.5, **kwargs).step()
    else:
        pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, **spec.pruner_kwargs(), **kwargs)
        pruner.step()
        spec.finalize(model, pruner)


_HOST = pytest.mark.xfail(strict=True, reason="torch-pruning 1.6.1 bug (an XPASS means upstream fixed it)")


@pytest.mark.parametrize("robust", [pytest.param(False, marks=_HOST, id="plain"), pytest.param(True, id="robust")])
@pytest.mark.parametrize("case", list(CASES))
def test_host_bug_on_a_tiny_graph(case: str, robust: bool) -> None:
    torch.manual_seed(0)
    model, x = CASES[case]()
    model.eval()
    before, ref = _params(model), model(x)
    _prune(model, x, robust)
    out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _params(model) < before


@pytest.mark.parametrize("robust", [pytest.param(False, marks=_HOST, id="plain"), pytest.param(True, id="robust")])
def test_op_bookkeeping_with_uninferred_sizes(robust: bool) -> None:
    # CoaT: concat/split sizes that channel inference could not fill are None; the bookkeeping adds to them
    for op, pruner in ((ops._ConcatOp(0), "concat"), (ops._SplitOp(0), "split")):
        sizes = [None, 4]
        setattr(op, f"{pruner}_sizes", sizes)
        graph = RobustDependencyGraph() if robust else tp.DependencyGraph()
        handler = graph.REGISTERED_PRUNERS[ops.OPTYPE.CONCAT if pruner == "concat" else ops.OPTYPE.SPLIT]
        handler.prune_out_channels(op, [0])
        assert getattr(op, f"{pruner}_sizes") == [None, 4]


@pytest.mark.parametrize("robust", [pytest.param(False, marks=_HOST, id="plain"), pytest.param(True, id="robust")])
def test_index_mapping_with_a_one_element_offset(robust: bool) -> None:
    # an index mapping built from failed inference reads offset[1] of a one-element list
    idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(3)]
    for cls in (index_mapping._ConcatIndexMapping, index_mapping._SplitIndexMapping):
        for reverse in (False, True):
            mapping = cls(offset=[0], reverse=reverse)
            if robust:
                mapping = graph_module.GUARDED_MAPPINGS[cls](offset=[0], reverse=reverse)
            assert mapping(idxs) == []


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.o = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.cat((self.a(x), self.b(x)), 1))


@pytest.mark.parametrize("robust", [pytest.param(False, marks=_HOST, id="plain"), pytest.param(True, id="robust")])
def test_concat_updater_with_an_uninferred_size(robust: bool) -> None:
    # CoaT: sum() over a concat's channel list holding None raises TypeError in the host updater
    model, x = _Cat(), torch.randn(1, 3, 4, 4)
    graph = RobustDependencyGraph().build_dependency(model, x)
    node = next(n for n in graph.module2node.values() if n.type == ops.OPTYPE.CONCAT)
    node.module.concat_sizes = [None, 4]
    if robust:
        graph.update_index_mapping()
    else:
        index_mapping.update_concat_index_mapping(graph, node)


def test_a_walk_past_the_budget_raises_group_explosion(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = SplitPaths(), torch.randn(1, 3, 4, 4)
    graph = RobustDependencyGraph().build_dependency(model, x)
    monkeypatch.setattr(graph_module, "INDEX_BUDGET", 8)  # our own constant, not torch-pruning's
    with pytest.raises(graph_module.GroupExplosion, match="grew past 8 index entries") as info:
        graph.get_pruning_group(model.a, tp.prune_conv_out_channels, list(range(16)))
    assert info.value.module is model.a


def test_robust_group_matches_the_host_group_where_the_host_is_right() -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32)
    host = tp.DependencyGraph().build_dependency(model, x)
    robust = RobustDependencyGraph().build_dependency(model, x)
    for layer in (model.conv1, model.layer2[0].conv1, model.layer3[1].conv2):
        idxs = list(range(0, layer.out_channels, 3))
        a = host.get_pruning_group(layer, tp.prune_conv_out_channels, idxs)
        b = robust.get_pruning_group(layer, tp.prune_conv_out_channels, idxs)
        assert _as_set(a) == _as_set(b) and len(_as_set(a)) > 3


def _as_set(group) -> set:
    # op nodes (relu, add...) and their pruners are per-graph objects: compare by name
    return {(dep.target.name, dep.handler.__name__, tuple(sorted(i))) for dep, i in group}


# ------------------------------------------------------------------------------------ nothing is replaced
def _torch_pruning_attributes() -> dict[tuple[str, str], int]:
    """``id()`` of every attribute of every loaded torch_pruning module and of every class they define."""
    snap: dict[tuple[str, str], int] = {}
    modules = {n: m for n, m in list(sys.modules.items()) if n == "torch_pruning" or n.startswith("torch_pruning.")}
    for name, module in modules.items():
        for attr, value in list(vars(module).items()):
            snap[(name, attr)] = id(value)
            if isinstance(value, type) and value.__module__.startswith("torch_pruning"):
                for cls_attr, cls_value in list(vars(value).items()):
                    snap[(f"{value.__module__}.{value.__qualname__}", cls_attr)] = id(cls_value)
    return snap


@pytest.mark.parametrize("case", ["shufflenet", "groupnorm", "split", "slice"])
def test_nothing_of_torch_pruning_is_replaced(case: str) -> None:
    model, x = {
        "shufflenet": _shufflenet,
        "groupnorm": lambda: (GroupNormNoBias(), torch.randn(1, 3, 4, 4)),
        "split": lambda: (SplitPaths(), torch.randn(1, 3, 4, 4)),
        "slice": lambda: (ChannelsLastSubsample(), torch.randn(1, 4, 4, 4)),
    }[case]()
    before = _torch_pruning_attributes()
    assert len(before) > 500
    pruner = build_pruner(model, x, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5)
    assert _torch_pruning_attributes() == before
    pruner.step()
    assert _torch_pruning_attributes() == before
    model(x)


# ------------------------------------------------------------------- regressions of the old host_fixes()
def test_split_whose_chunks_feed_the_same_block_twice() -> None:
    torch.manual_seed(0)
    model, x = ReusedOnChunks().eval(), torch.randn(1, 8, 4, 4)
    pruner = build_pruner(model, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.5)
    for group in pruner.step(interactive=True):
        group.prune()
    c1, c2 = model.block2_1[0].in_channels, model.block2_2[0].in_channels
    assert model.block1[3].out_channels == 2 * c1 + c2 < 32
    assert c1 < 8 and c2 < 16
    assert [o.shape[1] for o in model(x)] == [8, 8, 8]


def test_linear_view_deconv_pruned_in_five_steps() -> None:
    torch.manual_seed(0)
    model, x = LinearToDeconv().eval(), torch.randn(1, 16)
    pruner = build_pruner(
        model, x, importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.5, iterative_steps=5,
        root_module_types=[nn.ConvTranspose2d, nn.Linear],
    )
    widths = []
    for _ in range(5):
        pruner.step()
        assert model.lin.out_features == model.t1.in_channels * 16  # whole 4x4 maps go with a channel
        assert model(x).shape == (1, 10)
        widths.append(model.t1.out_channels)
    assert widths[-1] == 4 and widths == sorted(widths, reverse=True)


# ---------------------------------------------------------------------------------- pruners and steps
class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.gn = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.gn(self.c2(x))) + x
        return self.fc(x.mean((2, 3)))


PRUNER_CLASSES = [
    tp.pruner.MetaPruner,
    tp.pruner.GroupNormPruner,
    tp.pruner.BNScalePruner,
    tp.pruner.GrowingRegPruner,
    orthoreg_tp.OrthoRegPruner,
]


@pytest.mark.parametrize("pruner_class", PRUNER_CLASSES, ids=lambda c: c.__name__)
def test_every_pruner_class_gets_the_state_of_its_host_init(pruner_class: type) -> None:
    torch.manual_seed(0)
    model, x = _Small().eval(), torch.randn(2, 3, 8, 8)
    host_model = copy.deepcopy(model)
    kwargs = {"importance": tp.importance.GroupMagnitudeImportance(), "pruning_ratio": 0.5, "global_pruning": True}
    host = pruner_class(host_model, x, ignored_layers=[host_model.fc], **kwargs)
    pruner = build_pruner(model, x, pruner_class=pruner_class, **kwargs)
    assert isinstance(pruner, pruner_class) and isinstance(pruner.DG, RobustDependencyGraph)
    assert pruner.initial_total_channels == host.initial_total_channels
    assert len(pruner.layer_init_out_ch) == len(host.layer_init_out_ch)
    assert pruner.out_channel_groups == {model.gn: 4}
    if hasattr(host, "_groups"):  # regularizing pruners cache their groups in __init__
        assert len(pruner._groups) == len(host._groups) > 0
        pruner.update_regularizer()
    model(x).square().mean().backward()
    if pruner_class is not tp.pruner.MetaPruner:
        pruner.regularize(model)
    pruner.step()
    host.step()
    assert model(x).shape == (2, 5)
    assert [m.weight.shape for m in (model.c1, model.c2)] == [m.weight.shape for m in (host_model.c1, host_model.c2)]


def _counting_spec(calls: list[int]) -> PruningSpec:
    return PruningSpec(
        model_class="_Small", source="generic", fixups=(Fixup("", "count", lambda m, ctx: calls.append(1)),)
    )


def test_finalize_runs_after_each_step_that_pruned() -> None:
    model, x, calls = _Small().eval(), torch.randn(1, 3, 8, 8), []
    pruner = build_pruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(), spec=_counting_spec(calls),
        pruning_ratio=0.5, ignored_layers=[model.fc],
    )
    for _ in pruner.step(interactive=True):  # a dry run: nothing pruned, nothing to fix
        pass
    assert calls == [] and model.c1.out_channels == 16
    pruner.reset()
    for group in pruner.step(interactive=True):
        group.prune()
        assert calls == []  # not before the generator is exhausted
    assert calls == [1] and model.c1.out_channels == 8
    pruner.finalize()  # nothing pruned since: no second run
    assert calls == [1]

    model = _Small().eval()
    pruner = build_pruner(model, x, importance=tp.importance.GroupMagnitudeImportance(), spec=_counting_spec(calls),
                          pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert calls == [1, 1] and model.c1.out_channels == 8


def test_user_kwargs_merge_with_the_spec() -> None:
    model, x = _Small().eval(), torch.randn(1, 3, 8, 8)
    spec = prepare(model, x)
    pruner = build_pruner(model, x, importance=tp.importance.GroupMagnitudeImportance(), spec=spec,
                          ignored_layers=[model.c2], pruning_ratio=0.25)
    assert model.fc in pruner.ignored_layers and model.c2 in pruner.ignored_layers
    assert pruner.pruning_ratio == 0.25


def test_bad_pruner_class_is_rejected() -> None:
    model = _Small()
    with pytest.raises(TypeError, match="BasePruner subclass"):
        build_pruner(model, torch.randn(1, 3, 8, 8), importance=tp.importance.GroupMagnitudeImportance(),
                     pruner_class=nn.Module)


def test_adapted_class_is_cached_and_idempotent() -> None:
    cls = adapted_pruner_class(tp.pruner.GroupNormPruner)
    assert cls is adapted_pruner_class(tp.pruner.GroupNormPruner) is adapted_pruner_class(cls)
    assert issubclass(cls, tp.pruner.GroupNormPruner) and cls.__name__ == "RobustGroupNormPruner"


def test_pruning_history_replays_on_a_robust_graph() -> None:
    torch.manual_seed(0)
    model, x = PartialConv().eval(), torch.randn(1, 3, 4, 4)
    dense = copy.deepcopy(model)
    pruner = build_pruner(model, x, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5)
    pruner.step()
    replay = build_pruner(dense, x, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.0)
    replay.DG.load_pruning_history(pruner.pruning_history())
    assert torch.allclose(dense(x), model(x), atol=1e-6)


# ------------------------------------------------------------------------------------ pinned host sources
PINNED_SOURCES = {  # sha256[:16] of inspect.getsource at torch-pruning 1.6.1
    "DependencyGraph.build_dependency": "884b30d48392c771",
    "DependencyGraph.get_pruning_group": "706814b0c1b9f064",
    "DependencyGraph.__init__": "9ebb2dfd783b07de",
    "index_mapping": "6fa2e3fd28675171",
    "Group.prune": "e3a23aaae52e3ea8",
    "BasePruner.__init__": "d555e7346b292c55",
    "ConcatPruner": "32b1a96ed5224969",
    "SplitPruner": "fa382af6ffe94102",
}


def test_host_sources_are_the_ones_the_robust_graph_copies() -> None:
    """A torch-pruning upgrade changing what RobustDependencyGraph / the pruner classes mirror fails here.

    Re-check ``adapters/graph.py`` (build_dependency, update_index_mapping, get_pruning_group, RobustGroup) and
    ``adapters/pruner.py`` (the DG seam in BasePruner.__init__) against the new sources, then update the pins.
    """
    from torch_pruning.dependency.group import Group
    from torch_pruning.pruner.algorithms.base_pruner import BasePruner

    objects = {
        "DependencyGraph.build_dependency": tp.DependencyGraph.build_dependency,
        "DependencyGraph.get_pruning_group": tp.DependencyGraph.get_pruning_group,
        "DependencyGraph.__init__": tp.DependencyGraph.__init__,
        "index_mapping": index_mapping,
        "Group.prune": Group.prune,
        "BasePruner.__init__": BasePruner.__init__,
        "ConcatPruner": ops.ConcatPruner,
        "SplitPruner": ops.SplitPruner,
    }
    changed = [
        name
        for name, obj in objects.items()
        if hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16] != PINNED_SOURCES[name]
    ]
    assert not changed, f"torch-pruning {getattr(tp, '__version__', '?')} changed {changed}"


def test_no_warning_twice_about_unwrapped_parameters() -> None:
    class WithGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)
            self.gamma = nn.Parameter(torch.ones(1, 8, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.a(x) * self.gamma)

    model = WithGate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted_pruner_class(tp.pruner.MetaPruner)(
            model, torch.randn(1, 3, 4, 4), importance=tp.importance.GroupMagnitudeImportance(),
            ignored_layers=[model.o],
        )
    assert sum("Unwrapped parameters detected" in str(w.message) for w in caught) == 1
