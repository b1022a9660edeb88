"""Walking the autograd graph behind a forward pass's outputs (the one home of the walk)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["walk_graph"]


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
