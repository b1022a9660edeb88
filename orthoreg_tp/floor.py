"""The paper's per-layer floor: every layer keeps ``int(min_keep_ratio * original_width) + 1`` channels.

torch-pruning's ``max_pruning_ratio`` does not cap a single global step, and a group that would empty a layer is
dropped whole, so the achieved ratio silently undershoots (docs/torch-pruning.md). The floor is enforced in the
scores instead: a group's best ``floor`` channels score :data:`PROTECTED_SCORE`, a huge *finite* value above every real
score, so global ranking never takes them (a ratio that would reach them selects every channel of every group, which
torch-pruning then skips, as it did with ``+inf``; :func:`orthoreg_tp.adapters.prune` caps such ratios instead).
Finite, because other torch-pruning components consume the same scores: ``GroupNormPruner.regularize()`` computes
``(max - s) / (max - min)``, which an infinite score turns into NaN gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor

from . import _compat

NORMALIZERS: tuple[str, ...] = ("mean", "max", "sum", "standarization", "gaussian", "lamp")
PROTECTED_SCORE = 1e30  # what protected channels score: finite in float32, above any real score
#: The paper's floor: every layer keeps ``int(0.05 * width) + 1`` channels (its 95% per-layer cap). The one
#: default of the project: importances, ``PruneConfig`` and the recipes' methods all take it from here.
DEFAULT_MIN_KEEP_RATIO = 0.05


def keep_floor(initial_width: int, min_keep_ratio: float) -> int:
    """The paper's per-layer floor: keep ``int(min_keep_ratio * initial_width) + 1`` channels.

    Example:
        >>> keep_floor(64, 0.05)
        4
    """
    return int(min_keep_ratio * initial_width) + 1


def protect_best(scores: Tensor, count: int) -> Tensor:
    """A float32 copy of ``scores`` with its ``count`` highest entries set to :data:`PROTECTED_SCORE`.

    Other entries are capped below it (so :func:`is_protected` is exact); ``nan`` stays ``nan``.

    Example:
        >>> is_protected(protect_best(torch.tensor([3.0, 1.0, 2.0]), 1)).tolist()
        [True, False, False]
    """
    scores = scores.detach().clone().float().clamp(max=PROTECTED_SCORE / 2)
    count = min(count, scores.numel())
    if count > 0:
        scores[torch.topk(scores.nan_to_num(nan=-float("inf")), count).indices] = PROTECTED_SCORE
    return scores


def is_protected(scores: Tensor) -> Tensor:
    """Which channels a floor protects (scores of at least :data:`PROTECTED_SCORE`).

    Example:
        >>> is_protected(torch.tensor([1.0, 1e30])).tolist()
        [False, True]
    """
    return scores >= PROTECTED_SCORE


def required_width(group: Any) -> int:
    """The fewest input channels any layer of ``group`` can run with (0: no such limit).

    A layer pruner may define ``min_in_channels(layer) -> int`` (timm's ``ScaledStdConv2d`` standardizes each
    filter over its fan-in, so a 1x1 one needs two input channels); the floor never goes below it.

    Example:
        >>> required_width([])
        0
    """
    need = 0
    for dep, _ in group:
        rule = getattr(_compat.handler_pruner(dep.handler), "min_in_channels", None)
        if rule is not None and not _compat.handler_direction(dep.handler):
            need = max(need, int(rule(dep.target.module)))
    return need


class LayerFloor:
    """Applies the floor to a group's scores, remembering each root layer's original width by name.

    Args:
        min_keep_ratio: 0.05 in the paper (the 95% per-layer cap).
        initial_widths: ``{layer name: original width}`` (e.g. :func:`orthoreg_tp.layer_widths` of the dense
            model), so the floor stays the original network's across rounds, new importance objects and resumed
            runs. Layers not in it are recorded the first time they are seen.

    Example:
        >>> floor = LayerFloor(0.05, {"features.0": 64})
        >>> scores = floor(group, scores)  # doctest: +SKIP
    """

    def __init__(self, min_keep_ratio: float = 0.05, initial_widths: Mapping[str, int] | None = None) -> None:
        if not 0.0 <= min_keep_ratio < 1.0:
            raise ValueError(f"min_keep_ratio must be in [0, 1), got {min_keep_ratio!r}")
        self.min_keep_ratio = float(min_keep_ratio)
        self.initial_widths: dict[str, int] = dict(initial_widths or {})

    def count(self, group: Any) -> int:
        """Channels the group's root layer must keep (0 for a partial group of user-chosen indices)."""
        width = _compat.current_width(group)
        if width is None or width != len(group[0].idxs):
            return 0
        name = _compat.layer_name(group, group[0].dep.target.module)
        initial = self.initial_widths.setdefault(name, width)
        return min(max(keep_floor(initial, self.min_keep_ratio), required_width(group)), width)

    def __call__(self, group: Any, scores: Tensor) -> Tensor:
        """``scores`` with the group's best :meth:`count` channels protected (see :func:`protect_best`)."""
        count = self.count(group) if scores.numel() == len(group[0].idxs) else 0
        return protect_best(scores, count) if count > 0 else scores


