"""Model inputs: calling a model on a tensor, a tuple/list or a dict of inputs, and what the inputs hold.

The one home of the model call (:func:`run_model`) and of the batch size MACs are divided by (:func:`batch_size`),
used by the adapters, the latency timer and the tracing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["batch_size", "call_style", "flatten_tensors", "latency_inputs", "run_model"]


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


def batch_size(example_inputs: Any) -> int:
    """The batch size of ``example_inputs``: the first dimension of its first tensor (1 for a 0-d tensor).

    MACs are reported per sample (as torch-pruning's ``count_ops_and_params``, timm and fvcore report them):
    the hooks count the whole batch and the total is divided by this.

    Example:
        >>> batch_size({"pixel_values": torch.zeros(4, 3, 8, 8)}), batch_size([torch.zeros(2, 5)])
        (4, 2)
    """
    tensors = flatten_tensors(example_inputs)
    return max(int(tensors[0].shape[0]), 1) if tensors and tensors[0].dim() > 0 else 1


def latency_inputs(example_inputs: Any, batch_size: int | None) -> Any:
    """``example_inputs`` repeated along dim 0 to ``batch_size`` (tensor inputs only; ``None``: unchanged).

    Raises:
        ValueError: ``batch_size`` given for inputs that are not a tensor or a tuple/list of tensors.

    Example:
        >>> latency_inputs(torch.zeros(1, 3, 8, 8), 4).shape
        torch.Size([4, 3, 8, 8])
    """
    if batch_size is None:
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        reps = (-(-batch_size // example_inputs.shape[0]),) + (1,) * (example_inputs.dim() - 1)
        return example_inputs.repeat(*reps)[:batch_size]
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return type(example_inputs)(latency_inputs(t, batch_size) for t in example_inputs)
    raise ValueError(
        f"latency_batch_size needs tensor example inputs, got {type(example_inputs).__name__}; time the inputs as "
        "given (latency_batch_size=None) or pass a batch of the size to time"
    )
