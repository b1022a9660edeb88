"""The toolbox's access to torch-pruning internals (tested against 1.6.x).

The private pieces the toolbox relies on (handler directions, root indices, ranked groups, channel counts) go
through here, so a torch-pruning upgrade breaks one module and ``tests/test_compat.py`` fails loudly instead of
scores silently going wrong. The adapters' robust dependency graph (``adapters/_internal/hostgraph.py``) subclasses
torch-pruning's graph and imports its internals itself; ``tests/test_adapters_graph.py`` pins their sources.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn


def handler_direction(handler: Callable[..., Any]) -> bool:
    """Whether a torch-pruning handler prunes *output* channels (``True``) or input channels (``False``).

    Handlers whose in- and out-pruning are the same function (norms, depthwise convs) count as output.
    """
    return getattr(handler, "__name__", "") != "prune_in_channels"


def handler_pruner(handler: Callable[..., Any]) -> Any:
    """The ``BasePruningFunc`` instance a bound handler belongs to (``None`` for plain functions)."""
    return getattr(handler, "__self__", None)


def root_indices(group: Any, i: int) -> list[int] | None:
    """Root channel indices of item ``i`` of a group, or ``None`` when torch-pruning could not map them."""
    root = group[i].root_idxs
    if root is None or any(r is None for r in root):
        return None
    return list(root)


def target_pruning_dim(dep: Any) -> int:
    """The pruning dim torch-pruning assigned to a dependency's target (used for unwrapped parameters)."""
    return int(getattr(dep.target, "pruning_dim", -1))


def layer_name(group: Any, layer: Any) -> str:
    """The qualified name of a layer in the group's model, falling back to its class name."""
    graph = getattr(group, "_DG", None)
    names = getattr(graph, "_module2name", {}) if graph is not None else {}
    name = names.get(layer) if isinstance(layer, nn.Module | nn.Parameter) else None
    return name if name else type(layer).__name__


def current_width(group: Any) -> int | None:
    """Current number of channels of a group's root layer in the pruned dimension."""
    graph = getattr(group, "_DG", None)
    if graph is None:
        return None
    dep = group[0].dep
    module = dep.target.module
    if graph.is_out_channel_pruning_fn(dep.handler):
        return graph.get_out_channels(module)
    return graph.get_in_channels(module)


def normalize_scores(scores: torch.Tensor, normalizer: Any) -> torch.Tensor:
    """Apply one of torch-pruning's group normalizers (``"mean"``, ``"max"``, ``"sum"``, ``"lamp"``, ...)."""
    if normalizer is None:
        return scores
    return tp.importance.GroupMagnitudeImportance._normalize(_NORMALIZER_HOST, scores, normalizer)


_NORMALIZER_HOST = tp.importance.GroupMagnitudeImportance(normalizer=None)


def prunable_channel_count(pruner: Any) -> int:
    """Total prunable channels of a pruner's model, counted exactly as torch-pruning's global ranking does.

    The sum over all groups of the root width (output or input channels, as the root prunes) divided by its
    channel groups (attention groups re-rooted as the pruner does). Comparing this number before and after
    ``pruner.step()`` gives the achieved ratio.
    """
    total = 0
    graph = pruner.DG
    for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        is_attention, _ = pruner._is_atten_group(group)
        if is_attention:
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None:
                continue
        total += (current_width(group) or 0) // pruner._get_channel_groups(group)  # input roots too
    return total


def ranked_groups(pruner: Any) -> Any:
    """Yield ``(group, channel_groups)`` for every group a pruner's next ``step()`` would rank, as it would.

    Mirrors the first pass of torch-pruning's ``_prune``: groups its ratio check admits, attention groups
    re-rooted at their downstream layer.
    """
    graph = pruner.DG
    for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        if not pruner._check_pruning_ratio(group):
            continue
        is_attention, _ = pruner._is_atten_group(group)
        if is_attention:
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None:
                continue
        yield group, pruner._get_channel_groups(group)
