"""prepare()/prune() contracts: argument errors, rollback, budgets, the spec, registries, the manual flow."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from orthoreg_tp.adapters import (
    Fixup,
    PruneReport,
    PruningError,
    PruningSpec,
    SpecPart,
    build_pruner,
    prepare,
    prune,
    register_module_adapter,
)


def _resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval(), torch.randn(2, 3, 32, 32)


def _imp() -> tp.importance.Importance:
    return tp.importance.GroupMagnitudeImportance()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, True, "0.5"])
def test_ratio_outside_unit_interval_is_rejected(ratio: object) -> None:
    model, x = _resnet()
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        prune(model, x, importance=_imp(), ratio=ratio)


@pytest.mark.parametrize("target", [("flops", 0.5), ("energy", 0.3)])
def test_unknown_target_kind_is_rejected(target: tuple) -> None:
    model, x = _resnet()
    with pytest.raises(ValueError, match="unknown target kind"):
        prune(model, x, importance=_imp(), target=target)


@pytest.mark.parametrize("target", [("macs", 0.0), ("params", 1.5), ("macs",), "macs"])
def test_malformed_target_is_rejected(target: object) -> None:
    model, x = _resnet()
    with pytest.raises(ValueError, match="target"):
        prune(model, x, importance=_imp(), target=target)


def test_ratio_and_target_are_exclusive() -> None:
    model, x = _resnet()
    with pytest.raises(ValueError, match="exactly one of ratio= or target="):
        prune(model, x, importance=_imp(), ratio=0.5, target=("macs", 0.5))
    with pytest.raises(ValueError, match="exactly one of ratio= or target="):
        prune(model, x, importance=_imp())


def test_pruning_ratio_kwarg_is_rejected() -> None:
    model, x = _resnet()
    with pytest.raises(ValueError, match="pruning_ratio"):
        prune(model, x, importance=_imp(), ratio=0.5, pruning_ratio=0.3)


@pytest.mark.parametrize("shape", [(2, 5, 32, 32), (2, 3, 32), (3, 32, 32, 2, 1)])
def test_wrong_input_shape_is_a_value_error(shape: tuple) -> None:
    model, _ = _resnet()
    before = _state(model)
    with pytest.raises(ValueError, match=r"example_inputs of shape .* do not run through ResNet"):
        prune(model, torch.randn(*shape), importance=_imp(), ratio=0.5)
    with pytest.raises(ValueError, match="do not run through ResNet"):
        prepare(model, torch.randn(*shape))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ rollback
def _failing(module: nn.Module, ctx: object) -> None:
    module.some_attribute = 1  # a partial edit before failing must be rolled back too
    raise RuntimeError("deliberate failure")


def test_failing_fixup_rolls_back_state_and_output() -> None:
    model, x = _resnet()
    with torch.no_grad():
        out_before = model(x)
    state_before = _state(model)
    params_before = [id(p) for p in model.parameters()]
    spec = prepare(model, x)
    broken = dataclasses.replace(spec, fixups=spec.fixups + (Fixup("layer2.0", "deliberate", _failing),))

    with pytest.raises(PruningError, match=r"ResNet .*layer2\.0.*deliberate failure") as info:
        prune(model, x, importance=_imp(), ratio=0.5, spec=broken)

    assert info.value.model_class == "ResNet" and info.value.layer == "layer2.0"
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    assert [id(p) for p in model.parameters()] == params_before  # same objects, restored in place
    assert not hasattr(model.layer2[0], "some_attribute")
    assert model.layer1[0].conv1.out_channels == 64
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_before, rtol=0, atol=0)


class _HardCodedWidth(nn.Module):
    """Reshapes with a width fixed at construction: pruning its input breaks the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).mean((2, 3))
        return self.fc(y.view(-1, 16))


def test_verification_failure_rolls_back_and_names_the_layer() -> None:
    torch.manual_seed(0)
    model, x = _HardCodedWidth().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out_before = model(x)
    state_before = _state(model)
    with pytest.raises(PruningError, match=r"pruning _HardCodedWidth failed.*RuntimeError") as info:
        prune(model, x, importance=_imp(), ratio=0.5, max_repairs=0)
    assert "forward failed" in info.value.reason
    assert all(torch.equal(state_before[k], v) for k, v in model.state_dict().items())
    assert model.conv.out_channels == 16
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_before, rtol=0, atol=0)


def test_repair_freezes_the_failing_block_and_reports_it() -> None:
    torch.manual_seed(0)
    hard = _HardCodedWidth.__new__(_HardCodedWidth)
    nn.Module.__init__(hard)
    hard.conv, hard.bn, hard.fc = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), hard).eval()
    x = torch.randn(2, 3, 12, 12)
    with pytest.warns(UserWarning, match="kept 1 block"):
        report = prune(model, x, importance=_imp(), ratio=0.5)
    assert any(entry.startswith("4:") for entry in report.frozen), report.frozen
    assert model[0].out_channels == 4  # pruned
    assert model[2].out_channels == 8 and hard.conv.out_channels == 16  # the block and what it reads: kept
    assert model(x).shape == (2, 4)


# ------------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("kind", ["macs", "params"])
def test_target_budget_within_five_percent(kind: str) -> None:
    model, x = _resnet()
    report = prune(model, x, importance=_imp(), target=(kind, 0.5))
    kept = report.macs_fraction if kind == "macs" else report.params_fraction
    assert abs(kept - 0.5) <= 0.05 * 0.5, report.trials
    assert report.target == (kind, 0.5)
    assert report.trials and report.trials[-1][0] == pytest.approx(report.ratio)
    assert model(x).shape == (2, 10)


