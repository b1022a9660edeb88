"""Calling a model and tracing one forward pass: the one home of both.

- :func:`run_model` (from :mod:`orthoreg_tp._inputs`) calls a model on a tensor, a tuple/list or a dict.
- :func:`walk_graph` visits the autograd graph behind some outputs; :func:`trace_outputs` runs one
  autograd-enabled forward pass and describes it (:class:`Trace`: outputs, MACs per sample, output layers,
  layers used functionally, parameters entering matrix products); :func:`input_producers` finds the layers
  whose outputs a set of modules reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from orthoreg_tp._inputs import batch_size, call_style, flatten_tensors, run_model
from orthoreg_tp._state import requires_grad_all

from .autograd import structure_only, walk_graph
from .layers import LAYER_TYPES
from .opaque import opaque_parameter_uses

__all__ = [
    "Recording",
    "Trace",
    "batch_size",
    "call_style",
    "find_output_layers",
    "flatten_tensors",
    "input_producers",
    "layer_macs",
    "run_model",
    "trace_outputs",
]


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
    for fn in walk_graph(outputs, lambda f: f not in grad_fn_to_layer and type(f).__name__ != "AccumulateGrad"):
        layer = grad_fn_to_layer.get(fn)
        if layer is not None and all(layer is not f for f in found):
            found.append(layer)
    return found


def _used_parameters(outputs: Iterable[torch.Tensor]) -> set[int]:
    """Ids of the leaf tensors (parameters) the outputs' autograd graph reads."""
    variables = (getattr(fn, "variable", None) for fn in walk_graph(outputs, lambda f: True))
    return {id(v) for v in variables if v is not None}


@dataclass(frozen=True)
class Recording:
    """One forward pass as torch-pruning's graph tracer would see it, to build the dependency graph without another.

    Attributes:
        output: The model's raw output (its autograd graph recorded without activations).
        calls: ``(module, grad_fn of its first output, a Linear with a 3-D output)`` for every module call, in the
            order the forward hooks fired.
    """

    output: Any
    calls: tuple[tuple[nn.Module, Any, bool], ...]


@dataclass(frozen=True)
class Trace:
    """What one autograd-enabled forward pass tells about a model.

    Attributes:
        outputs: The output tensors, detached.
        macs: Conv/linear/MHA multiply-accumulates per sample (see :func:`layer_macs`, :func:`batch_size`).
        output_layers: Layers whose outputs reach a model output directly (see :func:`find_output_layers`).
        functional: Conv/linear layers whose weights the graph uses without calling the layer
            (``F.linear(x, layer.weight)``), which torch-pruning cannot see.
        used: Ids of the parameters the pass reads.
        opaque: ``{id(parameter): op}`` for parameters that enter a matrix product directly
            (see :func:`~orthoreg_tp.adapters.opaque.opaque_parameter_uses`).
        recording: The pass as the dependency graph's tracer sees it (:class:`Recording`).
    """

    outputs: tuple[torch.Tensor, ...]
    macs: int
    output_layers: list[Any]
    functional: list[nn.Module]
    opaque: dict[int, str] = field(default_factory=dict)
    used: frozenset[int] = frozenset()
    recording: Recording | None = field(default=None, repr=False, compare=False)


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
    calls: list[tuple[nn.Module, Any, bool]] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        fired.add(id(module))
        macs[0] += layer_macs(module, inputs, output)
        first = flatten_tensors(output)
        if first and first[0].grad_fn is not None:
            grad_fn_to_layer[first[0].grad_fn] = module

    def record(module: nn.Module, inputs: Any, output: Any) -> None:  # what torch-pruning's tracer records
        first = output[0] if isinstance(output, tuple) and output else output
        first = first.data if isinstance(first, nn.utils.rnn.PackedSequence) else first
        shape = getattr(output, "shape", None)
        linear_3d = isinstance(module, nn.Linear) and shape is not None and len(shape) == 3
        calls.append((module, getattr(first, "grad_fn", None), linear_3d))

    def reset() -> None:
        grad_fn_to_layer.clear(), fired.clear(), calls.clear()
        macs[0] = 0

    layers = [m for m in model.modules() if isinstance(m, LAYER_TYPES)]
    handles = [m.register_forward_hook(hook) for m in layers]
    handles += [m.register_forward_hook(record) for m in model.modules()]
    try:
        out = _graph_forward(model, example_inputs, unpack, reset=reset)
    finally:
        for h in handles:
            h.remove()
    tensors = flatten_tensors(out)
    kept = flatten_tensors(select(out)) if select is not None else tensors
    used = _used_parameters(tensors)
    functional = [
        m for m in layers if id(m) not in fired and any(id(p) in used for p in m.parameters(recurse=False))
    ]
    return Trace(
        outputs=tuple(t.detach() for t in kept),
        macs=macs[0] // batch_size(example_inputs),
        output_layers=find_output_layers(model, kept, grad_fn_to_layer),
        functional=functional,
        opaque=opaque_parameter_uses(tensors),
        used=frozenset(used),
        recording=Recording(out, tuple(calls)),
    )


def _graph_forward(model: nn.Module, example_inputs: Any, unpack: bool | None, reset: Callable[[], Any]) -> Any:
    """The model's output with autograd on, its graph recorded without the activations (:func:`structure_only`).

    A forward that fails that way (one that differentiates inside, say) runs again with the activations kept,
    after ``reset()`` cleared what the hooks recorded.
    """
    with requires_grad_all(model), torch.enable_grad():
        try:
            with structure_only():
                return run_model(model, example_inputs, unpack=unpack)
        except Exception:
            reset()
        return run_model(model, example_inputs, unpack=unpack)


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
    try:
        _graph_forward(model, example_inputs, unpack, reset=lambda: (grad_fn_to_layer.clear(), inputs.clear()))
    except Exception:
        pass  # the model may be mid-failure; the inputs seen before the failure still count
    finally:
        for h in handles:
            h.remove()
    found: list[nn.Module] = []
    for module in targets:
        inside = {id(m) for m in module.modules()}
        mapping = {fn: layer for fn, layer in grad_fn_to_layer.items() if id(layer) not in inside}
        for layer in find_output_layers(model, inputs.get(id(module), []), mapping):
            if all(layer is not f for f in found):
                found.append(layer)
    return found
