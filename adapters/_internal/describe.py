"""Describing a model for pruning: pick its model adapter, trace it once, assemble the :class:`PruningSpec`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..registry import AdapterContext, ModelAdapter, model_adapters
from ..spec import PruningSpec, SpecPart, merge_parts
from .generic import describe_modules
from .opaque import describe_opaque_parameters, describe_tied_parameters, unused_parameters
from .tracing import Trace, input_producers, trace_outputs

__all__ = ["build_spec", "pick_adapter", "reference_forward"]


def pick_adapter(model: nn.Module) -> ModelAdapter | None:
    """The first registered model adapter that detects ``model`` (``None``: the generic description only)."""
    for adapter in model_adapters():
        if adapter.detect(model):
            return adapter
    return None


def _describe_inputs(example_inputs: Any) -> str:
    if isinstance(example_inputs, torch.Tensor):
        return f"of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, dict):
        return "with keys " + ", ".join(map(str, example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return f"({type(example_inputs).__name__} of {len(example_inputs)})"
    return f"of type {type(example_inputs).__name__}"


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (Python, CUDA, or the CPU allocator's ``RuntimeError``)."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def reference_forward(
    model: nn.Module, example_inputs: Any, select: Callable[[Any], Any] | None
) -> tuple[bool | None, Trace]:
    """Trace the unpruned model once; pick the calling convention; raise ValueError when inputs do not fit.

    ``select`` picks the predictions out of the output (``ModelAdapter.outputs``; ``None``: all of it).
    """
    styles: tuple[bool | None, ...] = (True, False) if isinstance(example_inputs, (tuple, list)) else (None,)
    error: Exception | None = None
    for unpack in styles:
        try:
            return unpack, trace_outputs(model, example_inputs, unpack=unpack, select=select)
        except Exception as err:
            if _out_of_memory(err):
                raise  # not a problem with the inputs
            error = error or err
    raise ValueError(
        f"example_inputs {_describe_inputs(example_inputs)} do not run through {type(model).__name__}: "
        f"{type(error).__name__}: {error}"
    )


def build_spec(model: nn.Module, example_inputs: Any, unpack: bool | None, trace: Trace, *,
               freeze_unhandled: bool, adapter: ModelAdapter | None) -> PruningSpec:
    """Every adapter's part for ``model``, merged into one frozen spec.

    The parts: output layers, the model adapter, module adapters, tied, opaque and unused parameters, pinned
    inputs.
    """
    source = adapter.source if adapter is not None else "generic"
    names = {m: n for n, m in model.named_modules()}
    ctx = AdapterContext(model=model, names=names, source=source)
    out_layers = trace.output_layers
    parts = [
        SpecPart(
            ignored_layers=list(out_layers),
            notes=[f"output layers kept: {', '.join(names.get(m, '?') for m in out_layers)}"] if out_layers else [],
        )
    ]
    if adapter is not None:
        parts.append(adapter.describe(model, ctx))
    parts.extend(describe_modules(model, ctx, freeze_unhandled=freeze_unhandled))
    parts.extend(describe_tied_parameters(model))
    parts.extend(describe_opaque_parameters(model, trace.opaque))
    parts.extend(unused_parameters(model, trace.used))
    pinned = [m for part in parts for m in part.pinned_inputs]
    if pinned:
        producers = input_producers(model, pinned, example_inputs, unpack=unpack)
        parts.append(SpecPart(ignored_layers=producers, notes=[f"inputs pinned for {len(pinned)} modules"]))
    handled = {i for part in parts for i in part.handled}
    parts[0].unhandled.extend(
        f"{names.get(m, '?')} ({type(m).__name__}): weight used functionally, invisible to torch-pruning"
        for m in trace.functional
        if id(m) not in handled
    )
    check_shape = adapter.check_output_shape(model) if adapter is not None else True
    select = adapter.outputs if adapter is not None else None
    return merge_parts(parts, model_class=type(model).__name__, source=source, check_output_shape=check_shape,
                       select_outputs=select)