def test_unreachable_budget_restores_the_model() -> None:
    model, x = _resnet()
    state_before = _state(model)
    with pytest.raises(PruningError, match="could not reach the macs budget"):
        prune(model, x, importance=_imp(), target=("macs", 0.01), max_ratio=0.3)
    assert all(torch.equal(state_before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ report
def test_report_and_preserved_flags() -> None:
    model, x = _resnet()
    model.train()
    model.conv1.weight.requires_grad_(False)
    report = prune(model, x, importance=_imp(), ratio=0.5)
    assert isinstance(report, PruneReport)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert report.widths["layer1.0.conv1"] == (64, model.layer1[0].conv1.out_channels)
    assert report.widths["fc"] == (10, 10)
    assert report.seconds > 0 and report.ratio == 0.5 and report.source == "torchvision"
    assert model.training and model.layer1[0].bn1.training
    assert not model.conv1.weight.requires_grad and model.layer1[0].conv1.weight.requires_grad
    as_dict = report.to_dict()
    assert as_dict["params_fraction"] == pytest.approx(report.params_fraction)
    assert "ResNet: params" in str(report)


def test_ratio_zero_is_a_verified_no_op() -> None:
    model, x = _resnet()
    report = prune(model, x, importance=_imp(), ratio=0.0)
    assert report.params_after == report.params_before


# ------------------------------------------------------------------------------------------------ spec
def test_spec_is_frozen_and_hands_out_fresh_kwargs() -> None:
    model, x = _resnet()
    spec = prepare(model, x)
    assert isinstance(spec, PruningSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.round_to = 4  # type: ignore[misc]
    a, b = spec.pruner_kwargs(), spec.pruner_kwargs()
    assert a["ignored_layers"] is not b["ignored_layers"] and a["num_heads"] is not b["num_heads"]
    assert any(m is model.fc for m in spec.ignored_layers)
    assert spec.source == "torchvision" and spec.model_class == "ResNet"


def test_timm_vit_spec_registers_every_qkv_and_the_classifier() -> None:
    model = timm.create_model("test_vit", pretrained=False).eval()
    spec = prepare(model, torch.randn(1, 3, 64, 64))
    qkvs = [blk.attn.qkv for blk in model.blocks]
    assert set(map(id, spec.num_heads)) == set(map(id, qkvs))
    assert all(spec.num_heads[q] == blk.attn.num_heads for q, blk in zip(qkvs, model.blocks))
    assert any(m is model.get_classifier() for m in spec.ignored_layers)
    dims = {id(p): d for p, d in spec.unwrapped_parameters}
    assert dims[id(model.cls_token)] == 2 and dims[id(model.pos_embed)] == 2
    assert spec.source == "timm" and not spec.unhandled


def test_manual_pruner_path_with_finalize() -> None:
    model = timm.create_model("test_vit", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    spec = prepare(model, x)
    pruner = build_pruner(model, x, importance=_imp(), spec=spec, pruning_ratio=0.5)
    pruner.step()  # the spec's fix-ups run at the end of the step
    attn = model.blocks[0].attn
    assert attn.num_heads * attn.head_dim * 3 == attn.qkv.out_features
    assert model(x).shape == (1, model.num_classes)


class _Gate(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def test_registered_module_adapter_is_used() -> None:
    seen: list[str] = []

    @register_module_adapter(_Gate)
    def _gate(module: nn.Module, name: str, ctx: object) -> SpecPart:
        seen.append(name)
        return SpecPart(unwrapped_parameters=[(module.gamma, 0)], handled={id(module)}, notes=["gate"])

    model = nn.Sequential(nn.Conv2d(3, 8, 3), _Gate(8), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    spec = prepare(model, x)
    assert seen == ["1"] and "gate" in spec.notes
    assert [(p is model[1].gamma, d) for p, d in spec.unwrapped_parameters] == [(True, 0)]
    prune(model, x, importance=_imp(), ratio=0.5, spec=spec)
    assert model[1].gamma.shape[0] == model[0].out_channels == 4


class _OddAttention(nn.Module):
    def __init__(self, dim: int = 16, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def test_generic_adapter_reports_unknown_attention() -> None:
    model = nn.Sequential(nn.Linear(8, 16), _OddAttention(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 8)
    spec = prepare(model, x)
    assert spec.source == "generic"
    assert any(u.startswith("1 (_OddAttention)") for u in spec.unhandled)
    assert any(m is model[1].qkv for m in spec.ignored_layers)  # head layout kept
    assert not any(m is model[1].proj for m in spec.ignored_layers)
    report = prune(model, x, importance=_imp(), ratio=0.5)
    assert model[1].qkv.out_features == 48 and model[0].out_features < 16
    assert report.frozen == ()


class _SharedPosAttention(_OddAttention):
    """An attention holding a position encoding shared with the other blocks (CoaT's per-stage encoding)."""

    def __init__(self, pos: nn.Module) -> None:
        super().__init__()
        self.pos = pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.pos(x))


def test_generic_adapter_detects_every_block_sharing_a_submodule() -> None:
    pos = nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(8, 16), *(_SharedPosAttention(pos) for _ in range(3)), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 8)
    spec = prepare(model, x)
    assert sorted(u.split(" ")[0] for u in spec.unhandled) == ["1", "2", "3"]
    assert all(any(m is model[i].qkv for m in spec.ignored_layers) for i in (1, 2, 3))
    report = prune(model, x, importance=_imp(), ratio=0.5)
    assert report.frozen == () and all(model[i].qkv.out_features == 48 for i in (1, 2, 3))


# ------------------------------------------------------------------------------------------- reference forward
def test_out_of_memory_in_the_reference_forward_is_not_called_bad_inputs():
    class Hungry(nn.Module):
        def forward(self, x):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    with pytest.raises(RuntimeError, match="can't allocate memory"):
        prepare(Hungry(), torch.randn(1, 3, 8, 8))
