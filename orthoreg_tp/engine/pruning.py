"""The recipes' pruning rounds, their replayable history, and reloading a pruned model.

Every round goes through the project's one pruning path, :func:`orthoreg_tp.adapters.prune` (global ranking,
the per-layer floor of the method's importance, tie-breaking, verification, rollback). A round returns its
:class:`~orthoreg_tp.adapters.PruneReport`, whose ``history`` holds torch-pruning's ``[layer name,
is_out_channel, indices]`` entries. Replaying all histories on a freshly built dense model restores the pruned
structure, so checkpoints are plain state dicts loadable with ``weights_only=True``.

Example:
    >>> report = prune_round_(model, x, importance, ratio=0.5)   # doctest: +SKIP
    >>> dense = build_model("vgg13", num_classes=100)            # doctest: +SKIP
    >>> replay(dense, x, report.history)                         # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import PruneConfig, PruneReport, count_macs_params, prune, replay
from .models import build_model
from .records import atomic_torch_save, safe_torch_load

__all__ = ["count_macs_params", "load_pruned_model", "prune_round_", "round_config", "save_pruned_model"]

HistoryEntry = list  # [layer name: str, is_out_channel: bool, indices: list[int]]


def round_config(*, ratio: float | None = None, target_macs: float | None = None, current_macs: int | None = None,
                 target_latency: float | None = None, latency_batch_size: int | None = None,
                 round_to: int | str | None = None, seed: int = 0, dry_run: bool = False) -> PruneConfig:
    """The :class:`~orthoreg_tp.adapters.PruneConfig` of one recipe round.

    Args:
        ratio: Fraction of the current prunable channels to remove.
        target_macs: Instead of ``ratio``: the MACs to end at (at most; at least 95% of it), given with
            ``current_macs``, the model's MACs now (:func:`count_macs_params`).
        current_macs: See ``target_macs``.
        target_latency: Instead: keep at most this fraction of the current model's measured latency.
        latency_batch_size: The batch size latency is measured at (the run's).
        round_to: Keep layer widths multiples of this (``"auto"``: the fastest of 1, 8, 16, 32).
        seed: Seeds every attempt, so random importances prune the same channels on every rank.
        dry_run: Leave the model unchanged.

    Raises:
        ValueError: Unless exactly one of ``ratio``/``target_macs``/``target_latency`` is given, or for bad values.

    Example:
        >>> round_config(target_macs=50, current_macs=200).target
        ('macs', 0.25)
    """
    if sum(x is not None for x in (ratio, target_macs, target_latency)) != 1:
        raise ValueError(f"give exactly one of ratio, target_macs and target_latency, got {ratio!r}, "
                         f"{target_macs!r} and {target_latency!r}")
    target = ("latency", target_latency) if target_latency is not None else None
    if target_macs is not None:
        if not current_macs or current_macs <= 0:
            raise ValueError(f"target_macs needs the current MACs, got current_macs={current_macs!r}")
        target = ("macs", min(1.0, target_macs / current_macs))
    if round_to != "auto" and not (round_to and round_to > 1):
        round_to = None
    return PruneConfig(ratio=ratio, target=target, round_to=round_to, latency_batch_size=latency_batch_size,
                       seed=seed, dry_run=dry_run)


def prune_round_(model: nn.Module, example_inputs: Tensor, importance: Any, *, ratio: float | None = None,
                 target_macs: float | None = None, target_latency: float | None = None,
                 latency_batch_size: int | None = None, round_to: int | str | None = None,
                 seed: int = 0) -> PruneReport:
    """One recipe round: prune ``model`` in place by a channel ratio, or down to a MACs or latency budget.

    A thin call of :func:`orthoreg_tp.adapters.prune` with :func:`round_config`; its ``report.channels_removed``
    is the achieved ratio, ``report.ratio`` the one applied (lower than asked when the floor capped it).

    Example:
        >>> report = prune_round_(model, x, imp, ratio=0.5)  # doctest: +SKIP
    """
    current = count_macs_params(model, example_inputs)[0] if target_macs is not None else None
    cfg = round_config(ratio=ratio, target_macs=target_macs, current_macs=current, target_latency=target_latency,
                       latency_batch_size=latency_batch_size, round_to=round_to, seed=seed)
    return prune(model, example_inputs, importance=importance, config=cfg)


def save_pruned_model(path: str | os.PathLike, model: nn.Module, history: Sequence[HistoryEntry],
                      meta: dict[str, Any]) -> None:
    """Atomically save a pruned model as a plain state dict + its full pruning history + how to rebuild it.

    Args:
        path: Target file.
        model: The bare pruned model.
        history: All history entries since the dense model.
        meta: ``model`` (name), ``num_classes``, ``in_chans``, ``image_size`` for :func:`load_pruned_model`.
    """
    atomic_torch_save({"model": model.state_dict(), "pruning_history": [list(e) for e in history],
                       "meta": dict(meta)}, path)


def load_pruned_model(path: str | os.PathLike, *, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned_model` (``weights_only=True``: no pickled code runs).

    Example:
        >>> model = load_pruned_model("runs/vgg13-orthoreg/model_final.pt")  # doctest: +SKIP
    """
    state = safe_torch_load(path, map_location=map_location)
    meta = state["meta"]
    model = build_model(meta["model"], num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    x = torch.randn(1, meta["in_chans"], meta["image_size"], meta["image_size"])
    replay(model, x, state["pruning_history"])
    model.load_state_dict(state["model"])
    return model
