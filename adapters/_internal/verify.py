"""Forward-pass verification of a pruned model, with MAC counting and failure localisation in one pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from orthoreg_tp._state import eval_mode

from .tracing import batch_size, flatten_tensors, layer_macs, run_model

__all__ = [
    "ForwardResult",
    "VerificationError",
    "checked_forward",
    "count_macs_params",
    "count_params",
    "layer_widths",
]


class VerificationError(RuntimeError):
    """The pruned model failed its forward check; ``layer`` names the culprit when it is known."""

    def __init__(self, reason: str, layer: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.layer = layer


@dataclass(frozen=True)
class ForwardResult:
    """Output tensors (detached) and multiply-accumulate count of one forward pass."""

    tensors: tuple[torch.Tensor, ...]
    macs: int


def checked_forward(
    model: nn.Module,
    example_inputs: Any,
    *,
    names: dict[nn.Module, str] | None = None,
    unpack: bool | None = None,
    select: Callable[[Any], Any] | None = None,
) -> ForwardResult:
    """Run ``model`` once under ``no_grad``, counting conv/linear MACs and naming the layer that fails.

    MACs follow torch-pruning's convention: conv, linear and ``nn.MultiheadAttention`` projections, counted
    from their output shapes, per sample (divided by the inputs' batch size); functional matmuls inside attention
    are not counted.

    ``select(output)`` picks the output tensors returned (all of them by default).

    Raises:
        VerificationError: The forward pass raised; ``layer`` is the innermost module that was running.
    """
    names = names if names is not None else {m: n for n, m in model.named_modules()}
    active: list[nn.Module] = []
    failed: list[nn.Module] = []
    macs = [0]

    def pre(module: nn.Module, _inputs: Any) -> None:
        active.append(module)

    def post(module: nn.Module, inputs: Any, output: Any) -> None:
        if active and active[-1] is module:
            active.pop()
        macs[0] += layer_macs(module, inputs, output)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            out = run_model(model, example_inputs, unpack=unpack)
    except Exception as exc:
        failed.extend(active)
        layer = names.get(failed[-1]) if failed else None
        culprit = f"{layer} ({type(failed[-1]).__name__})" if failed else "<model>"
        raise VerificationError(f"forward failed in {culprit}: {type(exc).__name__}: {exc}", layer) from exc
    finally:
        for h in handles:
            h.remove()
    out = select(out) if select is not None else out
    return ForwardResult(tuple(t.detach() for t in flatten_tensors(out)), macs[0] // batch_size(example_inputs))


def first_non_finite_layer(
    model: nn.Module, example_inputs: Any, names: dict[nn.Module, str], *, unpack: bool | None = None
) -> str | None:
    """Name of the first leaf module whose output has a NaN or Inf (``None`` when none does)."""
    found: list[str] = []

    def post(module: nn.Module, _inputs: Any, output: Any) -> None:
        if not found and any(
            t.is_floating_point() and not torch.isfinite(t).all() for t in flatten_tensors(output)
        ):
            found.append(names.get(module, type(module).__name__))

    handles = [m.register_forward_hook(post) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            run_model(model, example_inputs, unpack=unpack)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def compare_outputs(
    reference: tuple[torch.Tensor, ...], pruned: tuple[torch.Tensor, ...], *, check_shape: bool
) -> str | None:
    """Why ``pruned`` outputs are unacceptable next to ``reference`` ones (``None`` when they are fine)."""
    if len(reference) != len(pruned):
        return f"the model returns {len(pruned)} tensors instead of {len(reference)}"
    for i, (ref, new) in enumerate(zip(reference, pruned)):
        if check_shape and ref.shape != new.shape:
            return f"output {i} has shape {tuple(new.shape)} instead of {tuple(ref.shape)}"
        if new.is_floating_point() and not torch.isfinite(new).all() and torch.isfinite(ref).all():
            return f"output {i} has non-finite values"
    return None


def count_macs_params(model: nn.Module, example_inputs: Any, *, unpack: bool | None = None) -> tuple[int, int]:
    """``(MACs per sample, parameters)`` of ``model`` on ``example_inputs``: the project's one counter.

    The same figures :func:`~orthoreg_tp.adapters.prune` reports (:func:`checked_forward`'s convention: conv,
    linear and ``nn.MultiheadAttention`` projections), in eval mode; every module's train/eval mode is restored.

    Example:
        >>> count_macs_params(nn.Linear(4, 2), torch.zeros(1, 4)), count_macs_params(nn.Linear(4, 2), torch.zeros(3, 4))
        ((8, 10), (8, 10))
    """
    with eval_mode(model):
        macs = checked_forward(model, example_inputs, unpack=unpack).macs
    return macs, count_params(model)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv, linear and ``MultiheadAttention`` layer, by qualified name."""
    widths: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
        elif isinstance(m, nn.MultiheadAttention):
            widths[name] = m.embed_dim
    return widths
