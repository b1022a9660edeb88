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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .opaque import opaque_parameter_uses
from .registry import AdapterContext, find_module_adapters, register_module_adapter
from .spec import Fixup, FixupContext, SpecPart

__all__ = [
    "LAYER_TYPES",
    "KNOWN_TYPES",
    "describe_modules",
    "frozen_block",
    "opaque_attention",
    "find_output_layers",
    "flatten_tensors",
    "run_model",
]

#: Layers that produce channels (the roots of torch-pruning groups).
LAYER_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.LSTM,
)
#: Module types torch-pruning prunes by itself (parameters and size attributes).
KNOWN_TYPES: tuple[type, ...] = LAYER_TYPES + (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
)
# Size attributes that a custom module may cache; synced from its first 1-D parameter after pruning.
_SIZE_ATTRS = ("normalized_shape", "num_features", "num_channels", "channels", "dim", "embed_dim", "hidden_size")


def run_model(model: nn.Module, example_inputs: Any, *, unpack: bool | None = None) -> Any:
    """Call ``model`` on ``example_inputs``: a dict as keyword arguments, a tuple/list as positional ones.

    Args:
        model: The model.
        example_inputs: A tensor, a dict, or a tuple/list.
        unpack: For a tuple/list, whether to unpack it (``model(*x)``) or pass it whole (``model(x)``, as
            torchvision detection models expect). ``None`` tries unpacking first, like torch-pruning does.
    """
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if unpack is None:
            try:
                return model(*example_inputs)
            except Exception:
                return model(example_inputs)
        return model(*example_inputs) if unpack else model(example_inputs)
    return model(example_inputs)


def call_style(model: nn.Module, example_inputs: Any) -> bool | None:
    """Decide once whether a tuple/list of inputs must be unpacked (``None`` for tensors and dicts)."""
    if not isinstance(example_inputs, (tuple, list)):
        return None
    try:
        with torch.no_grad():
            model(*example_inputs)
        return True
    except Exception:
        return False


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """All tensors in a nested output (tensors, tuples, lists, dicts, dataclass-like objects), in order."""
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            out.extend(flatten_tensors(value))
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            out.extend(flatten_tensors(value))
    return out


def _walk_graph(outputs: Iterable[torch.Tensor], descend: Callable[[Any], bool]) -> Iterator[Any]:
    """Each autograd node behind ``outputs`` once (depth first); ``descend(fn)`` says whether to go past it."""
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        yield fn
        if descend(fn):
            stack.extend(nxt for nxt, _ in getattr(fn, "next_functions", ()) if nxt is not None)


def find_output_layers(model: nn.Module, outputs: Iterable[torch.Tensor], grad_fn_to_layer: dict) -> list:
    """Layers whose outputs reach a model output without passing through another layer.

    Args:
        model: The model (only used for error messages).
        outputs: Output tensors of a forward pass run with autograd on.
        grad_fn_to_layer: ``{output.grad_fn: layer}`` recorded by forward hooks during that pass.

    Returns:
        The layers (modules or parameters) in discovery order.
    """
    found: list[Any] = []
    for fn in _walk_graph(outputs, lambda f: f not in grad_fn_to_layer and type(f).__name__ != "AccumulateGrad"):
        layer = grad_fn_to_layer.get(fn)
        if layer is not None and all(layer is not f for f in found):
            found.append(layer)
    return found


def _used_parameters(outputs: Iterable[torch.Tensor]) -> set[int]:
    """Ids of the leaf tensors (parameters) the outputs' autograd graph reads."""
    variables = (getattr(fn, "variable", None) for fn in _walk_graph(outputs, lambda f: True))
    return {id(v) for v in variables if v is not None}


