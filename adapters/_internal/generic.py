"""The generic adapter: what can be said about any ``nn.Module`` without knowing its library.

- Output layers (the classifier, detection/segmentation heads) are found by walking the autograd graph back
  from the model's outputs to the first channel-producing layers; their outputs are kept so that the output
  shape does not change.
- Parameters that sit directly on a module torch-pruning does not know (tokens, position embeddings, gammas)
  are listed as unwrapped parameters with an explicit dimension (:func:`channel_dim`: torch-pruning's default,
  the last non-singleton one, except dimension 1 for NCHW position embeddings), so the host's guess and
  warning are avoided.
- Modules that look like attention (a ``num_heads`` attribute) but have no registered adapter are reported
  in ``spec.unhandled`` and their projections are frozen, which keeps their head layout intact.
- Cached sizes on such modules (``normalized_shape``, ``num_features``, ``dim`` ...) are re-synced from their
  parameters after pruning.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable

import torch
import torch.nn as nn

from ..registry import AdapterContext, find_module_adapters, register_module_adapter
from ..spec import Fixup, FixupContext, SpecPart
from .layers import KNOWN_TYPES, LAYER_TYPES

__all__ = [
    "channel_dim",
    "describe_modules",
    "frozen_block",
    "looks_like_attention",
    "opaque_attention",
    "reads_input_width",
]

_SIZE_ATTRS = ("normalized_shape", "num_features", "num_channels", "channels", "dim", "embed_dim", "hidden_size")


def _last_non_singleton_dim(param: torch.Tensor) -> int | None:
    dims = [i for i, s in enumerate(param.shape) if s > 1]
    return dims[-1] if dims else None


def channel_dim(param: torch.Tensor) -> int | None:
    """The dimension of a free-standing parameter that follows the channels it is combined with.

    torch-pruning's default is the last non-singleton dimension: right for tokens and position embeddings
    ``(1, N, C)`` and gammas ``(C,)``, wrong for NCHW position embeddings ``(1, C, H, W)`` (Visformer, SAM2
    Hiera), for which dimension 1 is used.
    """
    if param.dim() == 4 and param.shape[0] == 1 and param.shape[1] > 1:
        return 1
    return _last_non_singleton_dim(param)


def _sync_sizes_fixup(name: str, module: nn.Module) -> Fixup | None:
    """Re-sync cached size attributes of a custom module with its first 1-D parameter."""
    params = [p for p in module._parameters.values() if p is not None and p.dim() == 1]
    if not params:
        return None
    size = params[0].numel()
    attrs = []
    for attr in _SIZE_ATTRS:
        value = getattr(module, attr, None)
        if value == size or value == (size,) or value == [size]:
            attrs.append(attr)
    if not attrs:
        return None

    def fn(mod: nn.Module, _ctx: FixupContext) -> None:
        new = next(p for p in mod._parameters.values() if p is not None and p.dim() == 1).numel()
        for attr in attrs:
            old = getattr(mod, attr)
            setattr(mod, attr, type(old)([new]) if isinstance(old, (tuple, list)) else new)

    return Fixup(name, f"sync {', '.join(attrs)} with parameter size", fn)


def _sync_from_input_fixup(name: str, module: nn.Module) -> Fixup | None:
    """Re-sync ``normalized_shape`` of a parameter-free custom norm (timm ``RmsNorm(affine=False)``, ...).

    torch-pruning passes channels through such a module without seeing it, and it has no parameter to read the
    new width from, so the fix-up installs a one-shot forward pre-hook: on the next call (``prune``'s
    verification, or your first forward) it sets ``normalized_shape`` to the input's trailing dims, then removes
    itself.
    """
    shape = getattr(module, "normalized_shape", None)
    if not isinstance(shape, (tuple, list, torch.Size)) or not shape or not all(isinstance(v, int) for v in shape):
        return None

    def fn(mod: nn.Module, _ctx: FixupContext) -> None:
        handle = None

        def sync(m: nn.Module, args: tuple) -> None:
            handle.remove()
            if args and isinstance(args[0], torch.Tensor):
                old = m.normalized_shape
                new = tuple(args[0].shape[-len(old):])
                m.normalized_shape = type(old)(new) if isinstance(old, (tuple, list)) else new

        handle = mod.register_forward_pre_hook(sync)

    return Fixup(name, "sync normalized_shape with its input on the next forward", fn)


_SHAPE_UNPACK = re.compile(r"((?:\w+\s*,\s*)+\w+)\s*=\s*[\w.]+\.(?:shape|size\(\))")


@functools.cache
def reads_input_width(cls: type) -> bool:
    """Whether ``cls.forward`` reshapes with a width unpacked from its input's shape (``B, N, C = x.shape``).

    Such attention blocks need their output width equal to their input width, so their heads cannot be kept
    while the stream around them shrinks. A heuristic on the source; ``False`` when it is unavailable.
    """
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    for match in _SHAPE_UNPACK.finditer(src):
        names = [n.strip() for n in match.group(1).split(",")]
        width = "C" if "C" in names else names[-1]  # the channel variable by convention, else the last one
        if width == "_":
            continue
        if re.search(rf"\.(?:reshape|view)\([^\n]*\b{re.escape(width)}\b", src) or re.search(
            rf"\b{re.escape(width)}\s*//\s*self\.num_heads", src
        ):
            return True
    return False


_HEAD_ATTRS = ("num_heads", "heads", "n_heads", "num_attention_heads")


def looks_like_attention(module: nn.Module) -> bool:
    """An integer head count (``num_heads``, ``heads``...) on a module that does not use ``nn.MultiheadAttention``."""
    if not any(type(getattr(module, a, None)) is int for a in _HEAD_ATTRS):
        return False
    if not any(isinstance(m, LAYER_TYPES) for m in module.modules()):
        return False  # no projections of its own
    return not any(isinstance(m, nn.MultiheadAttention) for m in module.modules())


def opaque_attention(module: nn.Module, why: str) -> SpecPart:
    """Keep the head layout of an attention block; its input and output widths stay prunable.

    Every conv/linear inside the block is frozen except the output projection(s) (``proj``, ``out_proj``,
    ``o_proj``, ``to_out``, ``proj_out``, else the last one defined); frozen layers' inputs still shrink.
    """
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LAYER_TYPES)]
    outs = [m for n, m in layers if n.split(".")[0] in ("proj", "out_proj", "o_proj", "to_out", "proj_out")]
    if not outs and layers:
        outs = [layers[-1][1]]
    return SpecPart(
        ignored_layers=[m for _, m in layers if all(m is not o for o in outs)],
        handled={id(m) for m in module.modules()},
        notes=[f"{type(module).__name__}: head layout kept ({why})"],
    )


def frozen_block(module: nn.Module, why: str, *, keep_input: bool = False) -> SpecPart:
    """Freeze every conv/linear output inside ``module``; its input may still shrink unless ``keep_input``.

    ``keep_input`` also pins the stream ``module`` reads, for blocks whose forward ties their width to it
    (a reshape back to the input width, a split by a width fixed at construction).
    """
    return SpecPart(
        ignored_layers=[m for m in module.modules() if isinstance(m, LAYER_TYPES)],
        handled={id(m) for m in module.modules()},
        notes=[f"{type(module).__name__}: frozen ({why})"],
        pinned_inputs=[module] if keep_input else [],
    )


def _claimed_inside(module: nn.Module, inner: list[nn.Module], claims: dict[int, list[nn.Module]]) -> bool:
    """Whether an adapter accounted for a submodule of ``module`` from inside ``module`` or from around it.

    A submodule shared with another block (CoaT's position encoding, one per stage) and claimed from that block
    does not count: ``module`` is still undescribed.
    """
    inner_ids = {id(m) for m in inner}
    for m in inner:
        for root in claims.get(id(m), ()):
            if id(root) in inner_ids or any(sub is module for sub in root.modules()):
                return True
    return False


def describe_modules(
    model: nn.Module,
    ctx: AdapterContext,
    *,
    freeze_unhandled: bool = True,
    on_adapter: Callable[[nn.Module, str], None] | None = None,
) -> list[SpecPart]:
    """Run the registered module adapters over ``model`` and describe the modules none of them handles.

    Args:
        model: The model.
        ctx: The adapter context.
        freeze_unhandled: Freeze the projections of attention-like modules without an adapter.
        on_adapter: Optional callback ``(module, name)`` for every module an adapter handled.

    Returns:
        One :class:`SpecPart` per contributing adapter plus one for the generic findings.
    """
    parts: list[SpecPart] = []
    handled: set[int] = set()
    claims: dict[int, list[nn.Module]] = {}  # id of a handled module -> the modules whose adapter claimed it
    generic = SpecPart()
    modules = list(model.named_modules())
    for name, module in modules:  # pass 1: registered adapters, outermost first
        if id(module) in handled:
            continue
        for adapter in find_module_adapters(module):
            part = adapter(module, name, ctx)
            if part is not None:
                parts.append(part)
                handled |= part.handled | {id(module)}
                for i in part.handled | {id(module)}:
                    claims.setdefault(i, []).append(module)
                if on_adapter is not None:
                    on_adapter(module, name)
                break
    custom = tuple({cls for part in parts for cls in part.customized_pruners})
    wrapped = {id(m) for outer in model.modules() if custom and isinstance(outer, custom) for m in outer.modules()}
    for name, module in modules:  # pass 2: what no adapter described
        if isinstance(module, KNOWN_TYPES) or id(module) in wrapped:
            continue
        own = [p for p in module._parameters.values() if p is not None]
        for param in own:  # adapters' own choices come first in merge_parts
            dim = channel_dim(param)
            if dim is not None:
                generic.unwrapped_parameters.append((param, dim))
        if id(module) in handled:
            continue
        if looks_like_attention(module):
            inner = [m for m in module.modules() if m is not module]
            if any(looks_like_attention(m) for m in inner) or _claimed_inside(module, inner, claims):
                continue  # the attention proper is a submodule
            frozen = reads_input_width(type(module))
            what = "heads and the stream it reads kept (reshapes with its input width)" if frozen else "heads kept"
            generic.unhandled.append(f"{name} ({type(module).__name__}): attention-like module without adapter; {what}")
            if freeze_unhandled:
                if frozen:
                    part = frozen_block(module, "no adapter; reshapes with its input width", keep_input=True)
                else:
                    part = opaque_attention(module, "no adapter")
                parts.append(part)
                handled |= part.handled
                for i in part.handled:
                    claims.setdefault(i, []).append(module)
            continue
        fix = _sync_sizes_fixup(name, module) if own else _sync_from_input_fixup(name, module)
        if fix is not None:
            generic.fixups.append(fix)
    parts.append(generic)
    return parts


@register_module_adapter(nn.LSTM)
def _lstm(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    # torch-pruning's LSTM pruner indexes weight_hh with the 2x hidden indices of a bidirectional output.
    if not module.bidirectional and module.num_layers == 1:
        return None
    return SpecPart(ignored_layers=[module], notes=[f"{name}: multi-layer/bidirectional LSTM hidden size kept"])
