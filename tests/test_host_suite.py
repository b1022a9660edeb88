"""torch-pruning's own test suite (v1.6.1), rewritten: every pruning case through ``build_pruner`` with OrthoReg.

Each case mirrors one of torch-pruning's ``tests/test_*.py`` (named in its id) on a small model, with
:class:`~orthoreg_tp.OrthoRegImportance` accumulated on random data instead of the host's importances, and
checks that the pruned model is consistent (it runs, keeps its output shape, lost parameters) after every step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from orthoreg_tp.adapters import build_pruner

from orthoreg_tp import OrthoRegImportance


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _outputs(o)]


def _run(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def _loss(out: Any, _target: torch.Tensor) -> torch.Tensor:
    return sum(o.float().square().mean() for o in _outputs(out))


def _feed(imp: OrthoRegImportance, model: nn.Module, x: Any) -> None:
    """Accumulate the importance's gradient statistics on random data (the current shapes)."""
    imp.reset()
    if isinstance(x, torch.Tensor):
        batch = torch.cat([x, torch.randn_like(x)])
        imp.accumulate(model, [(batch, torch.zeros(len(batch)))], loss_fn=_loss, progress=False)
    else:  # several inputs: one backward of our own
        model.zero_grad(set_to_none=True)
        _loss(_run(model, x), None).backward()
        imp.accumulate_grad(model, consume=True)


# ----------------------------------------------------------------------------------------------- models
class ConvBNLinear(nn.Module):  # test_pruner / test_dependency_lenet / test_backward
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 24), nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(self.features(x), 1))))


class WideDeep(nn.Module):  # test_concat: concat of linear outputs along the last dim
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Linear(16, 1),
        )
        self.linear, self.lin2 = nn.Linear(d, 3), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return torch.sigmoid(self.lin2(torch.cat([self.linear(x), self.mlp(x)], dim=-1)))


def _conv_bn(i: int, o: int) -> list[nn.Module]:
    return [nn.Conv2d(i, o, 1), nn.BatchNorm2d(o)]


class ConcatSplit(nn.Module):  # test_concat_split
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_conv_bn(d, d), nn.GELU(), *_conv_bn(d, 2 * d))
        self.parallel_path = nn.Sequential(*_conv_bn(d, d), nn.GELU(), *_conv_bn(d, d))
        self.block2 = nn.Sequential(*_conv_bn(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x3 = self.parallel_path(x)
        x = self.block1(x)
        x1_ch = self.block2[0].in_channels - self.parallel_path[-1].num_features
        x1, x2 = torch.split(x, (x1_ch, self.block1[-1].num_features - x1_ch), 1)
        return self.block2(torch.cat([x1, x3], dim=1)) + x2


class CascadedConcat(nn.Module):  # test_cascaded_concat
    def __init__(self, d: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_conv_bn(d, d), nn.GELU(), *_conv_bn(d, d))
        self.block2 = nn.Sequential(*_conv_bn(d, 2 * d), nn.GELU(), *_conv_bn(2 * d, 2 * d))
        self.block3 = nn.Sequential(*_conv_bn(d, 3 * d))
        self.block4 = nn.Sequential(*_conv_bn(d, 6 * d))
        self.output = nn.Conv2d(12 * d, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x12 = torch.cat([self.block1(x), self.block2(x)], dim=1)
        x123 = torch.cat([x12, self.block3(x)], dim=1)
        return self.output(torch.cat([x123, self.block4(x)], dim=1))


class ReusedOnChunks(nn.Module):  # test_split
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_conv_bn(d, d), nn.GELU(), *_conv_bn(d, 4 * d))
        self.block2_1 = nn.Sequential(*_conv_bn(d, d))
        self.block2_2 = nn.Sequential(*_conv_bn(2 * d, d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.block1(x)
        c1, c2 = self.block2_1[0].in_channels, self.block2_2[0].in_channels
        x1, x2, x3 = torch.split(x, [c1, c1, c2], dim=1)
        return self.block2_1(x1), self.block2_1(x2), self.block2_2(x3)


class LinearToDeconv(nn.Module):  # test_reshape
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 256)
        self.t1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.t2 = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.final = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.lin(x)).view(-1, self.t1.in_channels, 4, 4)
        return self.final(torch.flatten(F.relu(self.t2(F.relu(self.t1(x)))), 1))


class NonFeatureDimCat(nn.Module):  # test_non_feature_dim_cat
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_conv_bn(d, d), nn.GELU(), *_conv_bn(d, d))
        self.parallel_path = nn.Sequential(*_conv_bn(d, d), nn.GELU(), *_conv_bn(d, d))
        self.conv1, self.conv2 = nn.Conv2d(d, d, 1), nn.Conv2d(d, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.block1(x), self.parallel_path(x)
        x = self.conv1(torch.cat([x1, x2], dim=2))
        x1, _ = torch.split(x, [x1.shape[2], x2.shape[2]], dim=2)
        return self.conv2(x1)


class MultiIO(nn.Module):  # test_multiple_inputs_and_outputs
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 16), nn.Linear(24, 16), nn.Linear(32, 40)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x1, x2 = F.relu(self.fc1(x1)), F.relu(self.fc2(x2))
        return x1, x2, F.relu(self.fc3(torch.cat([x1, x2], dim=1)))


class LayerScaleBlock(nn.Module):  # test_unwrapped_parameters (ConvNeXt's layer_scale)
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, d, 1), nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.norm, self.pw1, self.pw2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.layer_scale = nn.Parameter(torch.full((d, 1, 1), 0.5))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(F.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        return self.head((x + self.layer_scale * y).mean((2, 3)))


class GroupNormNet(nn.Module):  # test_regularization / GroupNorm pruning
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.n1(self.c1(x)))
        return self.fc(F.relu(self.n2(self.c2(x)) + x).mean((2, 3)))