@dataclass(frozen=True)
class Trace:
    """What one autograd-enabled forward pass tells about a model.

    Attributes:
        outputs: The output tensors, detached.
        macs: Conv/linear/MHA multiply-accumulates (see :func:`layer_macs`).
        output_layers: Layers whose outputs reach a model output directly (see :func:`find_output_layers`).
        functional: Conv/linear layers whose weights the graph uses without calling the layer
            (``F.linear(x, layer.weight)``), which torch-pruning cannot see.
        opaque: ``{id(parameter): op}`` for parameters that enter a matrix product directly
            (see :func:`~orthoreg_tp.adapters.opaque.opaque_parameter_uses`).
    """

    outputs: tuple[torch.Tensor, ...]
    macs: int
    output_layers: list[Any]
    functional: list[nn.Module]
    opaque: dict[int, str] = field(default_factory=dict)


def trace_outputs(
    model: nn.Module, example_inputs: Any, *, unpack: bool | None = None, select: Callable[[Any], Any] | None = None
) -> Trace:
    """Run one forward pass with autograd (exceptions propagate) and describe it as a :class:`Trace`.

    ``select(output)`` picks the outputs that count (:attr:`Trace.outputs`, :attr:`Trace.output_layers`); every
    output still counts for the parameters the pass uses.
    """
    grad_fn_to_layer: dict[Any, nn.Module] = {}
    fired: set[int] = set()
    macs = [0]

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        fired.add(id(module))
        macs[0] += layer_macs(module, inputs, output)
        first = flatten_tensors(output)
        if first and first[0].grad_fn is not None:
            grad_fn_to_layer[first[0].grad_fn] = module

    layers = [m for m in model.modules() if isinstance(m, LAYER_TYPES)]
    handles = [m.register_forward_hook(hook) for m in layers]
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = run_model(model, example_inputs, unpack=unpack)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    tensors = flatten_tensors(out)
    kept = flatten_tensors(select(out)) if select is not None else tensors
    used = _used_parameters(tensors)
    functional = [
        m for m in layers if id(m) not in fired and any(id(p) in used for p in m.parameters(recurse=False))
    ]
    return Trace(
        outputs=tuple(t.detach() for t in kept),
        macs=macs[0],
        output_layers=find_output_layers(model, kept, grad_fn_to_layer),
        functional=functional,
        opaque=opaque_parameter_uses(tensors),
    )


def layer_macs(module: nn.Module, inputs: tuple, output: Any) -> int:
    """Multiply-accumulates of one conv/linear/MHA call, from its output shape (0 for other modules)."""
    out = flatten_tensors(output)
    if not out:
        return 0
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return out[0].numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    if isinstance(module, nn.MultiheadAttention):
        x = flatten_tensors(inputs)
        tokens = x[0].numel() // max(x[0].shape[-1], 1) if x else 0
        return tokens * 4 * module.embed_dim * module.embed_dim
    return 0


def input_producers(
    model: nn.Module, modules: Iterable[nn.Module], example_inputs: Any, *, unpack: bool | None = None
) -> list[nn.Module]:
    """Layers or norms whose outputs reach the inputs of ``modules`` without passing through another of them.

    Ignoring them pins the channels those modules read (their groups become unprunable). One forward pass.
    """
    targets = list(modules)
    if not targets:
        return []
    producer_types = LAYER_TYPES + (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    grad_fn_to_layer: dict[Any, nn.Module] = {}
    inputs: dict[int, list[torch.Tensor]] = {}

    def hook(layer: nn.Module, _inputs: Any, output: Any) -> None:
        first = flatten_tensors(output)
        if first and first[0].grad_fn is not None:
            grad_fn_to_layer[first[0].grad_fn] = layer

    def pre(module: nn.Module, args: Any) -> None:
        if id(module) not in inputs:
            inputs[id(module)] = [t for t in flatten_tensors(list(args)) if t.grad_fn is not None]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, producer_types)]
    handles += [m.register_forward_pre_hook(pre) for m in targets]
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            run_model(model, example_inputs, unpack=unpack)
    except Exception:
        pass  # the model may be mid-failure; the inputs seen before the failure still count
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    found: list[nn.Module] = []
    for module in targets:
        inside = {id(m) for m in module.modules()}
        mapping = {fn: layer for fn, layer in grad_fn_to_layer.items() if id(layer) not in inside}
        for layer in find_output_layers(model, inputs.get(id(module), []), mapping):
            if all(layer is not f for f in found):
                found.append(layer)
    return found


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
