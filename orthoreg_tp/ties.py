"""Deterministic tie-breaking of importance scores, so global ranking removes exactly the requested count.

torch-pruning's global ranking finds the k-th smallest score and then removes *every* channel scoring ``<=``
it. When many scores are equal (untrained BatchNorm gammas all 1, zero gradients, a random importance on a
coarse grid) that removes far more than k channels: ties overshoot the requested ratio. Nudging every
finite score by a tiny, deterministic relative amount (in float64, ~1e-9 of its magnitude) makes equal scores
distinct without reordering any scores that differ meaningfully. The nudge depends only on the layer's name
and the channel position, so every process of a distributed run and every replay ranks identically.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor

from . import _compat
from .floor import is_protected

RELATIVE_NUDGE = 1e-9
ABSOLUTE_NUDGE = 1e-300  # separates exact zeros (float64 subnormals reach ~5e-324)


def break_ties(scores: Tensor, key: str) -> Tensor:
    """Float64 ``scores`` with equal finite values made distinct by a tiny deterministic nudge.

    Each finite score ``s`` becomes ``s + (|s| * 1e-9 + 1e-300) * u`` with ``u`` in ``[0, 1)`` drawn from a
    generator seeded by ``key`` (e.g. the layer name). Scores that differ by more than a relative ``1e-9``
    keep their order; floor-protected scores (:func:`~orthoreg_tp.floor.is_protected`), ``inf`` and ``nan`` stay
    as they are.

    Args:
        scores: One score per channel.
        key: Distinguishes the nudges of different layers (use the layer's qualified name).

    Returns:
        A new float64 tensor on the same device.

    Example:
        >>> s = break_ties(torch.ones(3), "layer1")
        >>> bool((s[0] != s[1]) & (s[1] != s[2])), bool(torch.allclose(s, torch.ones(3, dtype=torch.float64)))
        (True, True)
    """
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    u = torch.rand(scores.numel(), generator=generator, dtype=torch.float64).view_as(scores).to(scores.device)
    out = scores.detach().to(torch.float64)
    nudge = torch.isfinite(out) & ~is_protected(out)
    nudged = out + (out.abs() * RELATIVE_NUDGE + ABSOLUTE_NUDGE) * u
    return torch.where(nudge, nudged, out)


class TieBreakImportance(tp.importance.Importance):
    """Wrap any importance so global ranking removes exactly the requested number of channels.

    Args:
        inner: Any torch-pruning importance (an :class:`~orthoreg_tp.OrthoRegImportance`, a
            :class:`~orthoreg_tp.FloorImportance`, torch-pruning's built-ins).

    Example:
        >>> imp = TieBreakImportance(tp.importance.BNScaleImportance(normalizer=None))  # doctest: +SKIP
        >>> pruner = tp.pruner.MetaPruner(model, x, importance=imp, global_pruning=True)  # doctest: +SKIP
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, group: Any) -> Tensor | None:
        """The wrapped importance's scores, with ties broken."""
        scores = self.inner(group)
        if scores is None:
            return None
        return break_ties(scores, _compat.layer_name(group, group[0].dep.target.module))

    def __getattr__(self, name: str) -> Any:
        # Delegate everything else (accumulate, reset, floor, ...) to the wrapped importance.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
