"""Keep an optimizer working across a prune: the kept entries of every pruned parameter, and its state sliced.

torch-pruning replaces each pruned ``nn.Parameter`` with a new, smaller one; an optimizer built before the prune
keeps updating the old objects, which the model no longer uses. :func:`remap_optimizer_` points the optimizer's
param groups at the new parameters and slices each surviving parameter's state (momentum, Adam moments) to the
kept entries, which :func:`kept_flat_indices` finds by replaying the pruning on a copy whose parameters hold their
own flat indices. The optimizer object stays the same, so a learning-rate scheduler bound to it keeps working.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["kept_flat_indices", "map_tensors", "remap_optimizer_", "to_float64"]


def map_tensors(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``inputs`` (a tensor, or nested tuples/lists/dicts of them) with ``fn`` applied to every tensor.

    Example:
        >>> map_tensors({"x": torch.zeros(2), "n": 3}, lambda t: t + 1)
        {'x': tensor([1., 1.]), 'n': 3}
    """
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: map_tensors(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(v, fn) for v in inputs)
    return inputs


def to_float64(inputs: Any) -> Any:
    """``inputs`` (a tensor, or nested tuples/lists/dicts of them) with every floating tensor cast to float64.

    Example:
        >>> to_float64({"x": torch.zeros(1), "ids": torch.zeros(1, dtype=torch.long)})["x"].dtype
        torch.float64
    """
    return map_tensors(inputs, lambda t: t.double() if t.is_floating_point() else t)


def kept_flat_indices(model: nn.Module, example_inputs: Any, history: Sequence[Sequence[Any]]) -> dict[str, Tensor]:
    """For every parameter a pruning ``history`` shrinks: the flat indices (into the unpruned tensor) it keeps.

    A deep copy of the unpruned ``model`` is cast to float64 (exact for indices below 2**53), each parameter is
    filled with ``arange(numel)``, the history is replayed on it with :func:`orthoreg_tp.adapters.replay`, and the
    surviving values are read back: ``pruned.flatten() == unpruned.flatten()[kept]``. Works for any slicing
    torch-pruning does (output channels, input channels, grouped and attention layers) without knowing which.

    Args:
        model: The model before the pruning (not modified).
        example_inputs: Inputs the pruning was traced with (floating tensors are cast to float64 here).
        history: ``PruneReport.history`` of the pruning.

    Returns:
        ``{parameter name: LongTensor of kept flat indices}`` for the parameters whose shape changed.

    Example:
        >>> from orthoreg_tp.adapters import prune
        >>> import torch_pruning as tp
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> x, before = torch.randn(1, 3, 4, 4), copy.deepcopy(model)
        >>> report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
        >>> kept = kept_flat_indices(before, x, report.history)
        >>> torch.equal(model[0].weight.flatten(), before[0].weight.flatten()[kept["0.weight"]])
        True
    """
    from ..adapters import replay

    shadow = copy.deepcopy(model).double()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in shadow.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float64, device=p.device).view_as(p))
    replay(shadow, to_float64(example_inputs), [list(h) for h in history])
    return {
        n: p.detach().flatten().round().long()
        for n, p in shadow.named_parameters()
        if n in shapes and p.shape != shapes[n]
    }


def remap_optimizer_(
    optimizer: torch.optim.Optimizer,
    old_params: Mapping[str, Tensor],
    model: nn.Module,
    kept: Mapping[str, Tensor],
) -> int:
    """Point ``optimizer`` at ``model``'s current parameters, slicing each pruned parameter's state, in place.

    Args:
        optimizer: The optimizer built over the model before pruning.
        old_params: ``dict(model.named_parameters())`` taken before the pruning.
        model: The pruned model (its parameter names are those of ``old_params``).
        kept: :func:`kept_flat_indices` of the pruning.

    Returns:
        How many parameters of the optimizer were replaced by new objects.

    A state tensor shaped like neither the old nor the new parameter (e.g. factored second moments) cannot be
    sliced: that parameter's state is dropped, with a warning, and starts afresh.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> old = dict(model.named_parameters())
        >>> model.weight = nn.Parameter(model.weight[:1].detach().clone())
        >>> remap_optimizer_(opt, old, model, {"weight": torch.tensor([0, 1, 2])})
        1
        >>> opt.param_groups[0]["params"][0] is model.weight
        True
    """
    new_params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in old_params.items()}
    replaced = 0
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            name = name_of.get(id(p))
            if name is None or name not in new_params or new_params[name] is p:
                continue
            new = new_params[name]
            state = optimizer.state.pop(p, None)
            sliced = _sliced_state(name, p, new, state, kept.get(name)) if state else {}
            if sliced:
                optimizer.state[new] = sliced
            group["params"][i] = new
            replaced += 1
    return replaced


def _sliced_state(name: str, old: Tensor, new: Tensor, state: dict, idx: Tensor | None) -> dict:
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape == new.shape:
            out[key] = value
        elif value.shape == old.shape and idx is not None and idx.numel() == new.numel():
            out[key] = value.flatten()[idx.to(value.device)].view(new.shape).clone()
        else:
            warnings.warn(
                f"optimizer state {key!r} of {name!r} has shape {tuple(value.shape)}, which cannot be sliced to "
                f"the pruned {tuple(new.shape)}: that parameter's optimizer state starts afresh",
                stacklevel=3,
            )
            return {}
    return out
