"""One physical pruning step of the recipes, its replayable history, and reloading a pruned model.

A step builds a global ``tp.pruner.MetaPruner`` (classifier ignored; for ``timm:``/``torchvision:`` models the
adapters' :class:`~orthoreg_tp.adapters.PruningSpec` supplies the other arguments and the post-prune fix-ups),
prunes, and returns the step's history: ``[layer name, is_out_channel, indices]`` entries in torch-pruning's
format. Replaying all histories on a freshly built dense model restores the pruned structure, so checkpoints
are plain state dicts loadable with ``weights_only=True``.

Example:
    >>> step = prune_step_(model, x, importance, ratio=0.5)     # doctest: +SKIP
    >>> dense = build_model("vgg13", num_classes=100)            # doctest: +SKIP
    >>> replay_pruning_(dense, x, step.history)                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .. import _compat
from ..floor import RoundedFloorImportance
from ..metrics import prunable_channels
from ..regularizer import find_classifier
from ..ties import TieBreakImportance
from .models import build_model
from .records import atomic_torch_save, safe_torch_load

logger = logging.getLogger(__name__)

HistoryEntry = list  # [layer name: str, is_out_channel: bool, indices: list[int]]


def uses_adapters(model_name: str) -> bool:
    """Whether a model name goes through :mod:`orthoreg_tp.adapters` (timm and torchvision models do).

    Example:
        >>> uses_adapters("timm:resnet18"), uses_adapters("vgg13")
        (True, False)
    """
    return model_name.startswith(("timm:", "torchvision:"))


def build_pruner(model: nn.Module, example_inputs: Tensor, importance: Any, *, ratio: float,
                 adapters: bool = False, round_to: int | None = None,
                 ) -> tuple[tp.pruner.MetaPruner, Callable[[], None]]:
    """A global MetaPruner for one step, and the fix-up to call after it pruned.

    The importance is wrapped in :class:`~orthoreg_tp.ties.TieBreakImportance`, so equal scores cannot make
    the global ranking remove more channels than asked.

    Args:
        model: The bare model.
        example_inputs: Inputs for tracing.
        importance: Any torch-pruning importance (already fed with data).
        ratio: Fraction of the model's *current* prunable channels to remove.
        adapters: Take ignored layers, head counts, unwrapped parameters and fix-ups from
            ``orthoreg_tp.adapters.prepare`` (needed for most timm/torchvision models).
        round_to: Keep every pruned layer's width a multiple of this (torch-pruning's ``round_to``; combined
            with the adapters' head multiples by least common multiple).

    Returns:
        ``(pruner, finalize)``.

    Example:
        >>> pruner, finalize = build_pruner(model, x, imp, ratio=0.5)  # doctest: +SKIP
    """
    classifier = find_classifier(model)
    kwargs: dict[str, Any] = {"ignored_layers": []}
    spec = None
    if adapters:
        from ..adapters import prepare  # spec objects hold parameters, so prepare again for every step

        spec = prepare(model, example_inputs)
        kwargs = {"ignored_layers": [], "round_to": spec.round_to}
    if classifier is not None:
        kwargs["ignored_layers"] = [*kwargs["ignored_layers"], classifier]
    if round_to is not None and round_to > 1:
        kwargs["round_to"] = math.lcm(round_to, kwargs.get("round_to") or 1)
    if not isinstance(importance, TieBreakImportance):
        importance = TieBreakImportance(importance)
    # max_pruning_ratio caps nothing in one global step (docs/torch-pruning.md); FloorImportance does.
    if spec is not None:  # the adapters' pruner: a graph that works around torch-pruning's bugs, fix-ups per step
        from ..adapters import build_pruner as build_adapted_pruner

        pruner = build_adapted_pruner(model, example_inputs, importance=importance, spec=spec, global_pruning=True,
                                      pruning_ratio=ratio, max_pruning_ratio=0.95, **kwargs)
        return pruner, pruner.finalize
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=importance, global_pruning=True,
                                  pruning_ratio=ratio, max_pruning_ratio=0.95, **kwargs)
    return pruner, lambda: None


def plan_pruning(pruner: tp.pruner.MetaPruner, *, apply: bool = False) -> list[HistoryEntry]:
    """Run one pruner step and return its history entries; prune only if ``apply``.

    Without ``apply`` this is a dry run: the channels that *would* go (for early-bird masks, MACs search).

    Example:
        >>> entries = plan_pruning(pruner)  # doctest: +SKIP
    """
    entries = []
    for group in pruner.step(interactive=True):
        dep, idxs = group[0]
        if len(idxs) == 0:
            continue
        name = _compat.layer_name(group, dep.target.module)
        entries.append([name, bool(pruner.DG.is_out_channel_pruning_fn(dep.trigger)), [int(i) for i in idxs]])
        if apply:
            group.prune()
    return entries


def replay_pruning_(model: nn.Module, example_inputs: Tensor, history: Sequence[HistoryEntry], *,
                    adapters: bool = False) -> nn.Module:
    """Re-apply pruning history entries to ``model`` in place (the dense model, or a copy of the current one).

    Example:
        >>> replay_pruning_(build_model("vgg13", num_classes=100), x, history)  # doctest: +SKIP
    """
    if history:
        pruner, finalize = build_pruner(model, example_inputs, tp.importance.RandomImportance(), ratio=0.0,
                                        adapters=adapters)
        pruner.DG.load_pruning_history([list(e) for e in history])
        finalize()
    return model


def protected_channels(pruner: tp.pruner.MetaPruner, importance: Any) -> int:
    """Channels the importance's per-layer floor keeps out of reach (``+inf`` scores) in this step."""
    count = 0
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        if _compat.current_width(group) in (None, 0, 1):
            continue  # torch-pruning never ranks single-channel layers
        scores = importance(group)
        if scores is not None:
            count += int(torch.isinf(scores).sum())
    return count


