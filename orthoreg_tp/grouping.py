"""Which parameter entries a torch-pruning group removes with each channel.

A *slice rule* tells, for one layer and one direction (output or input channels), which parameters lose
entries when a channel goes and how to sum a parameter-shaped tensor over each channel's entries::

    rule(layer, is_out) -> [(param, per_channel), ...]

``per_channel(t)`` maps a tensor shaped like ``param`` to a 1-D tensor with one sum per channel of the layer
(length = the layer's channel count in that direction). Importances multiply parameters by statistics
element-wise (``theta * g``), then use these sums; :func:`channel_sums` maps them to a group's root channels.

Rules are registered per torch-pruning pruner class (``BasePruningFunc`` subclasses), so adapters can teach the
importances about custom pruners with :func:`register_param_slices` without touching this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from . import _compat

PerChannel = Callable[[Tensor], Tensor]
SliceRule = Callable[[Any, bool], list[tuple[Tensor, PerChannel]]]

_RULES: dict[type, SliceRule] = {}


def register_param_slices(pruner_cls: type, rule: SliceRule) -> None:
    """Register how a torch-pruning pruner class removes parameter entries per channel.

    Args:
        pruner_cls: A ``tp.pruner.function.BasePruningFunc`` subclass (the class of ``dep.handler.__self__``).
        rule: ``rule(layer, is_out) -> [(param, per_channel)]``; ``per_channel(t)`` sums a parameter-shaped
            tensor over each channel's entries and returns one value per channel of ``layer``.

    Example:
        >>> class ScalePruner(tp.pruner.function.BasePruningFunc): ...
        >>> register_param_slices(ScalePruner, lambda layer, is_out: [(layer.scale, along(0))])
    """
    if not isinstance(pruner_cls, type):
        raise TypeError(f"pruner_cls must be a class, got {pruner_cls!r}")
    _RULES[pruner_cls] = rule


def along(dim: int) -> PerChannel:
    """A ``per_channel`` that sums every entry of each index along ``dim``.

    Example:
        >>> along(1)(torch.ones(2, 3, 4))
        tensor([8., 8., 8.])
    """

    def per_channel(t: Tensor) -> Tensor:
        return t.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)

    return per_channel


def _conv_rule(layer: nn.Module, is_out: bool) -> list[tuple[Tensor, PerChannel]]:
    g = layer.groups
    w = layer.weight
    rules: list[tuple[Tensor, PerChannel]] = []
    if layer.transposed:
        # weight [C_in, C_out/g, *k]
        if is_out:
            ipg, opg = w.shape[0] // g, w.shape[1]
            rules.append((w, lambda t: t.reshape(g, ipg, opg, -1).sum((1, 3)).reshape(-1)))
        else:
            rules.append((w, along(0)))
    else:
        # weight [C_out, C_in/g, *k]
        if is_out:
            rules.append((w, along(0)))
        elif g == 1:
            rules.append((w, along(1)))
        else:
            opg, ipg = w.shape[0] // g, w.shape[1]
            rules.append((w, lambda t: t.reshape(g, opg, ipg, -1).sum((1, 3)).reshape(-1)))
    if is_out and layer.bias is not None:
        rules.append((layer.bias, along(0)))
    return rules


def _depthwise_rule(layer: nn.Module, is_out: bool) -> list[tuple[Tensor, PerChannel]]:
    rules = [(layer.weight, along(0))]
    if layer.bias is not None:
        rules.append((layer.bias, along(0)))
    return rules


def _linear_rule(layer: nn.Module, is_out: bool) -> list[tuple[Tensor, PerChannel]]:
    if not is_out:
        return [(layer.weight, along(1))]
    rules = [(layer.weight, along(0))]
    if layer.bias is not None:
        rules.append((layer.bias, along(0)))
    return rules


def _affine_rule(layer: nn.Module, is_out: bool) -> list[tuple[Tensor, PerChannel]]:
    weight = getattr(layer, "weight", None)
    bias = getattr(layer, "bias", None)
    return [(p, along(0)) for p in (weight, bias) if isinstance(p, Tensor) and p.dim() == 1]


def _layernorm_rule(layer: nn.Module, is_out: bool) -> list[tuple[Tensor, PerChannel]]:
    if not layer.elementwise_affine:
        return []
    return [(p, along(-1)) for p in (layer.weight, layer.bias) if p is not None]


def _prelu_rule(layer: nn.Module, is_out: bool) -> list[tuple[Tensor, PerChannel]]:
    return [(layer.weight, along(0))] if layer.num_parameters > 1 else []


def _embedding_rule(layer: nn.Module, is_out: bool) -> list[tuple[Tensor, PerChannel]]:
    return [(layer.weight, along(1))]


def _mha_rule(layer: nn.MultiheadAttention, is_out: bool) -> list[tuple[Tensor, PerChannel]]:
    e = layer.embed_dim
    rules: list[tuple[Tensor, PerChannel]] = []

    def rows_and_cols(t: Tensor) -> Tensor:
        # rows c, c+E, c+2E and column c of the fused [3E, E] projection, the shared entries counted once
        rows = t.reshape(3, e, e)
        overlap = torch.diagonal(rows, dim1=1, dim2=2).sum(0)
        return rows.sum((0, 2)) + t.sum(0) - overlap

    if layer.in_proj_weight is not None:
        rules.append((layer.in_proj_weight, rows_and_cols))
    for p in (layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight):
        if p is not None:
            rules.append((p, along(0)))
    if layer.in_proj_bias is not None:
        rules.append((layer.in_proj_bias, lambda t: t.reshape(3, e).sum(0)))
    for p in (layer.bias_k, layer.bias_v):
        if p is not None:
            rules.append((p, along(2)))
    out = layer.out_proj

    def out_rows_and_cols(t: Tensor) -> Tensor:
        return t.sum(1) + t.sum(0) - torch.diagonal(t)

    rules.append((out.weight, out_rows_and_cols))
    if out.bias is not None:
        rules.append((out.bias, along(0)))
    return rules


_fn = tp.pruner.function
for _cls, _rule in (
    (_fn.ConvPruner, _conv_rule),
    (_fn.DepthwiseConvPruner, _depthwise_rule),
    (_fn.LinearPruner, _linear_rule),
    (_fn.BatchnormPruner, _affine_rule),
    (_fn.GroupNormPruner, _affine_rule),
    (_fn.InstanceNormPruner, _affine_rule),
    (_fn.LayernormPruner, _layernorm_rule),
    (_fn.PReLUPruner, _prelu_rule),
    (_fn.EmbeddingPruner, _embedding_rule),
    (_fn.MultiheadAttentionPruner, _mha_rule),
):
    register_param_slices(_cls, _rule)


def _rule_for(pruner: Any) -> SliceRule | None:
    for cls in type(pruner).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def item_slices(dep: Any) -> tuple[list[tuple[Tensor, PerChannel]], bool]:
    """Parameter slices removed by one group item, and whether a rule was known for its handler.

    Args:
        dep: A torch-pruning ``Dependency`` (``group[i].dep``).

    Returns:
        ``(slices, known)``; ``known`` is false for handlers without a registered rule (nothing is scored).
    """
    layer = dep.layer
    if isinstance(layer, nn.Parameter) or isinstance(_compat.handler_pruner(dep.handler), _fn.ParameterPruner):
        return [(layer, along(_compat.target_pruning_dim(dep)))], True
    rule = _rule_for(_compat.handler_pruner(dep.handler))
    if rule is None:
        # parameter-free ops (torch-pruning's element-wise, reshape, concat, ... nodes) remove nothing
        has_params = isinstance(layer, nn.Module) and any(True for _ in layer.parameters(recurse=False))
        return [], not has_params
    return rule(layer, _compat.handler_direction(dep.handler)), True


def is_producer(dep: Any) -> bool:
    """Whether a group item removes a conv/linear layer's own filters (output channels)."""
    layer = dep.layer
    return isinstance(layer, nn.modules.conv._ConvNd | nn.Linear) and _compat.handler_direction(dep.handler)