class TokenMLP(nn.Module):  # LayerNorm on tokens (test_pruner's transformer blocks)
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed, self.norm1 = nn.Linear(8, d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.norm2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.fc2(F.gelu(self.fc1(self.norm1(x))))
        return self.head(self.norm2(x).mean(1))


class MHANet(nn.Module):  # nn.MultiheadAttention (test_pruning_fn / test_pruner)
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(F.relu(self.fc(x)).mean(1))


class DepthwiseNet(nn.Module):  # depthwise convs (MobileNet-style)
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1)
        self.dw, self.bn = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.c2, self.fc = nn.Conv2d(16, 24, 1), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(F.relu(self.bn(self.dw(self.c1(x))))).mean((2, 3)))


class GroupConvNet(nn.Module):  # grouped convs (ResNeXt-style)
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1)
        self.g, self.bn = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.c2, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(F.relu(self.bn(self.g(self.c1(x))))).mean((2, 3)))


class Scale(nn.Module):  # test_customized_layer
    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class ScalePruner(tp.pruner.BasePruningFunc):
    def prune_out_channels(self, layer: Scale, idxs: list[int]) -> Scale:
        keep = [i for i in range(layer.scale.numel()) if i not in set(idxs)]
        layer.scale = nn.Parameter(layer.scale.data[keep])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: Scale) -> int:
        return layer.scale.numel()

    get_in_channels = get_out_channels


class CustomLayerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.s, self.c2 = nn.Conv2d(3, 16, 1), Scale(16), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.s(self.c1(x))))


class UnusedParams(nn.Module):  # test_unused_parameters
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.unused = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.c1(x)))


class SingleChannel(nn.Module):  # test_single_channel_output
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 1, 1), nn.Conv2d(1, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))


class Unbind(nn.Module):  # torch.unbind over stacked projections (timm attention's q, k, v)
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.embed, self.head = nn.Linear(8, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.proj.in_features).permute(2, 0, 1, 3).unbind(0)
        return self.head(self.proj(q * k + v).mean(1))


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    make: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 1
    interactive: bool = False
    pruner_class: type = tp.pruner.MetaPruner
    check: Callable[[nn.Module], None] | None = None


def _cascaded_halves(m: CascadedConcat) -> None:
    assert [m.block1[0].out_channels, m.block2[0].out_channels, m.block3[0].out_channels,
            m.block4[0].out_channels] == [5, 10, 15, 30]