@dataclass(frozen=True)
class StepResult:
    """What one pruning step did.

    Attributes:
        history: The step's history entries (replay with :func:`replay_pruning_`).
        requested: The ratio asked for (of current prunable channels).
        applied: The ratio handed to the pruner (lower than requested when the floor made it infeasible,
            or found by the MACs search).
        achieved: The measured fraction of prunable channels removed.
    """

    history: list[HistoryEntry]
    requested: float
    applied: float
    achieved: float


def prune_step_(model: nn.Module, example_inputs: Tensor, importance: Any, *, ratio: float | None = None,
                target_macs: float | None = None, adapters: bool = False, round_to: int | None = None,
                seed: int = 0, search_steps: int = 12) -> StepResult:
    """Prune ``model`` in place once, by a channel ratio or down to a MACs budget.

    Equal scores are tie-broken (see :func:`build_pruner`), so a ratio removes that many channels, not every
    channel tied with the last one.

    Args:
        model: The bare model (not a DDP wrapper); rebuild optimizers and wrappers afterwards.
        example_inputs: Inputs for tracing and MACs counting.
        importance: A fed importance (usually a :class:`~orthoreg_tp.engine.methods.FloorImportance`).
        ratio: Fraction of current prunable channels to remove.
        target_macs: Instead of ``ratio``: the MACs to end at; the ratio is found by bisection on dry runs.
        adapters: See :func:`build_pruner`.
        round_to: Keep layer widths multiples of this. Each layer keeps at least one multiple (and its floor,
            rounded up); torch-pruning rounds kept widths down, so ``achieved`` can exceed ``ratio`` by up to
            ``round_to - 1`` channels per layer, or fall short when narrow layers cannot lose a whole multiple.
        seed: Seeds torch's RNG first, so random importances prune the same channels on every rank.
        search_steps: Bisection steps of the MACs search.

    Returns:
        A :class:`StepResult`.

    Raises:
        ValueError: Unless exactly one of ``ratio``/``target_macs`` is given, for a ratio outside [0, 1), or a
            ``round_to`` below 1.

    Example:
        >>> result = prune_step_(model, x, imp, ratio=0.5)  # doctest: +SKIP
    """
    if (ratio is None) == (target_macs is None):
        raise ValueError(f"give exactly one of ratio and target_macs, got {ratio!r} and {target_macs!r}")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    return _prune_step(model, example_inputs, importance, ratio=ratio, target_macs=target_macs,
                       adapters=adapters, round_to=round_to, seed=seed, search_steps=search_steps)


def _prune_step(model: nn.Module, example_inputs: Tensor, importance: Any, *, ratio: float | None,
                target_macs: float | None, adapters: bool, round_to: int | None, seed: int,
                search_steps: int) -> StepResult:
    build = dict(adapters=adapters, round_to=round_to)
    if round_to is not None and round_to > 1:
        importance = RoundedFloorImportance(importance, round_to)  # no layer rounds to zero or under its floor
    pruner, _ = build_pruner(model, example_inputs, importance, ratio=0.0, **build)
    total = prunable_channels(pruner)
    feasible = max(0.0, 1.0 - protected_channels(pruner, importance) / max(total, 1) - 1e-9)

    def dry_run(r: float) -> nn.Module:
        torch.manual_seed(seed)
        trial_pruner, _ = build_pruner(model, example_inputs, importance, ratio=r, **build)
        trial = copy.deepcopy(model)
        replay_pruning_(trial, example_inputs, plan_pruning(trial_pruner), adapters=adapters)
        return trial

    if target_macs is not None:
        applied = _search_ratio(lambda r: count_macs_params(dry_run(r), example_inputs)[0], target_macs,
                                feasible, search_steps, what=f"MACs target {target_macs:.4g}")
    else:
        applied = min(ratio, feasible)
        if applied < ratio:
            logger.warning("pruning ratio %.4f would break the per-layer floor; pruning %.4f instead",
                           ratio, applied)
    torch.manual_seed(seed)
    pruner, finalize = build_pruner(model, example_inputs, importance, ratio=applied, **build)
    history = plan_pruning(pruner, apply=True)
    finalize()
    achieved = 1.0 - prunable_channels(pruner) / max(total, 1)
    return StepResult(history=history, requested=ratio if ratio is not None else applied, applied=applied,
                      achieved=achieved)


def count_macs_params(model: nn.Module, example_inputs: Tensor) -> tuple[int, int]:
    """``(MACs, parameters)`` for one input, through torch-pruning's counter (train/eval mode restored).

    Example:
        >>> count_macs_params(nn.Linear(4, 2), torch.zeros(1, 4))
        (10, 10)
    """
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was_training)
    return int(macs), int(params)


def _search_ratio(measure: Callable[[float], float], target: float, feasible: float, steps: int, *,
                  what: str) -> float:
    """Smallest ratio in ``[0, feasible]`` whose dry run measures at or under ``target`` (bisection).

    ``measure`` (MACs or channels left after pruning at a ratio) must not increase with the ratio.
    """
    lo, hi = 0.0, feasible
    if measure(hi) > target:
        logger.warning("%s is out of reach under the per-layer floor; pruning %.4f", what, hi)
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if measure(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


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
    replay_pruning_(model, x, state["pruning_history"], adapters=uses_adapters(meta["model"]))
    model.load_state_dict(state["model"])
    return model
