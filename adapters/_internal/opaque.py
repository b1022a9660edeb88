"""Parameters the dependency graph cannot follow, and parameters shared by several modules.

torch-pruning treats every operation it does not know as element-wise. A parameter that enters a matrix
product directly (``torch.einsum("bchw,oc->bohw", x, self.weight)``, ``x @ self.proj``, ``F.linear(x, w)`` in a
custom module) is then "pruned" along a guessed dimension and coupled channel-for-channel with tensors of
another width; the failure surfaces later, at some unrelated BatchNorm. Such parameters, and the modules that
own them, are kept whole here (their inputs pinned too), and the spec says so by name.

A parameter shared by two modules (``b.weight = a.weight``) would be replaced in one of them by pruning and
silently untied. Its owners are kept whole as well, so the tie survives.

Example:
    >>> import torch
    >>> from torch import nn
    >>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    >>> b.weight = a.weight
    >>> tied_parameters(nn.Sequential(a, b))
    {'0.weight': ['0', '1']}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..spec import SpecPart
from .autograd import walk_graph
from .layers import KNOWN_TYPES

__all__ = [
    "describe_opaque_parameters",
    "describe_tied_parameters",
    "opaque_parameter_uses",
    "tied_parameters",
    "unused_parameters",
]

# Autograd nodes that only re-view a tensor: a parameter seen through them is judged by what reads the view.
_VIEW_OPS = (
    "View",
    "Reshape",
    "UnsafeView",
    "Permute",
    "Transpose",
    "T",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Clone",
    "ToCopy",
    "Alias",
    "Contiguous",
)
# Autograd nodes that mix channels with a matrix product: the graph cannot map a parameter's channels across them.
_MATMUL_OPS = ("Mm", "Bmm", "Addmm", "Addbmm", "Baddbmm", "Mv", "Dot", "Matmul", "Linear", "Convolution", "Einsum")


def _op_name(fn: Any) -> str:
    name = type(fn).__name__
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is(fn: Any, family: tuple[str, ...]) -> bool:
    name = _op_name(fn)
    return any(name == op or name.startswith(op) for op in family)


def opaque_parameter_uses(outputs: Iterable[torch.Tensor]) -> dict[int, str]:
    """``{id(parameter): op}`` for leaf parameters multiplied (through views only) with another tensor of the graph.

    A product with a constant (a one-hot position lookup ``one_hot @ table``) maps the parameter's channels
    one to one and is not reported.

    Args:
        outputs: Output tensors of one forward pass run with autograd on.

    Example:
        >>> w = nn.Parameter(torch.ones(3, 2))
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> list(opaque_parameter_uses([torch.einsum("bc,oc->bo", x, w)]).values())
        ['Bmm']
    """
    consumers: dict[Any, list[Any]] = {}
    for fn in walk_graph(outputs, lambda f: True):
        for child, _ in getattr(fn, "next_functions", ()):
            if child is not None:
                consumers.setdefault(child, []).append(fn)
    found: dict[int, str] = {}
    for node in list(consumers):
        variable = getattr(node, "variable", None)
        if not isinstance(variable, nn.Parameter):
            continue
        frontier, visited = [(fn, node) for fn in consumers[node]], set()
        while frontier:
            fn, came_from = frontier.pop()
            if fn in visited:
                continue
            visited.add(fn)
            if _is(fn, _VIEW_OPS):
                frontier.extend((nxt, fn) for nxt in consumers.get(fn, ()))
            elif _is(fn, _MATMUL_OPS) and any(
                child is not None and child is not came_from for child, _ in fn.next_functions
            ):
                # multiplied with another tensor of the graph (not a constant such as a one-hot table lookup)
                found[id(variable)] = _op_name(fn)
                break
    return found


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``{id(parameter): [(module name, module, attribute), ...]}`` over every module that holds it directly."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                entry = owners.setdefault(id(param), [])
                if all(m is not module for _, m, _ in entry):
                    entry.append((name, module, attr))
    return owners


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """``{first qualified parameter name: [names of every module holding it]}`` for parameters held twice or more.

    Example:
        >>> tied_parameters(nn.Linear(2, 2))
        {}
    """
    tied = {}
    for entries in _owners(model).values():
        if len(entries) > 1:
            name, _, attr = entries[0]
            tied[f"{name}.{attr}" if name else attr] = [n for n, _, _ in entries]
    return tied


def _keep_whole(modules: list[nn.Module], params: list[nn.Parameter], note: str) -> SpecPart:
    """Keep ``modules`` whole: their outputs (every layer inside), their parameters and the widths they read."""
    layers = [m for module in modules for m in module.modules()]
    return SpecPart(
        ignored_layers=[*layers, *params],
        handled={id(m) for m in layers},
        notes=[note],
        pinned_inputs=list(modules),
    )


def describe_tied_parameters(model: nn.Module) -> list[SpecPart]:
    """One part per tied parameter, keeping every module that holds it whole (so the tie survives pruning).

    Example:
        >>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
        >>> b.weight = a.weight
        >>> describe_tied_parameters(nn.Sequential(a, b))[0].notes
        ['0.weight is shared by 0, 1: kept whole so the modules stay tied']
    """
    owners = _owners(model)
    parts = []
    for entries in owners.values():
        if len(entries) < 2:
            continue
        name, module, attr = entries[0]
        param = module._parameters[attr]
        where = ", ".join(n or "<model>" for n, _, _ in entries)
        parts.append(
            _keep_whole(
                [m for _, m, _ in entries],
                [param],
                f"{name + '.' if name else ''}{attr} is shared by {where}: kept whole so the modules stay tied",
            )
        )
    return parts


def describe_opaque_parameters(model: nn.Module, uses: dict[int, str]) -> list[SpecPart]:
    """One part per module owning a parameter that enters a matrix product the graph cannot follow.

    Args:
        model: The model.
        uses: :func:`opaque_parameter_uses` of a forward pass of ``model``.
    """
    parts = []
    for params_id, entries in _owners(model).items():
        if params_id not in uses:
            continue
        for name, module, attr in entries:
            if isinstance(module, KNOWN_TYPES):
                continue  # torch-pruning prunes these layers' own weights itself
            parts.append(
                _keep_whole(
                    [module],
                    [module._parameters[attr]],
                    f"{name or '<model>'} ({type(module).__name__}): {attr} used through {uses[params_id]}, which "
                    "the dependency graph cannot follow; kept whole with the width it reads",
                )
            )
    return parts


def unused_parameters(model: nn.Module, used: frozenset[int]) -> list[SpecPart]:
    """A part naming the outermost blocks none of whose parameters the traced forward reads (not pruned).

    Args:
        model: The model.
        used: Ids of the parameters the traced forward read (:attr:`.tracing.Trace.used`).

    Example:
        >>> m = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 3)})
        >>> unused_parameters(m, frozenset(id(p) for p in m["a"].parameters()))[0].unused
        ['b (9 parameters)']
    """
    found: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if params and all(id(p) not in used for p in params):
            found.append(f"{name or '<model>'} ({sum(p.numel() for p in params):,} parameters)")
            return
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", model)
    return [SpecPart(unused=found)] if found else []