def _split_consistent(m: ReusedOnChunks) -> None:
    assert m.block1[3].out_channels == 2 * m.block2_1[0].in_channels + m.block2_2[0].in_channels < 32


def _reshape_consistent(m: LinearToDeconv) -> None:
    assert m.lin.out_features == 16 * m.t1.in_channels and m.t1.out_channels < 8


def _depthwise_coupled(m: DepthwiseNet) -> None:
    assert m.c1.out_channels == m.dw.out_channels == m.dw.groups == m.c2.in_channels < 16


def _groups_kept(m: GroupConvNet) -> None:
    assert m.g.groups == 4 and m.g.in_channels % 4 == 0 and m.g.out_channels % 4 == 0 and m.g.out_channels < 16


def _mha_consistent(m: MHANet) -> None:
    assert m.attn.embed_dim % m.attn.num_heads == 0 and m.attn.embed_dim == m.embed.out_features < 16


def _custom_pruned(m: CustomLayerNet) -> None:
    assert m.s.scale.numel() == m.c1.out_channels == m.c2.in_channels < 16


def _gn_consistent(m: GroupNormNet) -> None:
    assert m.n1.num_channels == m.c1.out_channels == m.n2.num_channels < 16
    assert m.n1.num_channels % m.n1.num_groups == 0


def _unbind_consistent(m: Unbind) -> None:
    assert m.qkv.out_features == 3 * m.proj.in_features < 48


def _layer_scale_pruned(m: LayerScaleBlock) -> None:
    assert m.layer_scale.shape[0] == m.stem.out_channels == m.norm.normalized_shape[0] < 16


CASES: dict[str, Case] = {
    "test_pruner-local": Case(ConvBNLinear, lambda: torch.randn(2, 3, 8, 8)),
    "test_pruner-global": Case(ConvBNLinear, lambda: torch.randn(2, 3, 8, 8), {"global_pruning": True}),
    "test_backward-iterative": Case(ConvBNLinear, lambda: torch.randn(2, 3, 8, 8), {"iterative_steps": 3}, steps=3),
    "test_concat-linear-iterative": Case(WideDeep, lambda: torch.randn(4, 16), {"iterative_steps": 5}, steps=5),
    "test_concat_split-interactive": Case(ConcatSplit, lambda: torch.randn(1, 8, 5, 5), interactive=True),
    "test_cascaded_concat": Case(
        CascadedConcat, lambda: torch.randn(1, 10, 5, 5), {"iterative_steps": 5}, steps=5, interactive=True,
        check=_cascaded_halves,
    ),
    "test_split-reused-chunks": Case(ReusedOnChunks, lambda: torch.randn(1, 8, 4, 4), interactive=True,
                                     check=_split_consistent),
    "test_reshape-iterative": Case(
        LinearToDeconv, lambda: torch.randn(1, 16),
        {"iterative_steps": 5, "root_module_types": [nn.ConvTranspose2d, nn.Linear]}, steps=5,
        check=_reshape_consistent,
    ),
    "test_non_feature_dim_cat": Case(NonFeatureDimCat, lambda: torch.randn(1, 16, 4, 4)),
    "test_unwrapped_parameters": Case(LayerScaleBlock, lambda: torch.randn(2, 3, 6, 6), check=_layer_scale_pruned),
    "groupnorm-GroupNormPruner": Case(GroupNormNet, lambda: torch.randn(2, 3, 6, 6),
                                      pruner_class=tp.pruner.GroupNormPruner, check=_gn_consistent),
    "layernorm-tokens": Case(TokenMLP, lambda: torch.randn(2, 5, 8)),
    "multihead-attention": Case(MHANet, lambda: torch.randn(2, 5, 8), check=_mha_consistent),
    "depthwise-conv": Case(DepthwiseNet, lambda: torch.randn(2, 3, 6, 6), check=_depthwise_coupled),
    "group-conv": Case(GroupConvNet, lambda: torch.randn(2, 3, 6, 6), check=_groups_kept),
    "test_customized_layer": Case(
        CustomLayerNet, lambda: torch.randn(2, 3, 6, 6), {"customized_pruners": {Scale: ScalePruner()}},
        check=_custom_pruned,
    ),
    "test_unused_parameters": Case(UnusedParams, lambda: torch.randn(2, 3, 6, 6)),
    "test_single_channel_output": Case(SingleChannel, lambda: torch.randn(2, 3, 6, 6)),
    "test_isomorphic": Case(
        ConvBNLinear, lambda: torch.randn(2, 3, 8, 8), {"global_pruning": True, "isomorphic": True}
    ),
    "unbind-qkv": Case(Unbind, lambda: torch.randn(2, 5, 8), check=_unbind_consistent),
    "test_regularization-BNScalePruner": Case(ConvBNLinear, lambda: torch.randn(2, 3, 8, 8),
                                              pruner_class=tp.pruner.BNScalePruner),
    "test_regularization-GrowingRegPruner": Case(ConvBNLinear, lambda: torch.randn(2, 3, 8, 8),
                                                 pruner_class=tp.pruner.GrowingRegPruner),
}


