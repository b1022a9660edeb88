"""Reuse the unpruned outputs of a model's top-level blocks in a trial, where the block and its inputs are unchanged.

Pruning one group late in a network leaves every block before it as it was: recomputing them for each trial is
most of a trial's cost. The baseline pass records each top-level child's inputs and output (copies, up to a memory
budget); in a trial, a child none of whose modules the pruning touched, called with inputs *equal* (``torch.equal``)
to the recorded ones, returns a copy of the recorded output instead of running. Anything else runs as usual, so
the measured numbers are those of a full forward pass (``tests/test_sensitivity.py`` compares every row with
pruning the group through ``adapters.prune``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> cache = PrefixCache(model)
    >>> with cache.recording():
    ...     y = model(x)
    >>> with cache.reusing(unchanged=list(model.children())):
    ...     torch.equal(model(x), y), cache.hits
    (True, 3)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_BUDGET", "PrefixCache", "changed_modules"]

DEFAULT_BUDGET = 1 << 30  # bytes of recorded tensors (inputs and outputs); later calls are simply not cached


class PrefixCache:
    """Recorded ``(inputs, output)`` of every call of the model's top-level children, in call order.

    Args:
        model: The model (its direct children are the cached blocks).
        budget: Bytes of recorded tensors at most.
    """

    def __init__(self, model: nn.Module, *, budget: int = DEFAULT_BUDGET) -> None:
        self.children = list(model.children())
        self.budget = budget
        self.bytes = 0
        self.calls: dict[nn.Module, list[tuple[tuple[Tensor, ...], Tensor] | None]] = {m: [] for m in self.children}
        self.hits = 0

    # ------------------------------------------------------------------ recording
    def _inputs(self, module: nn.Module, args: tuple) -> None:
        """Copy the inputs before the call (an in-place block would change them)."""
        entry = None
        if args and all(isinstance(a, Tensor) for a in args):
            size = sum(a.numel() * a.element_size() for a in args)
            if self.bytes + size <= self.budget:
                self.bytes += size
                entry = (tuple(a.detach().clone() for a in args), None)
        self.calls[module].append(entry)

    def _output(self, module: nn.Module, output: Any) -> None:
        entry = self.calls[module][-1]
        if entry is None:
            return
        size = output.numel() * output.element_size() if isinstance(output, Tensor) else 0
        if not isinstance(output, Tensor) or self.bytes + size > self.budget:
            self.calls[module][-1] = None
            return
        self.bytes += size
        self.calls[module][-1] = (entry[0], output.detach().clone())

    @contextlib.contextmanager
    def recording(self) -> Iterator[PrefixCache]:
        """Record the calls made inside the block (the baseline pass)."""
        handles = [m.register_forward_pre_hook(lambda mod, args: self._inputs(mod, args)) for m in self.children]
        handles += [m.register_forward_hook(lambda mod, args, out: self._output(mod, out)) for m in self.children]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ reuse
    @contextlib.contextmanager
    def reusing(self, unchanged: Iterable[nn.Module]) -> Iterator[PrefixCache]:
        """Inside the block, ``unchanged`` children return their recorded output when called with equal inputs.

        The children's own ``forward`` is shadowed by an instance attribute for the duration of the block.
        """
        self.hits = 0
        patched = [m for m in unchanged if m in self.calls and any(self.calls[m]) and "forward" not in vars(m)]
        for m in patched:
            m.forward = self._memo(m)
        try:
            yield self
        finally:
            for m in patched:
                vars(m).pop("forward", None)

    def _memo(self, module: nn.Module) -> Any:
        original = type(module).forward.__get__(module)
        calls, count = self.calls[module], [0]

        def forward(*args: Any, **kwargs: Any) -> Any:
            k = count[0]
            count[0] += 1
            entry = calls[k % len(calls)] if calls else None  # the pass repeats over the same batches
            if (entry is not None and not kwargs and len(args) == len(entry[0])
                    and all(isinstance(a, Tensor) and a.shape == b.shape and torch.equal(a, b)
                            for a, b in zip(args, entry[0]))):
                self.hits += 1
                return entry[1].clone()
            return original(*args, **kwargs)

        return forward


def _same(now: Any, then: Any) -> bool:
    if now is then:
        return True
    if isinstance(then, dict):
        return isinstance(now, dict) and now.keys() == then.keys() and all(now[k] is then[k] for k in then)
    if isinstance(then, set):
        return isinstance(now, set) and now == then
    if isinstance(then, (list, tuple)):
        return (isinstance(now, type(then)) and len(now) == len(then)
                and all(a is b or (_plain(a) and a == b) for a, b in zip(now, then)))
    return _plain(then) and type(now) is type(then) and now == then


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None)))


def changed_modules(saved: Iterable[tuple[nn.Module, dict]]) -> set[nn.Module]:
    """Modules whose attributes differ from ``saved`` (``Snapshot.modules``): replaced parameters, new widths...

    Example:
        >>> from orthoreg_tp.adapters import snapshot
        >>> lin = nn.Linear(2, 2)
        >>> snap = snapshot(lin)
        >>> lin.out_features = 3
        >>> changed_modules(snap.modules) == {lin}
        True
    """
    changed = set()
    for module, attrs in saved:
        now = vars(module)
        if now.keys() != attrs.keys() or not all(_same(now[k], v) for k, v in attrs.items()):
            changed.add(module)
    return changed
