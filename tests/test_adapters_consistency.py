"""Function preservation on BatchNorm CNNs: pruning == zeroing what the removed channels feed.

For every group the pruner removes, the consumers of the removed channels (conv/linear input slices, mapped
back to original coordinates through concatenations) are zeroed in an unpruned copy. The removed channels
then contribute nothing anywhere else (BN, activations, depthwise convs, residual adds, SE gates and pooling
are channel-local), so the pruned model must compute the same outputs as the zeroed copy.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from orthoreg_tp.adapters import build_pruner, prepare
from orthoreg_tp.adapters.libraries.timm_models import SelectiveKernelAttnPruner
from torchvision.models import densenet, resnet

_CONSUMER_FNS = {tp.prune_conv_in_channels, tp.prune_linear_in_channels}
# Custom pruners whose input channels are read by one conv inside the pruned module: {pruner class: its name}.
_CUSTOM_CONSUMERS = {SelectiveKernelAttnPruner: "fc_reduce"}


def _consumer(dep: object) -> nn.Module | None:
    """The conv/linear whose input columns ``dep`` removes, or ``None``."""
    layer, handler = dep.target.module, dep.handler
    owner = type(getattr(handler, "__self__", None))
    if owner in _CUSTOM_CONSUMERS and getattr(handler, "__name__", "") == "prune_in_channels":
        return layer.get_submodule(_CUSTOM_CONSUMERS[owner])
    if handler in _CONSUMER_FNS and isinstance(layer, (nn.Conv2d, nn.Linear)):
        return layer
    return None


def _small_resnext() -> nn.Module:
    return resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10)


def _small_densenet() -> nn.Module:
    return densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10)


def _small_vgg() -> nn.Module:
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))
    return model


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), 32),
    "resnext-grouped": (_small_resnext, 32),
    "regnetx_002-grouped": (lambda: timm.create_model("regnetx_002", pretrained=False, num_classes=10), 32),
    "mobilenet_v2-depthwise": (lambda: torchvision.models.mobilenet_v2(weights=None, width_mult=0.5), 32),
    "mobilenet_v3_small-se": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), 32),
    "efficientnet-se": (lambda: timm.create_model("test_efficientnet", pretrained=False), 32),
    "densenet-concat": (_small_densenet, 32),
    "vgg11_bn-flatten": (_small_vgg, 32),
}


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so that zeroing really matters."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def _prune_recording(model: nn.Module, x: torch.Tensor, ratio: float) -> dict[str, list[int]]:
    """Prune ``model`` through the spec; return the removed input channels of every consumer (original idxs)."""
    names = {m: n for n, m in model.named_modules()}
    alive = {n: None for n in names.values()}
    removed: dict[str, list[int]] = {}
    spec = prepare(model, x)
    pruner = build_pruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(), spec=spec, pruning_ratio=ratio
    )
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            layer = _consumer(dep)
            if layer is None:
                continue
            name = names[layer]
            width = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
            current = alive[name] if alive[name] is not None else list(range(width))
            drop = set(idxs)
            removed.setdefault(name, []).extend(current[i] for i in drop)
            alive[name] = [c for i, c in enumerate(current) if i not in drop]
        group.prune()
    return removed


@torch.no_grad()
def _zero_consumers(model: nn.Module, removed: dict[str, list[int]]) -> None:
    for name, idxs in removed.items():
        layer = model.get_submodule(name)
        idx = torch.tensor(sorted(set(idxs)))
        if isinstance(layer, nn.Linear):
            layer.weight[:, idx] = 0
            continue
        per_group_in = layer.in_channels // layer.groups
        per_group_out = layer.out_channels // layer.groups
        for c in idx.tolist():
            g, local = divmod(c, per_group_in)
            layer.weight[g * per_group_out : (g + 1) * per_group_out, local] = 0


@pytest.mark.parametrize("ratio", [0.5])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_equals_zeroed(name: str, ratio: float) -> None:
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, size, size)
    reference = copy.deepcopy(model)
    params_before = sum(p.numel() for p in model.parameters())

    removed = _prune_recording(model, x, ratio)
    _zero_consumers(reference, removed)

    assert removed, "nothing was pruned"
    assert sum(p.numel() for p in model.parameters()) < params_before
    model.eval()
    with torch.no_grad():
        pruned_out, zeroed_out = model(x), reference(x)
    assert pruned_out.shape == zeroed_out.shape
    torch.testing.assert_close(pruned_out, zeroed_out, rtol=1e-4, atol=1e-4)