def _prune_case(case: Case) -> tuple[nn.Module, nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = case.make().eval()
    dense = copy.deepcopy(model)
    x = case.inputs()
    imp = OrthoRegImportance()
    _feed(imp, model, x)
    pruner = build_pruner(model, x, importance=imp, pruner_class=case.pruner_class, pruning_ratio=0.5, **case.kwargs)
    if case.pruner_class is not tp.pruner.MetaPruner:
        _loss(_run(model, x), None).backward()
        pruner.regularize(model)
    ref = [o.shape for o in _outputs(_run(dense, x))]
    for _ in range(case.steps):
        if case.interactive:
            for group in pruner.step(interactive=True):
                group.prune()
        else:
            pruner.step()
        assert [o.shape for o in _outputs(_run(model, x))] == ref
        _feed(imp, model, x)  # the next step scores the pruned shapes
    return model, dense, x, pruner


@pytest.mark.parametrize("name", list(CASES))
def test_host_suite_case(name: str) -> None:
    case = CASES[name]
    model, dense, x, _ = _prune_case(case)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(model) < params(dense)
    assert all(torch.isfinite(o).all() for o in _outputs(_run(model, x)))
    if case.check is not None:
        case.check(model)
    loss = _loss(_run(model, x), None)  # test_backward: the pruned model trains
    loss.backward()
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())


def test_pruning_history_replays() -> None:  # test_load / test_serialization
    model, dense, x, pruner = _prune_case(CASES["test_concat_split-interactive"])
    replay = build_pruner(dense, x, importance=tp.importance.RandomImportance(), pruning_ratio=0.0)
    replay.DG.load_pruning_history(pruner.pruning_history())
    dense.load_state_dict(model.state_dict())
    assert torch.allclose(dense(x), model(x))


def test_get_pruning_group_on_multiple_inputs() -> None:  # test_multiple_inputs_and_outputs, DG level
    model = MultiIO()
    x = {"x1": torch.randn(1, 32), "x2": torch.randn(1, 24)}
    pruner = build_pruner(model, x, importance=tp.importance.RandomImportance(), ignored_layers=[model.fc3])
    group = pruner.DG.get_pruning_group(model.fc3, tp.prune_linear_in_channels, idxs=[0, 2, 4, 20])
    group.prune()
    assert model.fc1.out_features == 13 and model.fc2.out_features == 15 and model.fc3.in_features == 28
    assert [o.shape[1] for o in model(**x)] == [13, 15, 40]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "regnet_x_400mf",
                                  "efficientnet_b0", "shufflenet_v2_x0_5", "googlenet"])
def test_torchvision_models(arch: str) -> None:  # test_pruner / test_interactive_pruner over torchvision
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    imp = OrthoRegImportance()
    _feed(imp, model, x)
    before = sum(p.numel() for p in model.parameters())
    pruner = build_pruner(model, x, importance=imp, pruning_ratio=0.3, global_pruning=True)
    for group in pruner.step(interactive=True):
        group.prune()
    assert model(x).shape == (1, 10)
    assert sum(p.numel() for p in model.parameters()) < before