def iter_group(group: Any, *, producers_only: bool = False) -> Iterator[tuple[Any, Tensor, Tensor, Tensor, PerChannel]]:
    """Walk a group's distinct parameter slices.

    Yields ``(dep, layer_idxs, root_idxs, param, per_channel)`` once per (parameter, handler) pair, skipping
    items whose root indices torch-pruning could not map. Out-of-range layer indices (seen on timm models
    around reshape/unbind) are dropped with a warning.

    Args:
        group: A torch-pruning ``Group``.
        producers_only: Keep only conv/linear output-channel items (the paper's "filter" scope).
    """
    seen: set[tuple[int, str]] = set()
    for i, (dep, idxs) in enumerate(group):
        root = _compat.root_indices(group, i)
        if root is None or len(idxs) == 0:
            continue
        if producers_only and not is_producer(dep):
            continue
        slices, known = item_slices(dep)
        if not known:
            _warn_once(
                f"no slice rule for handler {dep.handler!r} of {type(dep.layer).__name__}; "
                "its parameters do not contribute to the score (register one with register_param_slices)"
            )
            continue
        handler = getattr(dep.handler, "__name__", repr(dep.handler))
        for param, per_channel in slices:
            key = (id(param), handler)
            if key in seen:
                continue
            seen.add(key)
            yield (
                dep,
                torch.as_tensor(list(idxs), dtype=torch.long),
                torch.as_tensor(root),
                param,
                per_channel,
            )


def scatter_channel_sums(
    scores: Tensor, sums: Tensor, layer_idxs: Tensor, root_idxs: Tensor, *, where: str = ""
) -> None:
    """``scores[root] += sums[layer_idx]`` for each pair, dropping out-of-range layer indices (with a warning)."""
    layer_idxs = layer_idxs.to(sums.device)
    root_idxs = root_idxs.to(scores.device)
    valid = (layer_idxs >= 0) & (layer_idxs < sums.numel()) & (root_idxs >= 0) & (root_idxs < scores.numel())
    if not bool(valid.all()):
        _warn_once(
            f"torch-pruning passed {int((~valid).sum())} out-of-range channel indices for {where}; they were skipped"
        )
        layer_idxs, root_idxs = layer_idxs[valid], root_idxs[valid]
    scores.index_add_(0, root_idxs, sums[layer_idxs].to(scores.dtype))


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)
