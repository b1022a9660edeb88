"""The autograd graph of a forward pass: walking it (the one home of the walk), recording it without activations."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["structure_only", "walk_graph"]


def walk_graph(outputs: Iterable[torch.Tensor], descend: Callable[[Any], bool]) -> Iterator[Any]:
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


def _pack(tensor: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
    return tensor.shape, tensor.dtype


def _unpack(packed: tuple[torch.Size, torch.dtype]) -> torch.Tensor:
    return torch.empty(packed[0], dtype=packed[1], device="meta")


@contextlib.contextmanager
def structure_only() -> Iterator[None]:
    """Record autograd graphs without keeping the tensors saved for backward (the activations).

    The graph's structure and its nodes' non-tensor attributes (``_saved_dim``, ``_saved_self_sym_sizes``...)
    stay readable; a saved tensor reads back as an empty ``meta`` tensor of its shape. Tracing a model for
    pruning then holds about what a ``no_grad`` forward holds. No backward pass can run through such a graph.

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> with structure_only():
        ...     y = (x * 2).sigmoid()
        >>> type(y.grad_fn).__name__, y.grad_fn._saved_result.device.type
        ('SigmoidBackward0', 'meta')
    """
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
