"""What one :func:`~orthoreg_tp.adapters.prune` call should do: amount, ranking, floor and safety nets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from orthoreg_tp.floor import DEFAULT_MIN_KEEP_RATIO

__all__ = ["AUTO_ROUND_TO", "TARGET_KINDS", "PruneConfig"]

TARGET_KINDS = ("macs", "params", "latency")
#: Multiples ``round_to="auto"`` tries (the fastest at the budget is kept).
AUTO_ROUND_TO = (1, 8, 16, 32)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PruneConfig:
    """Options of one pruning call (validated on construction; plain values only, so it round-trips JSON).

    Give exactly one of ``ratio`` and ``target``.

    Attributes:
        ratio: Fraction of the prunable channels to remove, in ``[0, 1)`` (torch-pruning's ``pruning_ratio``).
            A ratio the per-layer floor cannot satisfy is lowered to the largest one it can (with a warning).
        target: ``(kind, fraction)``: keep at most ``fraction`` (in ``(0, 1]``) of the model's ``"macs"``,
            ``"params"`` or ``"latency"``, and at least ``fraction * (1 - tolerance)``; the ratio is searched.
            Latency is measured on the device and batch of the inputs (see :mod:`orthoreg_tp.latency`: the dense
            and the pruned model timed interleaved, median of ``latency_repeats`` forwards after
            ``latency_warmup``); being noisy, a latency search that finds no ratio inside the band keeps the
            least-pruned trial measured at or under the budget.
        global_ranking: Rank the channels of all layers together (the paper's choice, the default); ``False``
            ranks each layer on its own, every layer losing ``ratio`` of its channels (down to its floor).
        min_keep_ratio: The per-layer floor: every layer keeps ``int(min_keep_ratio * width) + 1`` channels of its
            width before this call (0.05 in the paper); ``None`` disables it. An importance that applies its
            own floor (:class:`~orthoreg_tp.FloorImportance`, ``OrthoRegImportance(min_keep_ratio=...)``) keeps it.
        round_to: Keep pruned widths multiples of this (combined with head multiples by least common multiple);
            every layer keeps at least one multiple. ``"auto"`` prunes with each of 1, 8, 16 and 32, measures
            the latency of each result and keeps the fastest (hardware kernels often prefer such widths).
        tolerance: Relative width of the accepted band below a ``target`` budget (0.05: 5%).
        max_ratio: Largest ratio tried when searching a ``target`` budget.
        max_repairs: Failed attempts repaired by freezing the failing block, before giving up.
        dry_run: Compute what would be removed (report and history), then restore the model.
        latency_repeats: Timed forwards per model when latency is measured.
        latency_warmup: Untimed forwards per model first.
        latency_batch_size: Batch size latency is measured at (the tensor inputs repeated along dim 0);
            ``None``: the inputs as given.
        seed: Seed torch's CPU generator for every attempt (random importances then choose the same channels in
            every attempt and on every rank); ``None`` leaves the generator alone. The caller's generator state
            is never changed.

    Example:
        >>> cfg = PruneConfig(target=("macs", 0.5), round_to=8)
        >>> PruneConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    ratio: float | None = None
    target: tuple[str, float] | None = None
    global_ranking: bool = True
    min_keep_ratio: float | None = DEFAULT_MIN_KEEP_RATIO
    round_to: int | str | None = None
    tolerance: float = 0.05
    max_ratio: float = 0.95
    max_repairs: int = 6
    dry_run: bool = False
    latency_repeats: int = 30
    latency_warmup: int = 5
    latency_batch_size: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.target is None):
            raise ValueError(f"give exactly one of ratio= or target=, got ratio={self.ratio!r}, target={self.target!r}")
        if self.ratio is not None and (not _is_number(self.ratio) or not 0.0 <= self.ratio < 1.0):
            raise ValueError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        if self.target is not None:
            object.__setattr__(self, "target", _check_target(self.target))
        for name in ("global_ranking", "dry_run"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        floor = self.min_keep_ratio
        if floor is not None and (not _is_number(floor) or not 0.0 <= floor < 1.0):
            raise ValueError(f"min_keep_ratio must be in [0, 1) or None, got {floor!r}")
        if self.round_to is not None and self.round_to != "auto" and (not _is_int(self.round_to) or self.round_to < 1):
            raise ValueError(f"round_to must be a positive integer, 'auto' or None, got {self.round_to!r}")
        for name in ("latency_repeats", "latency_batch_size"):
            value = getattr(self, name)
            if (value is not None or name == "latency_repeats") and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _is_int(self.latency_warmup) or self.latency_warmup < 0:
            raise ValueError(f"latency_warmup must be a non-negative int, got {self.latency_warmup!r}")
        if not _is_number(self.tolerance) or not 0.0 < self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance!r}")
        if not _is_number(self.max_ratio) or not 0.0 < self.max_ratio < 1.0:
            raise ValueError(f"max_ratio must be in (0, 1), got {self.max_ratio!r}")
        if not _is_int(self.max_repairs) or self.max_repairs < 0:
            raise ValueError(f"max_repairs must be a non-negative int, got {self.max_repairs!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (``target`` as a list)."""
        out = asdict(self)
        if self.target is not None:
            out["target"] = list(self.target)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: An unknown key, or a value :class:`PruneConfig` rejects.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PruneConfig keys, got {unknown!r}; expected some of {sorted(known)}")
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_target(target: Any) -> tuple[str, float]:
    if not isinstance(target, (tuple, list)) or len(target) != 2:
        raise ValueError(f"target must be a (kind, fraction) pair such as ('macs', 0.5), got {target!r}")
    kind, fraction = target
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
    if not _is_number(fraction) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"target fraction must be in (0, 1] (the share of {kind} to keep), got {fraction!r}")
    return str(kind), float(fraction)