class FloorImportance(tp.importance.Importance):
    """Wrap any importance (torch-pruning's built-ins included) so every layer keeps the paper's floor.

    Args:
        inner: Any torch-pruning importance.
        initial_widths: ``{layer name: original width}``; see :class:`LayerFloor`.
        min_keep_ratio: 0.05 in the paper.
        normalizer: ``None`` (raw scores ranked across layers, as the paper does) or one of torch-pruning's
            per-group normalizers (``"mean"``, ``"max"``, ``"sum"``, ``"standarization"``, ``"gaussian"``,
            ``"lamp"``), applied before the floor. Magnitude-type scores of layers with different fan-in are not
            comparable raw; normalizing per layer keeps global ranking from emptying whole layers.

    Example:
        >>> imp = FloorImportance(tp.importance.MagnitudeImportance(p=1, normalizer=None), layer_widths(model))
        ... # doctest: +SKIP
    """

    def __init__(self, inner: Any, initial_widths: Mapping[str, int] | None = None, *,
                 min_keep_ratio: float = DEFAULT_MIN_KEEP_RATIO, normalizer: str | None = None) -> None:
        if normalizer is not None and normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer, got {normalizer!r}; choose one of {list(NORMALIZERS)} or None")
        self.inner = inner
        self.normalizer = normalizer
        self.floor = LayerFloor(min_keep_ratio, initial_widths)

    def __call__(self, group: Any) -> Tensor | None:
        """The wrapped importance's scores, normalized if asked, with the floor applied."""
        scores = self.inner(group)
        if scores is None:
            return None
        return self.floor(group, _compat.normalize_scores(scores, self.normalizer))


class RoundedFloorImportance(tp.importance.Importance):
    """Raise a group's protected channels (:func:`is_protected`) to a multiple of ``round_to`` (at least one).

    torch-pruning's ``round_to`` rounds each layer's kept width *down*; a layer whose kept width rounds to zero is
    skipped whole, so the global ratio undershoots, and rounding down can cut into the per-layer floor. With the
    best ``ceil(max(floor, 1) / round_to) * round_to`` channels protected, every layer keeps a non-zero multiple
    and its floor.

    Args:
        inner: Any torch-pruning importance (its protected scores are its floor).
        round_to: The channel multiple the pruner keeps.

    Example:
        >>> imp = RoundedFloorImportance(FloorImportance(tp.importance.MagnitudeImportance()), 8)  # doctest: +SKIP
    """

    def __init__(self, inner: Any, round_to: int) -> None:
        if round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        self.inner = inner
        self.round_to = int(round_to)

    def __call__(self, group: Any) -> Tensor | None:
        """The wrapped importance's scores with the rounded floor applied."""
        scores = self.inner(group)
        if scores is None or self.round_to == 1:
            return scores
        protected = int(is_protected(scores).sum())
        return protect_best(scores, math.ceil(max(protected, 1) / self.round_to) * self.round_to)
