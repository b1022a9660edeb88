"""The frozen description of how to prune one model: :class:`PruningSpec` and its building blocks.

Adapters look at modules and return :class:`SpecPart` objects (data, no side effects); :func:`merge_parts`
folds them into one :class:`PruningSpec`, which turns into ``tp.pruner.MetaPruner`` keyword arguments and,
after pruning, applies the collected :class:`Fixup` callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch.nn as nn

from orthoreg_tp._inputs import run_model

__all__ = ["Fixup", "FixupContext", "PruningSpec", "SpecPart", "merge_parts"]


class FixupContext:
    """What a fix-up may ask about the pruning that just happened.

    Args:
        num_heads: The head-count mapping handed to (and updated by) the pruner, keyed by the qkv/q layer.
    """

    def __init__(self, num_heads: Mapping[nn.Module, int]) -> None:
        self._num_heads = num_heads

    def heads(self, layer: nn.Module, default: int) -> int:
        """Current head count of an attention projection ``layer`` (``default`` when it was not registered)."""
        return int(self._num_heads.get(layer, default))


@dataclass(frozen=True)
class Fixup:
    """A post-prune repair of one module's Python attributes (head counts, cached shapes, ...).

    Attributes:
        name: Qualified name of the module in the model (``""`` for the model itself); resolved again at
            :meth:`PruningSpec.finalize` time, so a fix-up also works on a deep copy of the model.
        description: Human-readable summary, used in error messages.
        fn: ``fn(module, ctx)`` updates ``module`` in place; ``ctx`` is a :class:`FixupContext`.
    """

    name: str
    description: str
    fn: Callable[[nn.Module, FixupContext], None]


@dataclass
class SpecPart:
    """One adapter's contribution to a :class:`PruningSpec` (mutable while it is being built)."""

    ignored_layers: list[nn.Module] = field(default_factory=list)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    in_channel_groups: dict[nn.Module, int] = field(default_factory=dict)  # input chunks pruned in lockstep
    out_channel_groups: dict[nn.Module, int] = field(default_factory=dict)  # chunks pruned in lockstep
    unwrapped_parameters: list[tuple[nn.Parameter, int]] = field(default_factory=list)
    round_to: set[int] = field(default_factory=set)
    customized_pruners: dict[type, Any] = field(default_factory=dict)
    fixups: list[Fixup] = field(default_factory=list)
    unhandled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    handled: set[int] = field(default_factory=set)  # ids of modules this part fully accounts for
    pinned_inputs: list[nn.Module] = field(default_factory=list)  # modules whose input width must not change
    unused: list[str] = field(default_factory=list)  # "module (N parameters)" the traced forward never reads
    # (object, attribute, value) set only while torch-pruning traces the model (e.g. fused_attn=False)
    trace_attrs: list[tuple[Any, str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class PruningSpec:
    """How to prune one model with torch-pruning, and how to repair it afterwards.

    Built by :func:`orthoreg_tp.adapters.prepare`; immutable. ``pruner_kwargs()`` hands out fresh containers
    each call because ``MetaPruner`` mutates ``num_heads`` in place when it removes whole heads.

    Attributes:
        model_class: Class name of the model, for messages.
        source: ``"timm"``, ``"torchvision"`` or ``"generic"``.
        ignored_layers: Layers whose outputs are kept (classifier heads, frozen attention internals).
        num_heads: Head count of each attention projection (fused qkv or separate q/k/v layers).
        in_channel_groups: Layers whose input is ``n`` equal chunks that must stay equal (a ``torch.split`` by a
            size fixed at construction); every group reaching that input prunes the same positions in each chunk.
        out_channel_groups: Layers whose output is ``n`` equal chunks that index the same channels (a gate and
            its value: ``a * b`` after a split); torch-pruning ranks the chunks together and prunes the same
            positions in each. Without it, a group coupled to itself loses up to twice the channels it ranks.
        unwrapped_parameters: ``(parameter, dim)`` pairs for tokens, position embeddings, layer-scale gammas
            and relative-position tables.
        round_to: Channel multiple torch-pruning keeps (head counts, group multiples), or ``None``.
        customized_pruners: ``{module class: tp.pruner.BasePruningFunc}`` for layers torch-pruning cannot trace.
        fixups: Post-prune repairs, applied in order by :meth:`finalize`.
        unhandled: ``"layer: reason"`` for every layer no adapter could reason about (kept unpruned).
        notes: Other decisions worth telling the user.
        check_output_shape: Whether verification requires every output tensor to keep its shape (off for
            detection models whose number of boxes depends on the weights).
        trace_attrs: ``(object, attribute, value)`` triples applied only while torch-pruning traces the model
            (and restored right after): e.g. ``fused_attn=False`` on attention blocks, so that the traced graph
            runs through the explicit ``q @ k.T`` / ``attn @ v`` products torch-pruning follows, instead of a
            fused kernel it cannot see through. Handed to the pruner as its ``forward_fn``.
        select_outputs: Picks the predictions out of the model's output (see ``ModelAdapter.outputs``);
            ``None``: every output tensor.
        unused: ``"module (N parameters)"`` for every block whose parameters the traced forward never reads
            (a branch the example inputs or the eval mode skip); torch-pruning cannot see them, so they are not
            pruned.

    Example:
        >>> import torch, torch_pruning as tp, torchvision
        >>> from orthoreg_tp.adapters import prepare
        >>> model, x = torchvision.models.resnet18(weights=None), torch.randn(1, 3, 32, 32)
        >>> spec = prepare(model, x)
        >>> imp = tp.importance.GroupMagnitudeImportance()
        >>> pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, **spec.pruner_kwargs())
        >>> pruner.step(); spec.finalize(model)
    """

    model_class: str
    source: str
    ignored_layers: tuple[nn.Module, ...] = ()
    num_heads: Mapping[nn.Module, int] = field(default_factory=lambda: MappingProxyType({}))
    in_channel_groups: Mapping[nn.Module, int] = field(default_factory=lambda: MappingProxyType({}))
    out_channel_groups: Mapping[nn.Module, int] = field(default_factory=lambda: MappingProxyType({}))
    unwrapped_parameters: tuple[tuple[nn.Parameter, int], ...] = ()
    round_to: int | None = None
    customized_pruners: Mapping[type, Any] = field(default_factory=lambda: MappingProxyType({}))
    fixups: tuple[Fixup, ...] = ()
    unhandled: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    check_output_shape: bool = True
    trace_attrs: tuple[tuple[Any, str, Any], ...] = ()
    select_outputs: Callable[[Any], Any] | None = None
    unused: tuple[str, ...] = ()
    # The num_heads dict most recently handed to a pruner (it is updated in place by head pruning).
    _issued_heads: list[dict[nn.Module, int]] = field(default_factory=list, repr=False, compare=False)

    def pruner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``tp.pruner.MetaPruner`` (fresh containers on every call).

        Returns:
            ``ignored_layers``, ``num_heads``, ``in_channel_groups``, ``out_channel_groups``,
            ``unwrapped_parameters``, ``round_to`` and ``customized_pruners``, plus ``forward_fn`` when the spec
            has :attr:`trace_attrs`; merge them with your own (``ignored_layers`` lists may be concatenated).
        """
        heads = dict(self.num_heads)
        self._issued_heads[:] = [heads]
        extra: dict[str, Any] = {"forward_fn": self.trace_forward} if self.trace_attrs else {}
        return {
            **extra,
            "ignored_layers": list(self.ignored_layers),
            "num_heads": heads,
            "in_channel_groups": dict(self.in_channel_groups),
            "out_channel_groups": dict(self.out_channel_groups),
            "unwrapped_parameters": list(self.unwrapped_parameters),
            "round_to": self.round_to,
            "customized_pruners": dict(self.customized_pruners),
        }

    def trace_forward(self, model: nn.Module, example_inputs: Any) -> Any:
        """Run ``model`` on ``example_inputs`` with :attr:`trace_attrs` applied (a torch-pruning ``forward_fn``).

        The attributes are restored when the call returns or raises. A tuple/list of inputs is unpacked when the
        model accepts that, else passed whole (as :func:`orthoreg_tp.adapters.prepare` decides).

        Example:
            >>> import torch, torch.nn as nn
            >>> layer = nn.Linear(2, 2)
            >>> layer.flag = True
            >>> spec = merge_parts([SpecPart(trace_attrs=[(layer, "flag", False)])], model_class="L", source="generic")
            >>> out = spec.trace_forward(layer, torch.zeros(1, 2))
            >>> layer.flag
            True
        """
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in self.trace_attrs]
        try:
            for obj, attr, value in self.trace_attrs:
                setattr(obj, attr, value)
            return run_model(model, example_inputs)
        finally:
            for obj, attr, value in reversed(saved):
                setattr(obj, attr, value)

    def finalize(self, model: nn.Module, pruner: Any = None) -> None:
        """Apply the post-prune fix-ups to ``model`` in place.

        Args:
            model: The pruned model (the one passed to :func:`prepare`, or a deep copy of it).
            pruner: The pruner that pruned it; its ``num_heads`` tells which heads survived. Defaults to the
                mapping returned by the latest :meth:`pruner_kwargs` call.

        Raises:
            FixupError: A fix-up failed; the message names the module and the fix-up.
        """
        if pruner is not None and hasattr(pruner, "num_heads"):
            heads: Mapping[nn.Module, int] = pruner.num_heads
        else:
            heads = self._issued_heads[0] if self._issued_heads else self.num_heads
        ctx = FixupContext(heads)
        for fix in self.fixups:
            module = model.get_submodule(fix.name) if fix.name else model
            try:
                fix.fn(module, ctx)
            except Exception as exc:  # re-raised with the layer named
                raise FixupError(
                    f"{type(model).__name__}: fix-up {fix.description!r} failed on layer "
                    f"{fix.name or '<model>'} ({type(module).__name__}): {exc}",
                    fix.name,
                ) from exc

    def summary(self) -> dict[str, Any]:
        """JSON-friendly counts and messages (for reports and logs)."""
        return {
            "model_class": self.model_class,
            "source": self.source,
            "ignored_layers": len(self.ignored_layers),
            "attention_layers": len(self.num_heads),
            "channel_groups": len(self.out_channel_groups) + len(self.in_channel_groups),
            "unwrapped_parameters": len(self.unwrapped_parameters),
            "round_to": self.round_to,
            "customized_pruners": sorted(c.__name__ for c in self.customized_pruners),
            "fixups": len(self.fixups),
            "trace_attrs": len(self.trace_attrs),
            "unhandled": list(self.unhandled),
            "notes": list(self.notes),
            "unused": list(self.unused),
        }


class FixupError(RuntimeError):
    """A post-prune fix-up could not be applied; ``layer`` is the module's qualified name."""

    def __init__(self, message: str, layer: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer


def _dedup(items: Iterable[Any]) -> list[Any]:
    seen: set[int] = set()
    out = []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


def merge_parts(
    parts: Iterable[SpecPart],
    *,
    model_class: str,
    source: str,
    check_output_shape: bool = True,
    select_outputs: Callable[[Any], Any] | None = None,
) -> PruningSpec:
    """Fold adapter contributions into one frozen :class:`PruningSpec`.

    ``round_to`` becomes the least common multiple of all requested multiples; a parameter listed twice keeps
    its first dimension; duplicated layers and fix-ups (same module name and description) are dropped.
    """
    ignored: list[nn.Module] = []
    heads: dict[nn.Module, int] = {}
    in_groups: dict[nn.Module, int] = {}
    groups: dict[nn.Module, int] = {}
    unwrapped: dict[int, tuple[nn.Parameter, int]] = {}
    rounds: set[int] = set()
    pruners: dict[type, Any] = {}
    fixups: dict[tuple[str, str], Fixup] = {}
    unhandled: list[str] = []
    notes: list[str] = []
    unused: list[str] = []
    trace_attrs: dict[tuple[int, str], tuple[Any, str, Any]] = {}
    for part in parts:
        for obj, attr, value in part.trace_attrs:
            trace_attrs.setdefault((id(obj), attr), (obj, attr, value))
        ignored.extend(part.ignored_layers)
        heads.update(part.num_heads)
        in_groups.update(part.in_channel_groups)
        groups.update(part.out_channel_groups)
        for param, dim in part.unwrapped_parameters:
            unwrapped.setdefault(id(param), (param, dim))
        rounds |= {r for r in part.round_to if r > 1}
        pruners.update(part.customized_pruners)
        for fix in part.fixups:
            fixups.setdefault((fix.name, fix.description), fix)
        unhandled.extend(part.unhandled)
        notes.extend(part.notes)
        unused.extend(part.unused)
    round_to = math.lcm(*rounds) if rounds else None
    return PruningSpec(
        model_class=model_class,
        source=source,
        ignored_layers=tuple(_dedup(ignored)),
        num_heads=MappingProxyType(heads),
        in_channel_groups=MappingProxyType(in_groups),
        out_channel_groups=MappingProxyType(groups),
        unwrapped_parameters=tuple(unwrapped.values()),
        round_to=round_to,
        customized_pruners=MappingProxyType(pruners),
        fixups=tuple(fixups.values()),
        unhandled=tuple(dict.fromkeys(unhandled)),
        notes=tuple(dict.fromkeys(notes)),
        check_output_shape=check_output_shape,
        trace_attrs=tuple(trace_attrs.values()),
        select_outputs=select_outputs,
        unused=tuple(dict.fromkeys(unused)),
    )
