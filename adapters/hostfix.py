"""Scoped work-arounds for torch-pruning 1.6 bugs that stop whole architectures before any adapter can help.

Everything here touches torch-pruning internals, so it is kept in this one module, applied only inside
:func:`host_fixes` (the previous functions are put back on exit), and covered by a test that fails loudly when
the patched names disappear.

- ``index_mapping.update_reshape_index_mapping`` guesses "flatten" mappings from inferred channel counts. On
  channels-last tensors (Swin, MaxViT, CoAtNet windows) the guesses are wrong and chain, each one multiplying
  the index lists by its stride: tens of GB and minutes inside ``get_all_groups``. It also divides by a
  channel count of 0 (ShuffleNet's ``channel_shuffle``). The strict replacement installs a mapping only for a
  real NCHW flatten: a 4-D input whose dim 1 is the producer's channel count, flattened into exactly
  ``C * H * W`` consumer channels. Anything else keeps the identity mapping, as torch-pruning already does for
  every reshape it cannot infer; adapters and the forward check catch what that leaves coupled wrongly.
- ``_ConcatIndexMapping`` / ``_SplitIndexMapping`` read ``offset[1]`` even when channel inference failed and
  left a one-element offset list: IndexError while building groups. The guard maps such indices to nothing
  (the dependency is not followed); the forward check then catches any inconsistency.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from torch_pruning.dependency import index_mapping, shape_infer

__all__ = ["PATCHED", "host_fixes", "strict_reshape_index_mapping"]

#: ``(owner, attribute)`` pairs replaced by :func:`host_fixes`.
PATCHED = (
    (index_mapping, "update_reshape_index_mapping"),
    (index_mapping._ConcatIndexMapping, "__call__"),
    (index_mapping._SplitIndexMapping, "__call__"),
)


def _producer_channels(graph: Any, node: Any) -> int | None:
    for n in node.inputs:
        ch = shape_infer.infer_out_channels_recursively(graph, n, [0])
        if ch is not None:
            return ch
    return None


def _consumer_channels(graph: Any, node: Any) -> int | None:
    for n in node.outputs:
        ch = shape_infer.infer_in_channels_recursively(graph, n, [0])
        if ch is not None:
            return ch
    return None


def strict_reshape_index_mapping(graph: Any, node: Any) -> None:
    """Map indices through a reshape only when it is a real NCHW flatten (see the module docstring)."""
    size = getattr(node.grad_fn, "_saved_self_sizes", None)
    if size is None or len(size) != 4:
        return
    channels, spatial = size[1], size[2] * size[3]
    if spatial <= 1 or _producer_channels(graph, node) != channels:
        return
    if _consumer_channels(graph, node) != channels * spatial:
        return
    for in_node in node.inputs:
        for dep in node.dependencies:
            if dep.target == in_node:
                dep.index_mapping[0] = index_mapping._FlattenIndexMapping(stride=spatial, reverse=True)
        for dep in in_node.dependencies:
            if dep.target == node:
                dep.index_mapping[0] = index_mapping._FlattenIndexMapping(stride=spatial, reverse=False)


def _guard_offsets(call: Any) -> Any:
    @functools.wraps(call)
    def wrapper(self: Any, idxs: Any) -> Any:
        if self.offset is None or len(self.offset) < 2:
            return []  # channel inference failed for this concat/split: do not follow the dependency
        return call(self, idxs)

    return wrapper


@contextlib.contextmanager
def host_fixes() -> Iterator[None]:
    """Apply the torch-pruning work-arounds for the duration of a ``with`` block (not thread-safe).

    :func:`~orthoreg_tp.adapters.prune` uses it; wrap your own pruner construction and ``step()`` in it when
    you drive torch-pruning yourself.

    Example:
        >>> import torch, torchvision, torch_pruning as tp
        >>> from orthoreg_tp.adapters import host_fixes, prepare
        >>> model, x = torchvision.models.shufflenet_v2_x0_5(weights=None), torch.randn(1, 3, 64, 64)
        >>> spec = prepare(model, x)
        >>> with host_fixes():
        ...     pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
        ...                                   pruning_ratio=0.5, **spec.pruner_kwargs())
        ...     pruner.step()
        >>> spec.finalize(model, pruner)
    """
    saved = [(owner, name, owner.__dict__[name]) for owner, name in PATCHED]
    index_mapping.update_reshape_index_mapping = strict_reshape_index_mapping
    for owner in (index_mapping._ConcatIndexMapping, index_mapping._SplitIndexMapping):
        owner.__call__ = _guard_offsets(owner.__dict__["__call__"])
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
