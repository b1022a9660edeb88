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
- ``update_slice_index_mapping`` treats a slice along dim 1 of any 4-D tensor (dim 2 of a 3-D one) as a
  channel slice; on channels-last tensors that is a spatial subsampling (LeViT's ``Subsample``) and the
  mapping halves the channel indices. The strict version maps only when the sliced dimension has the
  producer's channel count.
- ``update_split_index_mapping`` / ``update_unbind_index_mapping`` pair the i-th consumer found while
  tracing with the i-th chunk; consumers are found in autograd order, not chunk order, so channels of one
  chunk get pruned in another (SKNet's split paths). The wrapper orders consumers by the chunk they read
  (``output_nr`` in the autograd graph); an unbind whose consumers cannot be matched to chunks is blocked
  (indices are not followed across it) instead of guessed.
- The other ``update_*_index_mapping`` functions fail on shapes they do not expect (``sum`` over a channel
  list holding ``None`` in ``update_concat_index_mapping`` on CoaT; a 5-D ``expand`` taken for Hugging Face
  grouped-query attention with ``head_dim`` 0 on HaloNet). Each is guarded: on an exception the node keeps the
  identity mapping, which is what these functions already do whenever they cannot infer a shape.
- ``DependencyGraph.get_pruning_group`` walks the graph re-adding a dependency whenever it arrives with a
  different index list, and checks membership with a linear scan: on graphs with many coupled paths
  (HaloNet, NFNet, RexNet, FocalNet, EfficientViT) the walk takes minutes or never ends. The replacement
  propagates, per (layer, handler), only indices not propagated before, and drops indices beyond a layer's
  width, or beyond the widest layer for parameter-free ops (only wrong mappings produce them). Every index
  mapping acts index by index, so the merged group it returns is the one torch-pruning would return. A walk
  that still grows past :data:`INDEX_BUDGET` entries raises :class:`GroupExplosion` naming the root layer,
  which :func:`~orthoreg_tp.adapters.prune` then freezes. Index mappings are refreshed only when a group
  was pruned since the last walk (``Group.prune`` bumps a counter), not on every walk.
- ``update_concat_index_mapping`` sizes a concat input produced by a split as the split's ``i``-th chunk,
  ``i`` being the input's discovery order, and before the split's own sizes are known (the concat node is
  usually visited first): the size is ``None``, the concat keeps the identity mapping, and channels of a
  later chunk prune the wrong consumer inputs (FasterNet's ``cat((conv(x1), x2))``). The wrapper sizes such
  inputs from the split's autograd node and the chunk the concat reads (``output_nr``).
- ``ConcatPruner`` / ``SplitPruner`` (the bookkeeping of concat/split sizes) add ``None`` sizes when channel
  inference failed (CoaT): TypeError in the pruning step. The guard skips the bookkeeping in that case.
- ``GroupNormPruner`` prunes ``layer.bias`` unconditionally; timm's ``GroupNorm1NoBias`` (PoolFormerV2) sets it
  to ``None``: AttributeError in the pruning step. ``_prune_parameter_and_grad`` passes ``None`` through.
- The index-mapping objects (``_ConcatIndexMapping``, ``_SplitIndexMapping``, ``_GQAIndexMapping``, ...)
  read ``offset[1]`` from one-element offset lists or divide by 0 when inference went wrong: IndexError or
  ZeroDivisionError while building groups. The guard maps such indices to nothing (the dependency is not
  followed); the forward check of :func:`~orthoreg_tp.adapters.prune` then catches any inconsistency.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from numbers import Number
from typing import Any

import torch.nn as nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.graph import DependencyGraph
from torch_pruning.dependency.group import Group
from torch_pruning.ops import ConcatPruner, SplitPruner
from torch_pruning.pruner import function

__all__ = ["INDEX_BUDGET", "PATCHED", "GroupExplosion", "host_fixes", "strict_reshape_index_mapping"]

_UPDATERS = ("update_expand_index_mapping",)
_MAPPINGS = tuple(
    getattr(index_mapping, name)
    for name in (
        "_FlattenIndexMapping",
        "_ConcatIndexMapping",
        "_SplitIndexMapping",
        "_GQAIndexMapping",
        "_SliceIndexMapping",
    )
)

#: ``(owner, attribute)`` pairs replaced by :func:`host_fixes`.
PATCHED = (
    (
        (index_mapping, "update_reshape_index_mapping"),
        (index_mapping, "update_slice_index_mapping"),
        (index_mapping, "update_split_index_mapping"),
        (index_mapping, "update_unbind_index_mapping"),
        (index_mapping, "update_concat_index_mapping"),
        (DependencyGraph, "get_pruning_group"),
        (function.BasePruningFunc, "_prune_parameter_and_grad"),
        (Group, "prune"),
        (ConcatPruner, "prune_out_channels"),
        (ConcatPruner, "prune_in_channels"),
        (SplitPruner, "prune_out_channels"),
        (SplitPruner, "prune_in_channels"),
    )
    + tuple((index_mapping, name) for name in _UPDATERS)
    + tuple((cls, "__call__") for cls in _MAPPINGS)
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
    size = getattr(node.grad_fn, "_saved_self_sizes", None) or getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if size is None or len(size) != 4:
        return
    channels, spatial = int(size[1]), int(size[2]) * int(size[3])
    if spatial <= 1 or _producer_channels(graph, node) != channels:
        return
    if _consumer_channels(graph, node) != channels * spatial:
        return
    for in_node in node.inputs:
        _map_edge(in_node, node, lambda reverse: index_mapping._FlattenIndexMapping(stride=spatial, reverse=reverse))


def _map_edge(src: Any, dst: Any, mapping: Callable[[bool], Any]) -> None:
    """Install ``mapping(False)`` on ``src -> dst`` dependencies and ``mapping(True)`` on ``dst -> src`` ones."""
    for a, b, reverse in ((src, dst, False), (dst, src, True)):
        for dep in a.dependencies:
            if dep.target == b:
                dep.index_mapping[0] = mapping(reverse)


#: Most (layer, index) entries one group walk may collect before :class:`GroupExplosion` is raised.
INDEX_BUDGET = 1_000_000


class GroupExplosion(RuntimeError):
    """A dependency walk kept producing new indices; ``module`` is the root it started from."""

    def __init__(self, module: Any, size: int) -> None:
        super().__init__(f"dependency group grew past {size:,} index entries (wrong index mappings)")
        self.module = module


def _max_width(graph: Any) -> int:
    cached = getattr(graph, "_orthoreg_max_width", None)
    if cached is None:
        cached = 1
        for module in graph.module2node:
            for value in (
                getattr(module, a, None)
                for a in ("in_channels", "out_channels", "in_features", "out_features", "num_features", "embed_dim")
            ):
                if isinstance(value, int):
                    cached = max(cached, value)
            if isinstance(module, nn.Parameter):
                cached = max(cached, *module.shape) if module.dim() else cached
        graph._orthoreg_max_width = cached
    return cached


def _width(graph: Any, dep: Any) -> int:
    """Channel count of a dependency's target, or the widest layer for ops without one."""
    width = None
    try:
        if graph.is_out_channel_pruning_fn(dep.handler):
            width = graph.get_out_channels(dep.target)
        elif graph.is_in_channel_pruning_fn(dep.handler):
            width = graph.get_in_channels(dep.target)
    except Exception:
        width = None
    return width if isinstance(width, int) and width > 0 else _max_width(graph)


def _edge_mappings(dep: Any) -> list[Any]:
    """The index mappings of one edge in the order to apply them.

    An edge between a concat and a split/slice feeding it carries the split/slice mapping in slot 0 and the
    concat's in slot 1. Going forward (split/slice, then concat) that order is right; going back from the
    concat it must be undone first, so reverse mappings are applied last slot first.
    """
    mappings = [m for m in dep.index_mapping if m is not None]
    if len(mappings) > 1 and all(getattr(m, "reverse", False) for m in mappings):
        mappings.reverse()
    return mappings


def convergent_get_pruning_group(self: Any, module: Any, pruning_fn: Any, idxs: Any) -> Any:
    """``DependencyGraph.get_pruning_group`` that propagates each (layer, handler, index) once."""
    if module not in self.module2node:
        raise ValueError(f"Module {module} is not in the dependency graph.")
    if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        pruning_fn = function.prune_depthwise_conv_out_channels
    if isinstance(idxs, Number):
        idxs = [idxs]
    idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
    generation = getattr(self, "_orthoreg_generation", 0)
    if getattr(self, "_orthoreg_mapped", None) != generation:  # refresh offsets only after the model changed
        index_mapping.update_index_mapping(self)
        self._orthoreg_mapped = generation

    group = Group()
    root = self.module2node[module]
    root_dep = Dependency(pruning_fn, pruning_fn, source=root, target=root)
    group.add_dep(dep=root_dep, idxs=idxs)
    propagated: dict[tuple[Any, Any], set[int]] = {(root, pruning_fn): {i.idx for i in idxs}}
    widths: dict[tuple[Any, Any], int] = {}
    total = len(idxs)
    stack = [(root_dep, idxs)]
    while stack:
        dep, dep_idxs = stack.pop()
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            new_idxs = dep_idxs
            for mapping in _edge_mappings(new_dep):
                new_idxs = mapping(new_idxs)
            if not new_idxs:
                continue
            key = (new_dep.target, new_dep.handler)
            known = propagated.setdefault(key, set())
            if key not in widths:
                widths[key] = _width(self, new_dep)
            width = widths[key]
            fresh = []
            for i in new_idxs:
                if i.idx not in known and 0 <= i.idx < width:
                    known.add(i.idx)
                    fresh.append(i)
            if fresh:
                total += len(fresh)
                if total > INDEX_BUDGET:
                    raise GroupExplosion(module, INDEX_BUDGET)
                group.add_dep(new_dep, fresh)
                stack.append((new_dep, fresh))

    merged_items: dict[tuple[Any, Any], tuple[Any, list, set]] = {}
    for dep, dep_idxs in group.items:
        if isinstance(dep.target.module, nn.Parameter) and any(dep.target.module is p for p in self.ignored_params):
            continue
        entry = merged_items.setdefault((dep.target, dep.handler), (dep, [], set()))
        for i in dep_idxs:
            if i.idx not in entry[2]:
                entry[2].add(i.idx)
                entry[1].append(i)
    merged = Group()
    for dep, dep_idxs, _ in merged_items.values():
        merged.add_dep(dep, dep_idxs)
    merged._DG = self
    for i in range(len(merged)):
        hybrid = merged[i].idxs
        merged[i] = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid))
        merged[i].root_idxs = _helpers.to_root_idxs(hybrid)
    return merged


def _counting_prune(prune: Any) -> Any:
    @functools.wraps(prune)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        graph = self._DG
        if graph is not None:
            graph._orthoreg_generation = getattr(graph, "_orthoreg_generation", 0) + 1
        return prune(self, *args, **kwargs)

    return wrapper


def _saved_dim(grad_fn: Any, ndim: int) -> int | None:
    """``grad_fn._saved_dim`` as a non-negative dim of an ``ndim``-D tensor (``None`` when absent or invalid)."""
    dim = getattr(grad_fn, "_saved_dim", None)
    if dim is None:
        return None
    dim = int(dim)
    dim = dim - 2**64 if dim >= 2**63 else dim  # negative dims are saved as unsigned
    return dim % ndim if -ndim <= dim < ndim else None


def _is_channel_slice(graph: Any, node: Any) -> bool | None:
    """Whether a slice cuts the channel dim (``None``: its autograd node saved no shape).

    A slice of a concatenation along the same dim is one (torch-pruning maps only channel concats: DPN's
    ``x[:, :c]`` of the previous block's output, whose producer width it cannot infer through the concat);
    otherwise the sliced dim must have the producer's channel count (LeViT's spatial ``x[:, ::2]`` has not).
    """
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        return None
    dim = _saved_dim(node.grad_fn, len(sizes))
    if dim is None:
        return None
    for src in node.inputs:
        if src.type == ops.OPTYPE.CONCAT and _saved_dim(src.grad_fn, len(sizes)) == dim:
            return True
    return _producer_channels(graph, node) == int(sizes[dim])


def _install_slice_mappings(node: Any) -> None:
    """Map a channel slice on the edges to its consumers, so that the slice node sees its input's channels.

    torch-pruning maps on the edge from the sliced tensor, so ``SlicePruner`` receives indices relative to the
    slice while it updates ``start``/``end`` as if they were input channels, and never hears of channels pruned
    before ``start``: after the first pruned group the slice points at the wrong channels (DPN's
    ``x[:, num_1x1_c:]`` of a concat whose first part shrank).
    """
    module = node.module
    args = {"dim": module.dim, "start": module.start, "step": module.step, "end": module.end}
    for out_node in node.outputs:
        _map_edge(node, out_node, lambda reverse: index_mapping._SliceIndexMapping(**args, reverse=reverse))


def _strict_slice(update: Any) -> Any:
    @functools.wraps(update)
    def wrapper(graph: Any, node: Any) -> Any:
        module = node.module
        if not hasattr(module, "_orthoreg_channel_slice"):  # decided once, on the unpruned shapes
            module._orthoreg_channel_slice = _is_channel_slice(graph, node)
        if module._orthoreg_channel_slice is False:
            return None  # a spatial slice of a channels-last tensor: channels pass through unchanged
        if node.enable_index_mapping and module._orthoreg_channel_slice and module.step == 1 and module.start >= 0:
            _install_slice_mappings(node)
            return None
        return update(graph, node)  # guarded by the caller (_guard_updater)

    return wrapper


def _output_nr(split_node: Any, out_node: Any) -> int | None:
    """Which output of a split/unbind ``out_node`` reads (torch-pruning assumes discovery order)."""
    for fn, nr in getattr(out_node.grad_fn, "next_functions", ()) or ():
        if fn is split_node.grad_fn:
            return int(nr)
    return None


def _set_chunk_mappings(node: Any, chunks: dict[Any, list[int] | None]) -> None:
    """Install split-style mappings between ``node`` and each consumer (``None`` offsets block the edge)."""
    for out_node, offset in chunks.items():
        offset = offset if offset is not None else [0]  # a one-element offset maps to nothing (guarded)
        _map_edge(node, out_node, lambda reverse, o=offset: index_mapping._SplitIndexMapping(offset=o, reverse=reverse))


def _channel_split_sizes(node: Any, graph: Any = None) -> list[int] | None:
    """Chunk sizes of a split along the channel dim, from the autograd node.

    The channel dim is 1 for 2-D/4-D tensors and the last one for 3-D tensors; with ``graph``, also dim 1 or
    the last dim whenever the producer has that many channels (``Conv1d`` outputs ``[B, C, L]``, MambaOut's
    channels-last ``[B, H, W, C]``).
    """
    grad_fn = node.grad_fn
    shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
    dim = getattr(grad_fn, "_saved_dim", None)
    if shape is None or dim is None:
        return None
    ndim, dim = len(shape), int(dim)
    dim = dim - 2**64 if dim >= 2**63 else dim  # negative dims are saved as unsigned
    dim = dim % ndim if ndim else 0
    other = dim in (1, ndim - 1) and graph is not None and _producer_channels(graph, node) == int(shape[dim])
    if dim != (2 if ndim == 3 else 1) and not other:
        return None
    explicit = getattr(grad_fn, "_saved_split_sizes", None)
    if explicit is not None:
        return [int(v) for v in explicit]
    step, total = getattr(grad_fn, "_saved_split_size", None), int(shape[dim])
    if not step:
        return None
    return [min(int(step), total - i) for i in range(0, total, int(step))]


def chunked_split_index_mapping(graph: Any, node: Any) -> None:
    """Split mapping by the chunk each consumer reads (``output_nr``), not by discovery order.

    Chunk sizes come from the autograd node the first time (torch-pruning's own inference reads a consumer's
    width, e.g. a concat's total, when the ``_saved_self_sizes`` attribute it looks for is missing, as on
    torch >= 2.1), then from the sizes torch-pruning's ``SplitPruner`` keeps up to date while pruning.
    """
    if node.type != ops.OPTYPE.SPLIT or not node.enable_index_mapping:
        return
    module = node.module
    if not getattr(module, "_orthoreg_sized", False):
        sizes = _channel_split_sizes(node, graph)
        if sizes is None:
            return
        module.split_sizes = sizes
        module._orthoreg_sized = True
    offsets = [0]
    for size in module.split_sizes:
        offsets.append(offsets[-1] + size)
    module.offsets = offsets
    chunks: dict[Any, list[int] | None] = {}
    for out in node.outputs:
        nr = _output_nr(node, out)
        chunks[out] = offsets[nr : nr + 2] if nr is not None and nr + 1 < len(offsets) else None
    _set_chunk_mappings(node, chunks)


def _split_chunk_size(graph: Any, split_node: Any, consumer: Any) -> int | None:
    """Width of the chunk of ``split_node`` that ``consumer`` reads (``None`` when unknown or ambiguous)."""
    reads = [nr for fn, nr in getattr(consumer.grad_fn, "next_functions", ()) or () if fn is split_node.grad_fn]
    if len(reads) != 1:
        return None
    module = split_node.module
    sizes = module.split_sizes if getattr(module, "_orthoreg_sized", False) else _channel_split_sizes(split_node, graph)
    nr = int(reads[0])
    return int(sizes[nr]) if sizes is not None and nr < len(sizes) else None


def _slice_width(graph: Any, node: Any) -> int | None:
    """Channels a channel slice keeps (``None`` when it slices another dim or the sizes are unknown)."""
    if not _is_channel_slice(graph, node):
        return None  # a spatial slice, or no saved shape
    sizes, module = node.grad_fn._saved_self_sym_sizes, node.module
    total, start = int(sizes[_saved_dim(node.grad_fn, len(sizes))]), int(module.start)
    if start < 0:
        return None  # torch-pruning's slice mapping assumes a non-negative start
    return len(range(start, min(int(module.end), total), int(module.step)))


def _concat_input_width(graph: Any, in_node: Any, consumer: Any) -> int | None:
    """Width of one concat input: a split chunk, a channel slice, or an element-wise op reading one of them.

    torch-pruning infers every other input through its producer, which for a slice (RexNet's
    ``cat([x[:, :c] + shortcut, x[:, c:]])``) is the width of the sliced tensor, not of the slice.
    """
    if in_node.type == ops.OPTYPE.SPLIT:
        return _split_chunk_size(graph, in_node, consumer)
    if in_node.type == ops.OPTYPE.SLICE:
        return _slice_width(graph, in_node)
    if in_node.type == ops.OPTYPE.ELEMENTWISE:
        for src in in_node.inputs:
            width = None
            if src.type == ops.OPTYPE.SLICE:
                width = _slice_width(graph, src)
            elif src.type == ops.OPTYPE.SPLIT:
                width = _split_chunk_size(graph, src, in_node)
            if width is not None:
                return width  # an element-wise op keeps the width of each operand
    return _inferred(shape_infer.infer_channels_between, graph, in_node, consumer)


def _inferred(infer: Callable[..., int | None], *args: Any) -> int | None:
    """torch-pruning's channel inference, or ``None`` where it fails.

    It indexes a split's sizes by the position of the consumer among the split's outputs, which overruns when one
    chunk has several consumers (Gemma-4 ViT).
    """
    try:
        return infer(*args)
    except (IndexError, TypeError):
        return None


def _layers_read(graph: Any, node: Any, width: int) -> bool:
    """Whether some consumer of ``node`` has ``width`` input channels and every other one (slices aside) too."""
    skip = (ops.OPTYPE.SLICE, ops.OPTYPE.SPLIT)
    readers = [out for out in node.outputs if out.type not in skip]
    widths = [_inferred(shape_infer.infer_in_channels_recursively, graph, out, [0]) for out in readers]
    known = [w for w in widths if w is not None]
    return bool(known) and all(w == width for w in known)


def _install_concat_mappings(node: Any, sizes: list[int]) -> None:
    """The mappings ``update_concat_index_mapping`` installs for these sizes (the i-th input, the i-th chunk)."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    node.module.offsets = offsets
    for reverse, owner_of in ((True, lambda n: node), (False, lambda n: n)):
        addressed: list[Any] = []
        for i, in_node in enumerate(node.inputs):
            target = node if owner_of(in_node) is in_node else in_node
            for dep in owner_of(in_node).dependencies:
                if dep.target == target and not any(dep is d for d in addressed):
                    dep.index_mapping[1] = index_mapping._ConcatIndexMapping(offset=offsets[i : i + 2], reverse=reverse)
                    addressed.append(dep)
                    break


def _sized_concat(update: Any) -> Any:
    """Fill the concat sizes torch-pruning could not infer for inputs that come from a split or a slice.

    When the layers reading a channel concat (``dim=1``) have exactly the sizes' total, the mappings are
    installed here: torch-pruning's own check infers the output width through every consumer and gets it
    wrong when one of them is a slice (DPN slices each block's output again), leaving the identity mapping.
    """

    @functools.wraps(update)
    def wrapper(graph: Any, node: Any) -> Any:
        module = node.module
        if node.type == ops.OPTYPE.CONCAT and getattr(module, "concat_sizes", None) is None:
            sizes = [_concat_input_width(graph, in_node, node) for in_node in node.inputs]
            if None not in sizes:
                module.concat_sizes = sizes
        sizes = getattr(module, "concat_sizes", None)
        if (
            node.type == ops.OPTYPE.CONCAT
            and node.enable_index_mapping
            and getattr(node.grad_fn, "_saved_dim", None) == 1
            and sizes is not None
            and None not in sizes
            and len(sizes) == len(node.inputs)
            and _layers_read(graph, node, sum(sizes))
        ):
            _install_concat_mappings(node, list(sizes))
            return None
        return update(graph, node)  # guarded by the caller (_guard_updater)

    return wrapper


def _ordered_outputs(update: Any) -> Any:
    """Run an unbind updater with the node's outputs sorted by the chunk they read (block it if unclear)."""

    @functools.wraps(update)
    def wrapper(graph: Any, node: Any) -> Any:
        outputs = list(node.outputs)
        nrs = [_output_nr(node, out) for out in outputs]
        if None in nrs or sorted(nrs) != list(range(len(outputs))):
            if node.enable_index_mapping and getattr(node.grad_fn, "_saved_dim", 0) == 0:
                _set_chunk_mappings(node, dict.fromkeys(outputs))
            return None
        node.outputs[:] = [out for _, out in sorted(zip(nrs, outputs), key=lambda pair: pair[0])]
        try:
            return update(graph, node)
        except (ArithmeticError, IndexError, TypeError, ValueError):
            return None
        finally:
            node.outputs[:] = outputs

    return wrapper


def _guard_sizes(prune: Any, attr: str) -> Any:
    @functools.wraps(prune)
    def wrapper(self: Any, layer: Any, idxs: Any) -> Any:
        sizes = getattr(layer, attr, None)
        if sizes is not None and any(s is None for s in sizes):
            return None  # sizes were never inferred: there is no bookkeeping to update
        return prune(self, layer, idxs)

    return wrapper


def _none_passes(prune: Any) -> Any:
    @functools.wraps(prune)
    def wrapper(self: Any, weight: Any, keep_idxs: Any, pruning_dim: int) -> Any:
        if weight is None:
            return None  # an optional parameter that is absent (GroupNorm without bias)
        return prune(self, weight, keep_idxs, pruning_dim)

    return wrapper


def _guard_updater(update: Any) -> Any:
    @functools.wraps(update)
    def wrapper(graph: Any, node: Any) -> Any:
        try:
            return update(graph, node)
        except (ArithmeticError, IndexError, TypeError, ValueError):
            return None  # shape not inferable: keep the identity mapping

    return wrapper


def _guard_mapping(call: Any) -> Any:
    @functools.wraps(call)
    def wrapper(self: Any, idxs: Any) -> Any:
        offset = getattr(self, "offset", None)
        if offset is not None and len(offset) < 2:
            return []  # channel inference failed for this concat/split: do not follow the dependency
        try:
            return call(self, idxs)
        except (ArithmeticError, IndexError, TypeError):
            return []

    return wrapper


_ACTIVE = [0]  # nesting depth of host_fixes()


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

    Nested blocks are fine: only the outermost one patches and restores.
    """
    if _ACTIVE[0]:
        _ACTIVE[0] += 1
        try:
            yield
        finally:
            _ACTIVE[0] -= 1
        return
    saved = [(owner, name, owner.__dict__[name]) for owner, name in PATCHED]
    index_mapping.update_reshape_index_mapping = _guard_updater(strict_reshape_index_mapping)
    DependencyGraph.get_pruning_group = convergent_get_pruning_group
    Group.prune = _counting_prune(Group.__dict__["prune"])
    function.BasePruningFunc._prune_parameter_and_grad = _none_passes(
        function.BasePruningFunc.__dict__["_prune_parameter_and_grad"]
    )
    for cls, attr in ((ConcatPruner, "concat_sizes"), (SplitPruner, "split_sizes")):
        guarded = _guard_sizes(cls.__dict__["prune_out_channels"], attr)
        cls.prune_out_channels = guarded  # the same function for both directions, as torch-pruning has it
        cls.prune_in_channels = guarded
    for name in _UPDATERS:
        setattr(index_mapping, name, _guard_updater(getattr(index_mapping, name)))
    index_mapping.update_slice_index_mapping = _strict_slice(_guard_updater(index_mapping.update_slice_index_mapping))
    index_mapping.update_split_index_mapping = _guard_updater(chunked_split_index_mapping)
    index_mapping.update_concat_index_mapping = _sized_concat(_guard_updater(index_mapping.update_concat_index_mapping))
    index_mapping.update_unbind_index_mapping = _ordered_outputs(index_mapping.update_unbind_index_mapping)
    for cls in _MAPPINGS:
        cls.__call__ = _guard_mapping(cls.__dict__["__call__"])
    _ACTIVE[0] = 1
    try:
        yield
    finally:
        _ACTIVE[0] = 0
        for owner, name, fn in saved:
            setattr(owner, name, fn)
