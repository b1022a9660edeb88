"""``RobustDependencyGraph``: torch-pruning's dependency graph with its 1.6 index-mapping bugs fixed per instance.

Every fix lives on the graph instance (its methods, its own op pruners, its groups and index-mapping objects);
no attribute of a torch-pruning module or class is replaced, so other torch-pruning code in the same process
runs unchanged. The host bugs it works around, each reproduced in ``tests/test_adapters_graph.py``:

- **reshape**: ``update_reshape_index_mapping`` guesses "flatten" mappings from inferred channel counts. On
  channels-last tensors (Swin, MaxViT, CoAtNet windows) the guesses are wrong and chain, multiplying index
  lists (tens of GB, minutes); it divides by a channel count of 0 (ShuffleNet's ``channel_shuffle``). Here a
  mapping is installed only for a real NCHW flatten (a 4-D ``[B, C, H, W]`` input flattened into ``C*H*W``
  consumer channels) or its inverse (``[B, C*H*W]`` viewed as ``[B, C, H, W]`` for a convolution), decided once
  on the unpruned shapes. Anything else keeps the identity mapping, as torch-pruning does for every reshape it
  cannot infer.
- **slice**: a slice along dim 1 of any 4-D tensor is taken for a channel slice; on channels-last tensors it is
  a spatial subsampling (LeViT's ``Subsample``). Here only a slice whose dim has the producer's channel count
  maps indices, on the edges to its consumers (so the slice's own start/end bookkeeping sees input channels).
- **split/unbind order**: the i-th consumer found while tracing is paired with the i-th chunk; consumers are
  found in autograd order, so channels of one chunk get pruned in another (SKNet), and an op reading two chunks
  (``q * k``) gets one. Here consumers are matched by the chunks they read (``output_nr`` in the autograd
  graph), a layer applied to several chunks gets every chunk it reads, and an unbind whose consumers cannot be
  matched is blocked.
- **equal chunks**: ``x.chunk(n)`` re-derives equal chunk sizes from the pruned width at run time, but the
  host prunes each chunk on its own (YOLO's C2f: one chunk feeds the concat only, the other a bottleneck too),
  so the chunks end unequal and mis-split. Here channel ``i`` of one chunk is coupled with channel ``i`` of the
  others (:class:`ChunkMirrorMapping` on the edge into the split).
- **concat sizes**: a concat input produced by a split or a slice is sized before the split's sizes are known
  (FasterNet's ``cat((conv(x1), x2))``): the concat keeps the identity mapping and a later chunk prunes the
  wrong consumer inputs. Here such inputs are sized from the autograd node; a split feeding one concat
  several chunks (``cat(x.chunk(2))``) is listed once per chunk and each listing gets its own chunk's size.
- **updater crashes**: ``sum`` over a channel list holding ``None`` (CoaT), a 5-D ``expand`` taken for grouped-
  query attention with ``head_dim`` 0 (HaloNet). Each updater is guarded: on an exception the node keeps the
  identity mapping.
- **mapping crashes**: the index-mapping objects read ``offset[1]`` from one-element offsets or divide by 0.
  The graph's mappings are guarded subclasses that map such indices to nothing.
- **op bookkeeping**: ``ConcatPruner``/``SplitPruner`` add ``None`` sizes when inference failed (CoaT). The
  graph's concat/split op pruners skip the bookkeeping then.
- **GroupNorm without bias**: ``GroupNormPruner`` prunes ``layer.bias`` unconditionally; timm's
  ``GroupNorm1NoBias`` (PoolFormerV2) sets it to ``None``. The graph's groups give such a layer a placeholder
  bias while it is pruned.
- **channel-multiplier depthwise convs**: a conv with ``groups == in_channels`` and ``out_channels = m *
  in_channels`` (PiT's pooling, FastViT's patch embedding) is a plain grouped conv to the host: input and output
  channels are not coupled, pruning its inputs breaks the layer (``ConvPruner`` slices the one input weight
  column) and the importances index a one-column weight with input indices (``IndexError``). Here input channel
  ``c`` is coupled with output channels ``c*m .. c*m+m-1`` (:class:`ChannelMultiplierConvPruner`, its input
  pruning also lowers ``groups``); the importances score such a layer by its output channels.
- **group walk**: ``get_pruning_group`` re-adds a dependency whenever it arrives with a different index list,
  with a linear membership scan: on graphs with many coupled paths (HaloNet, NFNet, RexNet, FocalNet) the walk
  takes minutes or never ends. Here each (layer, handler, index) is propagated once, indices beyond a layer's
  width are dropped (only wrong mappings produce them), and a walk past :data:`INDEX_BUDGET` entries raises
  :class:`GroupExplosion`. Index mappings are refreshed only after a group of this graph was pruned.

Private torch-pruning names are used only in the "host internals" section below;
``tests/test_adapters_graph.py`` pins the host sources they were written against (torch-pruning 1.6.1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from numbers import Number
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

# ------------------------------------------------------------------------------------------- host internals
# Every private torch-pruning name this module relies on (pinned by tests/test_adapters_graph.py).
from torch_pruning import (
    _helpers,  # _HybridIndex, GroupItem, to_plain_idxs, to_root_idxs
    ops,
)
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.pruner import function

from orthoreg_tp._inputs import flatten_tensors

_HOST_MAPPINGS = {
    name: getattr(index_mapping, name)
    for name in ("_FlattenIndexMapping", "_ConcatIndexMapping", "_SplitIndexMapping", "_GQAIndexMapping",
                 "_SliceIndexMapping")
}
_HOST_UPDATERS = {
    "slice": index_mapping.update_slice_index_mapping,
    "concat": index_mapping.update_concat_index_mapping,
    "expand": index_mapping.update_expand_index_mapping,
}

__all__ = ["INDEX_BUDGET", "BlockMapping", "ChannelMultiplierConvPruner", "GroupExplosion", "RobustDependencyGraph",
           "RobustGroup", "is_channel_multiplier_conv"]

#: Most (layer, index) entries one group walk may collect before :class:`GroupExplosion` is raised.
INDEX_BUDGET = 1_000_000

_INFERENCE_ERRORS = (ArithmeticError, IndexError, TypeError, ValueError)


class GroupExplosion(RuntimeError):
    """A dependency walk kept producing new indices; ``module`` is the root it started from."""

    def __init__(self, module: Any, size: int) -> None:
        super().__init__(f"dependency group grew past {size:,} index entries (wrong index mappings)")
        self.module = module


# ----------------------------------------------------------------------------------- guarded host objects
def _guarded_mapping_class(base: type) -> type:
    def __call__(self: Any, idxs: Any) -> Any:  # noqa: N807 - the guarded __call__ of a host mapping
        offset = getattr(self, "offset", None)
        if offset is not None and len(offset) < 2:
            return []  # channel inference failed for this concat/split: do not follow the dependency
        try:
            return base.__call__(self, idxs)
        except (ArithmeticError, IndexError, TypeError):
            return []

    return type("Guarded" + base.__name__.lstrip("_"), (base,), {"__call__": __call__, "__module__": __name__})


#: host mapping class -> its guarded subclass (instances are created as, or converted to, the subclass)
GUARDED_MAPPINGS: dict[type, type] = {base: _guarded_mapping_class(base) for base in _HOST_MAPPINGS.values()}
FlattenMapping = GUARDED_MAPPINGS[index_mapping._FlattenIndexMapping]
ConcatMapping = GUARDED_MAPPINGS[index_mapping._ConcatIndexMapping]
SplitMapping = GUARDED_MAPPINGS[index_mapping._SplitIndexMapping]
SliceMapping = GUARDED_MAPPINGS[index_mapping._SliceIndexMapping]


class ChunkMirrorMapping:
    """Index mapping into a split whose equal chunks are sized from the width (``x.chunk(n)``, ``x.split(w // n)``).

    Such a split re-derives its sizes from the pruned width at run time, so the chunks must stay equal: channel
    ``i`` of one chunk is coupled with channel ``i`` of every other chunk (``i mod step + k * step``).

    Args:
        step: Current chunk width.
        n_chunks: Number of chunks.
    """

    def __init__(self, step: int, n_chunks: int) -> None:
        self.step, self.n_chunks, self.reverse = int(step), int(n_chunks), False

    def __call__(self, idxs: Any) -> list[Any]:  # noqa: D102 - the mapping protocol of torch-pruning
        out = []
        for i in idxs:
            base = i.idx % self.step
            out.extend(_helpers._HybridIndex(idx=base + k * self.step, root_idx=i.root_idx)
                       for k in range(self.n_chunks))
        return out


def is_channel_multiplier_conv(module: Any) -> bool:
    """Whether ``module`` is a depthwise conv with a channel multiplier (``groups == in_channels``, ``m > 1``).

    Example:
        >>> is_channel_multiplier_conv(nn.Conv2d(8, 16, 3, groups=8)), is_channel_multiplier_conv(nn.Conv2d(8, 8, 3))
        (True, False)
    """
    return (
        isinstance(module, ops.TORCH_CONV)
        and not module.transposed
        and 1 < module.groups == module.in_channels < module.out_channels
        and module.out_channels % module.groups == 0
    )


class ChannelMultiplierConvPruner(function.ConvPruner):
    """The pruner of channel-multiplier depthwise convs: input channel ``c`` owns outputs ``c*m .. c*m+m-1``.

    Output pruning is the host's ``tp.prune_conv_out_channels`` (the same function, so importances score the
    layer's filters as usual); input pruning lowers ``in_channels`` and ``groups`` (each group keeps its one
    weight column) and is unknown to the importances, which therefore never index the one-column weight with
    input indices. The graph couples both directions block-wise (:class:`BlockMapping`) where a conv/linear
    layer produces the input, so a group removes whole blocks and the layer stays consistent; such a layer has
    no channel groups. Any other (fed by the model's input) keeps the host's channel groups (``groups``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.prune_out_channels = function.prune_conv_out_channels  # type: ignore[method-assign]
        self.coupled: set[int] = set()  # ids of the layers the graph coupled (the others keep channel groups)

    def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        """Drop input channels (and as many groups); their output blocks are pruned by the coupled output item."""
        removed = len({int(i) for i in idxs})
        layer.in_channels -= removed
        layer.groups -= removed
        return layer

    def get_in_channel_groups(self, layer: nn.Module) -> int:  # noqa: D102 - the host's protocol
        return 1 if id(layer) in self.coupled else layer.groups

    def get_out_channel_groups(self, layer: nn.Module) -> int:  # noqa: D102 - the host's protocol
        return 1 if id(layer) in self.coupled else layer.groups


class BlockMapping:
    """Index mapping inside a channel-multiplier conv: input ``c`` <-> outputs ``c*m .. c*m+m-1``.

    Args:
        multiplier: ``m``, output channels per input channel.
        expand: Map input channels to their output blocks (else output channels to their input channel).
    """

    def __init__(self, multiplier: int, *, expand: bool) -> None:
        self.multiplier, self.expand, self.reverse = int(multiplier), bool(expand), False

    def __call__(self, idxs: Any) -> list[Any]:  # noqa: D102 - the mapping protocol of torch-pruning
        m = self.multiplier
        if self.expand:
            return [_helpers._HybridIndex(idx=i.idx * m + k, root_idx=i.root_idx) for i in idxs for k in range(m)]
        return [_helpers._HybridIndex(idx=i.idx // m, root_idx=i.root_idx) for i in idxs]


def _sizes_known(layer: Any, attr: str) -> bool:
    sizes = getattr(layer, attr, None)
    return sizes is None or all(s is not None for s in sizes)


class GuardedConcatPruner(ops.ConcatPruner):
    """The concat op pruner of one graph: skips the bookkeeping when the concat sizes were never inferred."""

    def prune_out_channels(self, layer: Any, idxs: Any) -> Any:
        if _sizes_known(layer, "concat_sizes"):
            return super().prune_out_channels(layer, idxs)
        return None

    prune_in_channels = prune_out_channels


class GuardedSplitPruner(ops.SplitPruner):
    """The split op pruner of one graph: skips the bookkeeping when the split sizes were never inferred."""

    def prune_out_channels(self, layer: Any, idxs: Any) -> Any:
        if _sizes_known(layer, "split_sizes"):
            return super().prune_out_channels(layer, idxs)
        return None

    prune_in_channels = prune_out_channels


@contextlib.contextmanager
def _placeholder_biases(group: Any) -> Iterator[None]:
    """Give affine GroupNorm/InstanceNorm layers without a bias a zero bias while the group is pruned."""
    patched = []
    for dep, _ in group:
        module = dep.target.module
        owner = getattr(dep.handler, "__self__", None)
        if (
            isinstance(owner, (function.GroupNormPruner, function.InstanceNormPruner))
            and isinstance(module, nn.Module)
            and getattr(module, "affine", False)
            and getattr(module, "bias", 0) is None
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and not any(m is module for m in patched)
        ):
            module.bias = nn.Parameter(torch.zeros_like(module.weight))
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.bias = None


class RobustGroup(Group):
    """A torch-pruning ``Group`` whose ``prune()`` tells its graph to refresh the index mappings.

    It also prunes GroupNorm layers whose bias is ``None`` (timm's ``GroupNorm1NoBias``).
    """

    def prune(self, idxs: Any = None, record_history: bool = True) -> None:
        """Prune every coupled layer of the group (see ``tp.dependency.Group.prune``)."""
        if idxs is None and isinstance(self._DG, RobustDependencyGraph):
            self._DG.generation += 1
        with _placeholder_biases(self):
            super().prune(idxs=idxs, record_history=record_history)


# ---------------------------------------------------------------------------------------------- the graph
class RobustDependencyGraph(tp.DependencyGraph):
    """A ``tp.DependencyGraph`` that works around torch-pruning 1.6's index-mapping bugs (module docstring).

    Use it like ``tp.DependencyGraph``; :func:`~orthoreg_tp.adapters.build_pruner` builds pruners on it.

    Attributes:
        generation: Groups of this graph pruned so far (index mappings are refreshed when it changes).

    Example:
        >>> import torch, torch_pruning as tp
        >>> from orthoreg_tp.adapters import RobustDependencyGraph
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> graph = RobustDependencyGraph().build_dependency(model, torch.randn(1, 3, 8, 8))
        >>> graph.get_pruning_group(model[0], tp.prune_conv_out_channels, [0, 1]).prune()
        >>> model[1].in_channels
        6
    """

    def __init__(self) -> None:
        super().__init__()
        # Only the op pruners of this graph are replaced; pruners of real layers stay the shared host objects,
        # which importances recognise by identity (tp.prune_groupnorm_out_channels, ...).
        self.REGISTERED_PRUNERS[ops.OPTYPE.CONCAT] = GuardedConcatPruner()
        self.REGISTERED_PRUNERS[ops.OPTYPE.SPLIT] = GuardedSplitPruner()
        self._multiplier_pruner = ChannelMultiplierConvPruner()
        self._multiplier_convs: dict[int, nn.Module] = {}  # id -> channel-multiplier conv (decided unpruned)
        self._refresh_pruning_fn_cache()
        self.generation = 0
        self._mapped_generation: int | None = None
        self._max_width: int | None = None
        self._channel_slice: dict[Any, bool | None] = {}  # slice node -> cuts channels? (unpruned shapes)
        self._reshape_stride: dict[Any, tuple[int, bool] | None] = {}  # reshape node -> (stride, unflatten)
        self._sized_splits: set[Any] = set()
        self._equal_splits: set[Any] = set()  # splits into equal chunks derived from the width (chunks mirrored)
        self._groups: dict[tuple[int, Any, tuple[int, ...]], RobustGroup] = {}  # walked at self._groups_generation
        self._groups_generation = 0

    def _refresh_pruning_fn_cache(self) -> None:
        pruners = [p for p in (*self.REGISTERED_PRUNERS.values(), *self.CUSTOMIZED_PRUNERS.values(),
                               self._multiplier_pruner) if p is not None]
        self._in_channel_pruning_fn = {p.prune_in_channels for p in pruners}
        self._out_channel_pruning_fn = {p.prune_out_channels for p in pruners}

    def build_dependency(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Callable[..., Any] | None = None,
        output_transform: Callable[..., Any] | None = None,
        unwrapped_parameters: Any = None,
        customized_pruners: dict[Any, Any] | None = None,
        ignored_layers: list[nn.Module] | None = None,
        ignored_params: list[nn.Parameter] | None = None,
        verbose: bool = True,
        recording: Any = None,
    ) -> RobustDependencyGraph:
        """Trace ``model`` and build the graph (the arguments of ``tp.DependencyGraph.build_dependency``).

        The host's steps, in its order, except that index mappings come from :meth:`update_index_mapping`.
        ``recording`` (a :class:`~.tracing.Recording` of ``model`` on the same inputs and forward function) is
        used instead of running the model again.
        """
        self.__dict__["_recording"] = recording
        transform = output_transform  # the host flattens the output and fails on other leaves (RT-DETR's None)
        output_transform = lambda out: flatten_tensors(transform(out) if transform is not None else out)  # noqa: E731
        self.verbose = verbose
        self.model = model
        self._module2name = {module: name for (name, module) in model.named_modules()}
        for customized_type, customized_pruner in (customized_pruners or {}).items():
            self.register_customized_layer(customized_type, customized_pruner)
        if ignored_layers is not None:
            self.IGNORED_LAYERS_IN_TRACING.extend(ignored_layers)
        self.ignored_params = ignored_params if ignored_params is not None else []
        for layer_type_or_instance in self.CUSTOMIZED_PRUNERS:  # their submodules are the customized pruner's
            for m in model.modules():
                if m is layer_type_or_instance or (
                    not isinstance(layer_type_or_instance, nn.Module) and isinstance(m, layer_type_or_instance)
                ):
                    self.IGNORED_LAYERS_IN_TRACING.extend(sub for sub in m.modules() if sub is not m)
        self._param_to_name, self.unwrapped_parameters = self._detect_unwrapped_parameters(unwrapped_parameters)
        if not torch.is_grad_enabled():
            raise RuntimeError("building a dependency graph needs autograd: call it outside torch.no_grad()")
        self._multiplier_convs = {  # a user's customized pruner for the class wins
            id(m): m for m in model.modules()
            if is_channel_multiplier_conv(m) and type(m) not in self.CUSTOMIZED_PRUNERS
        }
        self.module2node = self._trace(model, example_inputs, forward_fn, output_transform=output_transform)
        self._build_dependency(self.module2node)
        shape_infer.init_shape_information(self)
        self.update_index_mapping()
        self._mapped_generation = self.generation
        self._couple_multiplier_convs()
        return self

    def _trace(self, model: nn.Module, example_inputs: Any, forward_fn: Any, output_transform: Any) -> dict:
        """The host's tracing, or its replay on the recorded forward pass given to :meth:`build_dependency`."""
        recording = self.__dict__.pop("_recording", None)
        if recording is None:
            return super()._trace(model, example_inputs, forward_fn, output_transform)
        return _replayed_trace(self, model, recording, output_transform)

    def get_pruner_of_module(self, module: Any) -> Any:
        """The host's pruner of ``module``; a :class:`ChannelMultiplierConvPruner` for channel-multiplier convs."""
        if id(module) in self._multiplier_convs:
            return self._multiplier_pruner
        return super().get_pruner_of_module(module)

    def _couple_multiplier_convs(self) -> None:
        """Couple the inputs and output blocks of every channel-multiplier conv fed by a conv/linear layer."""
        pruner = self._multiplier_pruner
        for module in self._multiplier_convs.values():
            node = self.module2node.get(module)
            if node is None or not self._fed_by_layer(module):
                continue
            pruner.coupled.add(id(module))
            multiplier = module.out_channels // module.groups
            for trigger, handler, expand in ((pruner.prune_in_channels, pruner.prune_out_channels, True),
                                             (pruner.prune_out_channels, pruner.prune_in_channels, False)):
                dep = Dependency(trigger=trigger, handler=handler, source=node, target=node)
                dep.index_mapping[0] = BlockMapping(multiplier, expand=expand)
                node.dependencies.append(dep)

    def _fed_by_layer(self, module: nn.Module) -> bool:
        """Whether pruning ``module``'s inputs reaches the output channels of a conv, linear or embedding layer."""
        group = self.get_pruning_group(module, self._multiplier_pruner.prune_in_channels, [0])
        return any(
            isinstance(dep.target.module, (ops.TORCH_CONV, ops.TORCH_LINEAR, ops.TORCH_EMBED))
            and self.is_out_channel_pruning_fn(dep.handler)
            for dep, _ in group
        )

    def get_all_groups(self, ignored_layers: Any = (), root_module_types: Any = (ops.TORCH_CONV, ops.TORCH_LINEAR)
                       ) -> Iterator[Any]:
        """The host's groups, each rooted at its narrowest layer when another layer's channels derive from it.

        Coupled channels can come in blocks: a channel-multiplier conv (input ``c``, outputs ``c*m ..``) or an
        unflatten (``Linear`` features ``c*h*w ..`` viewed as channel ``c`` of a convolution, torch-pruning's
        ``tests/test_reshape.py``). Rooted at the wide side, a group's scores count each block ``m`` times and
        a ratio of root indices removes up to ``m`` times as many blocks (the importances also size their scores
        by the first scored item: an ``IndexError`` when it is the narrow one). Such a group is re-rooted at
        the narrowest root-type layer it covers whole (output or input channels), when the walk from there
        reaches exactly the same channels. Other groups keep the host's root (attention groups are re-rooted by
        the pruner itself).
        """
        for group in super().get_all_groups(ignored_layers=list(ignored_layers), root_module_types=root_module_types):
            yield self._narrowest_root(group, tuple(root_module_types)) if self._has_blocks(group) else group

    def _has_blocks(self, group: Any) -> bool:
        """Whether the group passes a coupled channel-multiplier conv or an unflatten feeding convolutions."""
        coupled = self._multiplier_pruner.coupled
        for dep, _ in group.items:
            kind = self._reshape_stride.get(dep.target)
            if id(dep.target.module) in coupled or (kind is not None and kind[1]):
                return True
        return False

    def _narrowest_root(self, group: Any, root_types: tuple[type, ...]) -> Any:
        best, rank = None, (len(group[0].idxs), False)  # fewest channels first, output channels before inputs
        for dep, idxs in group.items[1:]:
            module = dep.target.module
            if len(idxs) > rank[0] or not isinstance(module, root_types) or self._width(dep) != len(idxs):
                continue
            pruner = self.get_pruner_of_module(module)
            if pruner is None or dep.handler not in (pruner.prune_out_channels, pruner.prune_in_channels):
                continue
            candidate = (len(idxs), dep.handler != pruner.prune_out_channels)
            if candidate < rank:
                best, rank = dep, candidate
        if best is None:
            return group
        regrouped = self.get_pruning_group(best.target.module, best.handler, list(range(rank[0])))
        if _coverage(regrouped) != _coverage(group):
            return group
        if rank[1]:  # an input root: the host names a local ranking scope after the root's source, which would
            # be shared with the group of the layer's outputs; the source stays the layer the group was found from
            root = regrouped.items[0]
            dep = Dependency(best.handler, best.handler, source=group[0].dep.source, target=best.target)
            regrouped.items[0] = _helpers.GroupItem(dep, root.idxs)
            regrouped.items[0].root_idxs = root.root_idxs
        return regrouped

    # ------------------------------------------------------------------------------------ index mappings
    def update_index_mapping(self) -> None:
        """Install the index mappings of every concat/split/reshape/unbind/expand/slice node (fixed updaters)."""
        for node in list(self.module2node.values()):
            update = {
                ops.OPTYPE.CONCAT: self._update_concat,
                ops.OPTYPE.SPLIT: self._update_split,
                ops.OPTYPE.RESHAPE: self._update_reshape,
                ops.OPTYPE.UNBIND: self._update_unbind,
                ops.OPTYPE.EXPAND: lambda n: _HOST_UPDATERS["expand"](self, n),
                ops.OPTYPE.SLICE: self._update_slice,
            }.get(node.type)
            if update is not None:
                _guarded(update, node)  # a shape that cannot be inferred leaves the identity mapping
        for node in self.module2node.values():  # host updaters create host mapping objects: guard them
            for dep in node.dependencies:
                for mapping in dep.index_mapping:
                    guarded = GUARDED_MAPPINGS.get(type(mapping))
                    if guarded is not None:
                        mapping.__class__ = guarded

    def _update_reshape(self, node: Any) -> None:
        if node not in self._reshape_stride:  # decided once, on the unpruned shapes (the stride stays)
            self._reshape_stride[node] = _reshape_kind(self, node)
        kind = self._reshape_stride[node]
        if kind is None:
            return
        stride, unflatten = kind
        if unflatten:  # [B, C*H*W] -> [B, C, H, W]: the consumers see C channels
            for out_node in node.outputs:
                _map_edge(out_node, node, lambda reverse: FlattenMapping(stride=stride, reverse=reverse))
        else:
            for in_node in node.inputs:
                _map_edge(in_node, node, lambda reverse: FlattenMapping(stride=stride, reverse=reverse))

    def _update_slice(self, node: Any) -> None:
        if node not in self._channel_slice:  # decided once, on the unpruned shapes
            self._channel_slice[node] = _is_channel_slice(self, node)
        kind = self._channel_slice[node]
        if kind is False:
            return  # a spatial slice of a channels-last tensor: channels pass through unchanged
        module = node.module
        if node.enable_index_mapping and kind and module.step == 1 and module.start >= 0:
            _install_slice_mappings(node)
            return
        _guarded(_HOST_UPDATERS["slice"], self, node)

    def _update_split(self, node: Any) -> None:
        if not node.enable_index_mapping:
            return
        module = node.module
        if node not in self._sized_splits:
            sizes = _channel_split_sizes(node, self)
            if sizes is None:
                return
            module.split_sizes = sizes
            self._sized_splits.add(node)
            if getattr(node.grad_fn, "_saved_split_sizes", None) is None and len(set(sizes)) == 1 and len(sizes) > 1:
                self._equal_splits.add(node)  # chunk(n): sizes re-derived from the width at run time
        offsets = [0]
        for size in module.split_sizes:
            offsets.append(offsets[-1] + size)
        module.offsets = offsets
        if node in self._equal_splits and len(set(module.split_sizes)) == 1:
            for in_node in node.inputs:
                for dep in in_node.dependencies:
                    if dep.target is node and (dep.index_mapping[0] is None
                                               or isinstance(dep.index_mapping[0], ChunkMirrorMapping)):
                        dep.index_mapping[0] = ChunkMirrorMapping(module.split_sizes[0], len(module.split_sizes))
        chunks = _chunk_assignment(node, len(module.split_sizes))
        _set_chunk_mappings(node, [offsets[c : c + 2] if c is not None else None for c in chunks])

    def _update_concat(self, node: Any) -> None:
        module = node.module
        if getattr(module, "concat_sizes", None) is None:
            seen: dict[int, int] = {}  # an input listed k times (several chunks of one split) is read k times
            sizes = []
            for in_node in node.inputs:
                occurrence = seen[id(in_node)] = seen.get(id(in_node), -1) + 1
                sizes.append(_concat_input_width(self, in_node, node, occurrence))
            if None not in sizes:
                module.concat_sizes = sizes
        sizes = getattr(module, "concat_sizes", None)
        # (the host disables every concat's mapping when a model has unwrapped parameters, for the token concat of
        # a class token; one read by layers of the summed width is a channel concat: DINOv2's cls + mean classifier)
        if (
            getattr(node.grad_fn, "_saved_dim", None) == 1
            and sizes is not None
            and None not in sizes
            and len(sizes) == len(node.inputs)
            and _layers_read(self, node, sum(sizes))
        ):
            _install_concat_mappings(node, list(sizes))
            return
        _guarded(_HOST_UPDATERS["concat"], self, node)

    def _update_unbind(self, node: Any) -> None:
        if not node.enable_index_mapping or _saved_dim(node.grad_fn, 64) != 0:
            return  # the host maps only an unbind along dim 0 (stacked projections: q, k, v)
        reads = [nr for out in {id(o): o for o in node.outputs}.values() for nr in _output_nrs(node, out)]
        n_chunks = max(reads) + 1 if reads else 0
        width = _producer_channels(self, node)
        if set(reads) != set(range(n_chunks)) or not width or width % n_chunks:
            _set_chunk_mappings(node, [None] * len(node.outputs))  # block: consumers cannot be matched
            return
        step = width // n_chunks
        node.module.offsets = [i * step for i in range(n_chunks + 1)]
        chunks = _chunk_assignment(node, n_chunks)
        _set_chunk_mappings(node, [[c * step, (c + 1) * step] if c is not None else None for c in chunks])

    # ---------------------------------------------------------------------------------------- group walk
    def get_pruning_group(self, module: Any, pruning_fn: Callable[..., Any], idxs: Any) -> RobustGroup:
        """The group of layers coupled to ``pruning_fn(module, idxs)`` (same result as the host, convergent).

        A group is walked once per :attr:`generation`: the pruners' passes over all groups (channel counts, the
        ranking, the step's scoring) get the same group object until a group of this graph is pruned.

        Raises:
            ValueError: ``module`` is not in the graph.
            GroupExplosion: The walk grew past :data:`INDEX_BUDGET` entries (wrong index mappings).
        """
        idxs = [int(i) for i in ([idxs] if isinstance(idxs, Number) else idxs)]
        if self._groups_generation != self.generation:
            self._groups.clear()
            self._groups_generation = self.generation
        key = (id(module), pruning_fn, tuple(idxs))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = self._walk_group(module, pruning_fn, idxs)
        return group

    def _walk_group(self, module: Any, pruning_fn: Callable[..., Any], idxs: list[int]) -> RobustGroup:
        """Walk the dependencies from ``pruning_fn(module, idxs)`` (each (layer, handler, index) once)."""
        pruning_fn, idxs, bound = self._root_indices(module, pruning_fn, idxs)
        group = RobustGroup()
        root = self.module2node[module]
        root_dep = Dependency(pruning_fn, pruning_fn, source=root, target=root)
        group.add_dep(dep=root_dep, idxs=idxs)
        # (layer, handler) -> indices reached so far: a list while reached once (no copy), a set once revisited
        propagated: dict[tuple[Any, Any], set[int] | list[Any]] = {(root, pruning_fn): {i.idx for i in idxs}}
        widths: dict[tuple[Any, Any], int] = {}
        total = len(idxs)
        # every list on the stack holds distinct indices below its bound (the root's are checked on the way)
        stack = [(root_dep, idxs, bound)]
        while stack:
            dep, dep_idxs, bound = stack.pop()
            for new_dep in dep.target.dependencies:
                if not new_dep.is_triggered_by(dep.handler):
                    continue
                new_idxs = dep_idxs
                for mapping in _edge_mappings(new_dep):
                    new_idxs = mapping(new_idxs)
                if not new_idxs:
                    continue
                key = (new_dep.target, new_dep.handler)
                if key not in widths:
                    widths[key] = self._width(new_dep)
                fresh, fresh_bound = _fresh_indices(propagated, key, new_idxs, new_idxs is dep_idxs, bound,
                                                    widths[key])
                if fresh:
                    total += len(fresh)
                    if total > INDEX_BUDGET:
                        raise GroupExplosion(module, INDEX_BUDGET)
                    group.add_dep(new_dep, fresh)
                    stack.append((new_dep, fresh, fresh_bound))
        return self._merged(group)

    def _root_indices(self, module: Any, pruning_fn: Callable[..., Any],
                      idxs: list[int]) -> tuple[Callable[..., Any], list[Any], float]:
        """The root's handler and distinct indices (as hybrid indices) with their bound; index offsets refreshed."""
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
            pruning_fn = function.prune_depthwise_conv_out_channels
        if len(set(idxs)) != len(idxs):
            idxs = list(dict.fromkeys(idxs))
        bound = max(idxs) + 1 if idxs and min(idxs) >= 0 else math.inf
        if self._mapped_generation != self.generation:  # refresh offsets only after the model changed
            self.update_index_mapping()
            self._mapped_generation = self.generation
        return pruning_fn, [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs], bound

    def _merged(self, group: RobustGroup) -> RobustGroup:
        """One item per (layer, handler), ignored parameters dropped, plain and root indices split.

        The walk adds each (layer, handler, index) once, so the lists of one layer and handler are disjoint.
        """
        merged_items: dict[tuple[Any, Any], tuple[Any, list]] = {}
        for dep, dep_idxs in group.items:
            if isinstance(dep.target.module, nn.Parameter) and any(dep.target.module is p for p in self.ignored_params):
                continue
            entry = merged_items.get((dep.target, dep.handler))
            if entry is None:
                merged_items[(dep.target, dep.handler)] = (dep, dep_idxs)
            else:
                merged_items[(dep.target, dep.handler)] = (entry[0], entry[1] + dep_idxs)
        merged = RobustGroup()
        merged._DG = self
        for dep, hybrid in merged_items.values():
            merged.add_dep(dep, [i.idx for i in hybrid])
            merged[len(merged) - 1].root_idxs = [i.root_idx for i in hybrid]
        return merged

    def _width(self, dep: Any) -> int:
        """Channel count of a dependency's target, or the widest layer for ops without one."""
        width = None
        try:
            if self.is_out_channel_pruning_fn(dep.handler):
                width = self.get_out_channels(dep.target)
            elif self.is_in_channel_pruning_fn(dep.handler):
                width = self.get_in_channels(dep.target)
        except Exception:
            width = None
        return width if isinstance(width, int) and width > 0 else self._widest()

    def _widest(self) -> int:
        if self._max_width is None:
            widest = 1
            for module in self.module2node:
                for attr in ("in_channels", "out_channels", "in_features", "out_features", "num_features",
                             "embed_dim"):
                    value = getattr(module, attr, None)
                    if isinstance(value, int):
                        widest = max(widest, value)
                if isinstance(module, nn.Parameter) and module.dim():
                    widest = max(widest, *module.shape)
            self._max_width = widest
        return self._max_width


def _coverage(group: Any) -> dict[tuple[int, str], int]:
    """How many indices a group prunes per (layer, handler)."""
    return {(id(dep.target), getattr(dep.handler, "__qualname__", "")): len(idxs) for dep, idxs in group.items}


def _replayed_trace(graph: RobustDependencyGraph, model: nn.Module, recording: Any, output_transform: Any) -> dict:
    """``tp.DependencyGraph._trace`` on a recorded forward pass: what its hooks would record, then its graph walk."""
    model.eval()
    graph._2d_4d = True
    registered = tuple(ops.type2class(t) for t in graph.REGISTERED_PRUNERS) + tuple(graph.CUSTOMIZED_PRUNERS)
    ignored = {id(m) for m in graph.IGNORED_LAYERS_IN_TRACING}
    gradfn2module: dict[Any, nn.Module] = {}
    calls: dict[nn.Module, int] = {}
    for module, grad_fn, linear_3d in recording.calls:
        if isinstance(module, registered) and id(module) not in ignored:
            calls[module] = calls.get(module, 0) + 1
            graph._2d_4d = graph._2d_4d and not linear_3d
            gradfn2module[grad_fn] = module
    reused = [m for m, n in calls.items() if n > 1]
    out = recording.output if output_transform is None else output_transform(recording.output)
    module2node: dict[Any, Any] = {}
    visited: set[Any] = set()
    for o in tp.utils.flatten_as_list(out):
        graph._trace_computational_graph(module2node, o, gradfn2module, reused, visited=visited)
    if graph.unwrapped_parameters:  # the host's ViT corner case: no index mapping on a concat/split of 3-D params
        for node in module2node.values():
            if node.type in (ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT):
                stack, seen = [node], set()
                while stack:
                    n = stack.pop()
                    seen.add(n)
                    if n.type == ops.OPTYPE.PARAMETER and len(n.module.shape) == 3:
                        node.enable_index_mapping = False
                        break
                    stack.extend(ni for ni in n.inputs if ni not in seen)
    return module2node


# -------------------------------------------------------------------------------------------- updaters
def _guarded(update: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(*_INFERENCE_ERRORS):  # shape not inferable: the node keeps the identity mapping
        update(*args)


def _map_edge(src: Any, dst: Any, mapping: Callable[[bool], Any]) -> None:
    """Install ``mapping(False)`` on ``src -> dst`` dependencies and ``mapping(True)`` on ``dst -> src`` ones."""
    for a, b, reverse in ((src, dst, False), (dst, src, True)):
        for dep in a.dependencies:
            if dep.target is b:
                dep.index_mapping[0] = mapping(reverse)


def _fresh_indices(propagated: dict[tuple[Any, Any], Any], key: tuple[Any, Any], new_idxs: list[Any],
                   identity: bool, bound: float, width: int) -> tuple[list[Any], float]:
    """The indices of ``new_idxs`` not yet reached at ``key`` (and inside its width), and their bound.

    An identity edge into a layer reached for the first time passes its list on uncopied when the bound shows
    every index fits; otherwise the layer's reached indices become a set and each index is checked.
    """
    known = propagated.get(key)
    if known is None and identity and bound <= width:
        propagated[key] = new_idxs
        return new_idxs, bound
    if not isinstance(known, set):
        known = propagated[key] = {i.idx for i in known or ()}
    fresh = []
    for i in new_idxs:
        if i.idx not in known and 0 <= i.idx < width:
            known.add(i.idx)
            fresh.append(i)
    return fresh, width


def _edge_mappings(dep: Any) -> list[Any]:
    """The index mappings of one edge in the order to apply them.

    An edge between a split/slice and a concat it feeds carries the split/slice mapping in slot 0 and the
    concat's in slot 1. Going forward that order is right; going back from the concat it must be undone
    first, so all-reverse mappings are applied last slot first.
    """
    mappings = [m for m in dep.index_mapping if m is not None]
    if len(mappings) > 1 and all(getattr(m, "reverse", False) for m in mappings):
        mappings.reverse()
    return mappings


def _inferred(infer: Callable[..., int | None], *args: Any) -> int | None:
    """torch-pruning's channel inference, or ``None`` where it fails.

    It overruns a split's sizes when one chunk has several consumers.
    """
    try:
        return infer(*args)
    except (IndexError, TypeError):
        return None


def _producer_channels(graph: Any, node: Any) -> int | None:
    for n in node.inputs:
        ch = _inferred(shape_infer.infer_out_channels_recursively, graph, n, [0])
        if ch is not None:
            return ch
    return None


def _consumer_channels(graph: Any, node: Any) -> int | None:
    for n in node.outputs:
        ch = _inferred(shape_infer.infer_in_channels_recursively, graph, n, [0])
        if ch is not None:
            return ch
    return None


def _reshape_kind(graph: Any, node: Any) -> tuple[int, bool] | None:
    """``(stride, unflatten)`` of a real NCHW flatten (or its inverse feeding convolutions), else ``None``."""
    size = getattr(node.grad_fn, "_saved_self_sizes", None) or getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if size is None:
        return None
    size = [int(s) for s in size]
    if len(size) == 4:  # [B, C, H, W] -> [B, C*H*W]
        channels, spatial = size[1], size[2] * size[3]
        if (
            spatial > 1
            and _producer_channels(graph, node) == channels
            and _consumer_channels(graph, node) == channels * spatial
        ):
            return spatial, False
        return None
    if len(size) in (1, 2) and node.outputs and all(isinstance(out.module, ops.TORCH_CONV) for out in node.outputs):
        features = size[-1]  # [B, C*H*W] (saved as [C*H*W] for B = 1) -> [B, C, H, W] read by convolutions
        channels = {getattr(out.module, "in_channels", None) for out in node.outputs}
        if len(channels) == 1 and _producer_channels(graph, node) == features:
            (ch,) = channels
            if isinstance(ch, int) and 0 < ch < features and features % ch == 0:
                return features // ch, True
    return None


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

    A slice of an NCHW (or ``[B, C]``) concatenation along the channel dim is one (DPN's ``x[:, :c]`` of the
    previous block's output, whose producer width torch-pruning cannot infer through the concat); on token
    tensors ``[B, N, C]`` dim 1 is the tokens (CrossViT's ``cat((cls, patches), dim=1)[:, 0:1]``). Otherwise the
    sliced dim must have the producer's channel count (LeViT's spatial ``x[:, ::2]`` has not).
    """
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        return None
    dim = _saved_dim(node.grad_fn, len(sizes))
    if dim is None:
        return None
    for src in node.inputs:
        if (src.type == ops.OPTYPE.CONCAT and len(sizes) in (2, 4) and dim == 1
                and _saved_dim(src.grad_fn, len(sizes)) == dim):
            return True
    return _producer_channels(graph, node) == int(sizes[dim])


def _install_slice_mappings(node: Any) -> None:
    """Map a channel slice on the edges to its consumers, so that the slice node sees its input's channels.

    torch-pruning maps on the edge from the sliced tensor, so ``SlicePruner`` receives indices relative to the
    slice while it updates ``start``/``end`` as if they were input channels, and never hears of channels pruned
    before ``start`` (DPN's ``x[:, num_1x1_c:]`` of a concat whose first part shrank).
    """
    module = node.module
    args = {"dim": module.dim, "start": module.start, "step": module.step, "end": module.end}
    for out_node in node.outputs:
        _map_edge(node, out_node, lambda reverse: SliceMapping(**args, reverse=reverse))


def _output_nrs(split_node: Any, out_node: Any) -> list[int]:
    """Which outputs of a split/unbind the autograd node of ``out_node`` reads, in argument order."""
    fns = getattr(out_node.grad_fn, "next_functions", ()) or ()
    return [int(nr) for fn, nr in fns if fn is split_node.grad_fn]


def _output_nr(split_node: Any, out_node: Any) -> int | None:
    nrs = _output_nrs(split_node, out_node)
    return nrs[0] if nrs else None


def _chunk_assignment(node: Any, n_chunks: int) -> list[int | None]:
    """The chunk each entry of ``node.outputs`` reads (``None``: unknown, the edge is blocked).

    A consumer appears in ``node.outputs`` once per chunk it reads. Its autograd node names the chunks it reads
    in one call (``cat(chunks)``); a module applied to several chunks keeps the autograd node of one call, so
    its other entries take the chunks no consumer claimed, when exactly that many are left.
    """
    assigned: list[int | None] = [None] * len(node.outputs)
    positions: dict[int, list[int]] = {}
    consumers: dict[int, Any] = {}
    for pos, out in enumerate(node.outputs):
        positions.setdefault(id(out), []).append(pos)
        consumers[id(out)] = out
    claimed: set[int] = set()
    for key, pos_list in positions.items():
        nrs = [nr for nr in _output_nrs(node, consumers[key]) if nr < n_chunks]
        for pos, nr in zip(pos_list, nrs):
            assigned[pos] = nr
            claimed.add(nr)
    open_positions = [pos for pos, chunk in enumerate(assigned) if chunk is None]
    unclaimed = [c for c in range(n_chunks) if c not in claimed]
    if open_positions and len(open_positions) == len(unclaimed):
        for pos, chunk in zip(open_positions, unclaimed):
            assigned[pos] = chunk
    return assigned


def _set_chunk_mappings(node: Any, offsets: list[list[int] | None]) -> None:
    """Install split-style mappings between ``node`` and each entry of its outputs (``None`` blocks the edge).

    The k-th occurrence of a consumer in ``node.outputs`` gets the k-th dependency between the two nodes, in
    both directions.
    """
    seen: dict[int, int] = {}
    for out_node, offset in zip(node.outputs, offsets):
        offset = offset if offset is not None else [0]  # a one-element offset maps to nothing (guarded)
        k = seen.get(id(out_node), 0)
        seen[id(out_node)] = k + 1
        for a, b, reverse in ((node, out_node, False), (out_node, node, True)):
            deps = [dep for dep in a.dependencies if dep.target is b]
            if k < len(deps):
                deps[k].index_mapping[0] = SplitMapping(offset=list(offset), reverse=reverse)


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
    dim = dim - 2**64 if dim >= 2**63 else dim
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


def _split_chunk_size(graph: Any, split_node: Any, consumer: Any, occurrence: int | None = None) -> int | None:
    """Width of the chunk of ``split_node`` that ``consumer`` reads (``None`` when unknown or ambiguous).

    A consumer reading several chunks (``cat(x.chunk(2))``) lists the split once per chunk: ``occurrence`` says
    which of its reads is meant (without it, several reads are ambiguous).
    """
    reads = _output_nrs(split_node, consumer)
    if occurrence is not None and len(reads) > 1:
        reads = reads[occurrence : occurrence + 1]
    if len(reads) != 1:
        return None
    module = split_node.module
    sizes = module.split_sizes if split_node in graph._sized_splits else _channel_split_sizes(split_node, graph)
    nr = reads[0]
    return int(sizes[nr]) if sizes is not None and nr < len(sizes) else None


def _slice_width(graph: Any, node: Any) -> int | None:
    """Channels a channel slice keeps (``None`` when it slices another dim or the sizes are unknown)."""
    if not _is_channel_slice(graph, node):
        return None
    sizes, module = node.grad_fn._saved_self_sym_sizes, node.module
    total, start = int(sizes[_saved_dim(node.grad_fn, len(sizes))]), int(module.start)
    if start < 0:
        return None  # torch-pruning's slice mapping assumes a non-negative start
    return len(range(start, min(int(module.end), total), int(module.step)))


def _concat_input_width(graph: Any, in_node: Any, consumer: Any, occurrence: int = 0) -> int | None:
    """Width of one concat input: a split chunk, a channel slice, or an element-wise op reading one of them.

    ``occurrence``: which listing of ``in_node`` among the concat's inputs (a split feeding it several chunks).
    """
    if in_node.type == ops.OPTYPE.SPLIT:
        return _split_chunk_size(graph, in_node, consumer, occurrence)
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
                if dep.target is target and not any(dep is d for d in addressed):
                    dep.index_mapping[1] = ConcatMapping(offset=offsets[i : i + 2], reverse=reverse)
                    addressed.append(dep)
                    break
