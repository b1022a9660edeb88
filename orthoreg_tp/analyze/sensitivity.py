"""Group sensitivity analysis: prune one dependency group alone, measure the loss, put it back.

For every group torch-pruning would rank (the coupled channels removed together: a convolution with its
BatchNorm and its consumers' input slices; every convolution writing into one residual stream), at each level the
group's lowest-scored ``level`` of its channels is removed on the live model, the loss and accuracy on a few
batches are measured, and the model is restored in place (same module and parameter objects). Beside the measured
loss change stands the importance's prediction of it (docs/sensitivity.md): for the OrthoReg / Fisher score
``I_c = (sum theta * g_bar)^2`` the additive second-order estimate ``0.5 * sum_{c in S} I_c`` of removing the set
``S``, the same estimate with the cross terms ``0.5 * (sum_{c in S} sum theta * g_bar)^2``, and the first-order
Taylor term ``-sum_{c in S} sum theta * g_bar``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from orthoreg_tp.analyze import sensitivity
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    >>> batches = [(torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))) for _ in range(2)]
    >>> result = sensitivity(model, batches[0][0][:1], batches, levels=(0.5,), progress=False)
    >>> sorted({row["group"] for row in result.rows}), result.rows[0]["removed"]
    ([0, 1], 4)
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import _compat
from ..adapters import build_pruner, restore, snapshot
from ..floor import FloorImportance, is_protected, keep_floor
from ..importance import OrthoRegImportance, default_loss
from .prefix_cache import PrefixCache, changed_modules
from .result import SensitivityResult

__all__ = ["Measurement", "measure", "predicted_deltas", "removal_indices", "sensitivity"]

LossFn = Callable[[Any, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------- pure helpers
def removal_indices(scores: Tensor, level: float, *, channel_groups: int = 1, floor: int = 0,
                    round_to: int | None = None) -> Tensor:
    """Root channels to remove from one group at ``level``: its lowest-scored, as torch-pruning's step picks them.

    ``size - int(size * (1 - level))`` channels of the ``size = len(scores) // channel_groups`` per-group
    channels go (torch-pruning's own count), never the ``floor`` best ones nor a protected channel
    (:func:`orthoreg_tp.floor.is_protected`); with ``round_to`` the kept width is rounded *up* to a multiple.
    With channel groups (grouped convolutions) the scores are averaged over the groups and the same positions
    go in every group.

    Args:
        scores: One score per root channel (higher = keep); ``nan`` counts as keep.
        level: Fraction of the channels to remove, in ``(0, 1)``.
        channel_groups: torch-pruning's channel groups of the group.
        floor: Channels the group keeps at least.
        round_to: Kept width multiple (``None``: any).

    Returns:
        Sorted ``int64`` indices (empty when the floor or rounding leaves nothing to remove).

    Example:
        >>> removal_indices(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.5).tolist()
        [1, 3]
        >>> removal_indices(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.75, floor=2).tolist()
        [1, 3]
        >>> removal_indices(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.5, channel_groups=2).tolist()
        [1, 3]
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if channel_groups < 1 or scores.numel() % channel_groups:
        raise ValueError(f"channel_groups must divide the {scores.numel()} scores, got {channel_groups!r}")
    flat = scores.detach().float().reshape(-1).cpu()
    dim = flat.view(channel_groups, -1).mean(0) if channel_groups > 1 else flat
    size = dim.numel()
    count = size - int(size * (1.0 - level))
    count = min(count, size - max(floor, int(is_protected(dim).sum())))
    if round_to is not None and round_to > 1 and count > 0:
        count = max(0, size - math.ceil((size - count) / round_to) * round_to)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(dim.nan_to_num(nan=float("inf")), stable=True)[:count].sort().values
    if channel_groups > 1:
        order = torch.cat([order + size * g for g in range(channel_groups)])
    return order


def predicted_deltas(scores: Tensor | None, signed: Tensor | None, idxs: Tensor) -> dict[str, float | None]:
    """The Fisher importance's loss-change estimates for removing the channels ``idxs`` (docs/sensitivity.md).

    Args:
        scores: Per-channel scores ``I_c = (sum theta * g_bar)^2`` (``None``: the importance predicts nothing).
        signed: Per-channel ``sum theta * g_bar`` (``None`` if unknown).
        idxs: Removed root channels.

    Returns:
        ``predicted_loss_delta`` (``0.5 * sum I_c``, additive), ``predicted_joint_loss_delta``
        (``0.5 * (sum signed)^2``, with the cross terms) and ``first_order_loss_delta`` (``-sum signed``).

    Example:
        >>> d = predicted_deltas(torch.tensor([4.0, 1.0]), torch.tensor([2.0, -1.0]), torch.tensor([0, 1]))
        >>> d["predicted_loss_delta"], d["predicted_joint_loss_delta"], d["first_order_loss_delta"]
        (2.5, 0.5, -1.0)
    """
    out: dict[str, float | None] = dict.fromkeys(
        ("predicted_loss_delta", "predicted_joint_loss_delta", "first_order_loss_delta"))
    if scores is not None:
        out["predicted_loss_delta"] = 0.5 * float(scores.double()[idxs].sum())
    if signed is not None:
        total = float(signed.double()[idxs].sum())
        out["predicted_joint_loss_delta"] = 0.5 * total * total
        out["first_order_loss_delta"] = -total
    return out


# ----------------------------------------------------------------------------------------------- measuring
def _run(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, Mapping) else model(x)


def _logits(output: Any) -> Any:
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "logits", output)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        return _batch_size(next(iter(x.values())))
    return _batch_size(x[0])


@dataclass(frozen=True)
class Measurement:
    """Loss (sample-weighted mean), accuracy in % (``None`` when targets are not class indices), output shapes."""

    loss: float
    acc: float | None
    shapes: tuple[tuple[int, ...], ...]


@torch.no_grad()
def measure(model: nn.Module, batches: Sequence[tuple[Any, Tensor]], loss_fn: LossFn) -> Measurement:
    """Evaluate ``model`` (as it is: call it in eval mode) on ``batches``.

    Example:
        >>> m = measure(nn.Linear(3, 2), [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))], default_loss)
        >>> m.acc is not None, m.shapes
        (True, ((4, 2),))
    """
    total = loss = correct = 0.0
    counted = 0
    shapes = []
    for x, y in batches:
        out = _run(model, x)
        n = _batch_size(x)
        loss += float(loss_fn(out, y)) * n
        total += n
        logits = _logits(out)
        shapes.append(tuple(logits.shape) if isinstance(logits, Tensor) else ())
        if (isinstance(logits, Tensor) and logits.ndim == 2 and y.ndim == 1 and not y.is_floating_point()
                and len(y) == len(logits)):
            correct += float((logits.argmax(1) == y).sum())
            counted += n
    return Measurement(loss / max(total, 1), 100.0 * correct / counted if counted else None, tuple(shapes))


def _take(data: Iterable, num_batches: int, device: torch.device) -> list[tuple[Any, Tensor]]:
    batches = []
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"data must yield (inputs, targets) batches, got {type(batch).__name__}")
        batches.append((_to(batch[0], device), _to(batch[1], device)))
        if len(batches) == num_batches:
            break
    if not batches:
        raise ValueError("data yielded no batches")
    return batches


# ----------------------------------------------------------------------------------------------- state
class _ModelState:
    """Train/eval modes and ``requires_grad`` flags of a model, put back by :meth:`restore`."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.flags = [(m, k, p.requires_grad) for m in model.modules() for k, p in m._parameters.items()
                      if p is not None]

    def restore(self) -> None:
        for m, training in self.modes:
            m.training = training
        self.restore_flags()

    def restore_flags(self) -> None:
        for m, key, flag in self.flags:
            p = m._parameters.get(key)
            if p is not None:
                p.requires_grad_(flag)


class _GraphState:
    """What pruning a group changes in the dependency graph itself, outside the model.

    torch-pruning's op nodes (concat sizes, split sizes, slice bounds) are edited in place, and an unwrapped
    ``nn.Parameter`` is replaced in the graph's maps; :func:`~orthoreg_tp.adapters.restore` puts back the model
    only. The graph refreshes its index mappings from these after every prune.
    """

    def __init__(self, graph: Any, model: nn.Module) -> None:
        own = {id(m) for m in model.modules()}
        self.graph = graph
        self.module2node = dict(graph.module2node)
        self.nodes = [(node, node.module) for node in graph.module2node.values()]
        self.param_to_name = dict(getattr(graph, "_param_to_name", {}))
        self.ops = [(m, {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in vars(m).items()})
                    for m in graph.module2node if isinstance(m, nn.Module) and id(m) not in own]

    def restore(self) -> None:
        self.graph.module2node.clear()
        self.graph.module2node.update(self.module2node)
        for node, module in self.nodes:
            node.module = module
        if hasattr(self.graph, "_param_to_name"):
            self.graph._param_to_name.clear()
            self.graph._param_to_name.update(self.param_to_name)
        for m, attrs in self.ops:
            m.__dict__.clear()
            m.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in attrs.items()})


# ----------------------------------------------------------------------------------------------- planning
@dataclass
class _Group:
    """One ranked group with its scores on the unpruned model."""

    index: int
    group: Any
    root: str
    root_module: nn.Module
    layers: list[str]
    channels: int
    channel_groups: int
    scores: Tensor | None
    signed: Tensor | None
    error: str | None = None


def _signed_view(importance: Any) -> Any | None:
    """The same Fisher importance returning ``sum theta * g_bar`` per channel (no square, floor or normalizer)."""
    if not isinstance(importance, OrthoRegImportance) or importance.normalizer is not None:
        return None
    view = copy.copy(importance)  # shares the accumulated statistics
    view.floor, view.normalizer = None, None
    view._finalize = lambda sums: sums  # instance attribute: this copy only
    return view


def _plan(pruner: Any, importance: Any, predicts: bool) -> list[_Group]:
    names = {m: n for n, m in pruner.model.named_modules()}
    signed_imp = _signed_view(importance) if predicts else None
    roots = tuple(pruner.root_module_types)
    plans = []
    for index, (group, ch_groups) in enumerate(_compat.ranked_groups(pruner)):
        root = group[0].dep.target.module
        layers = []
        for item in group:
            m = item.dep.target.module
            if (isinstance(m, roots) and pruner.DG.is_out_channel_pruning_fn(item.dep.handler)
                    and names.get(m) not in layers):
                layers.append(names.get(m, type(m).__name__))
        scores = pruner.estimate_importance(group)
        signed = signed_imp(group) if signed_imp is not None else None
        plans.append(_Group(index, group, names.get(root, type(root).__name__), root, layers,
                            len(group[0].idxs), ch_groups,
                            None if scores is None else scores.detach().float().cpu(),
                            None if signed is None else signed.detach().float().cpu()))
    return plans


# ----------------------------------------------------------------------------------------------- one trial
def _row(plan: _Group, level: float, **values: Any) -> dict[str, Any]:
    row = {"group": plan.index, "root": plan.root, "layers": list(plan.layers), "level": float(level),
           "channels": plan.channels, "removed": 0, "loss": None, "acc": None, "loss_delta": None,
           "acc_delta": None, "predicted_loss_delta": None, "predicted_joint_loss_delta": None,
           "first_order_loss_delta": None, "params_removed": 0, "status": "ok", "note": ""}
    row.update(values)
    return row


def _trial(ctx: _Context, plan: _Group, level: float) -> dict[str, Any]:
    """Prune ``plan``'s group alone at ``level``, measure, restore; a failure becomes the row's status."""
    if plan.scores is None:
        return _row(plan, level, status="unscored", note="the importance returned no scores for this group")
    floor = keep_floor(plan.channels // plan.channel_groups, ctx.min_keep_ratio) if ctx.min_keep_ratio is not None \
        else 0
    idxs = removal_indices(plan.scores, level, channel_groups=plan.channel_groups, floor=floor,
                           round_to=getattr(ctx.pruner, "round_to", None))
    if idxs.numel() == 0:
        return _row(plan, level, status="skipped", note="nothing to remove at this level (per-layer floor)")
    predicted = predicted_deltas(plan.scores if ctx.predicts else None, plan.signed, idxs)
    snap, graph = snapshot(ctx.model), _GraphState(ctx.pruner.DG, ctx.model)
    params_before = sum(p.numel() for p in ctx.model.parameters())
    try:
        plan.group.prune(idxs=[int(i) for i in idxs])
        ctx.pruner.finalize()
        params_removed = params_before - sum(p.numel() for p in ctx.model.parameters())
        after = _measure_trial(ctx, snap)
    except Exception as err:  # noqa: BLE001 - any failure of this group is reported in its row
        return _row(plan, level, removed=int(idxs.numel()), status="failed",
                    note=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300], **predicted)
    finally:
        restore(snap)
        graph.restore()
    if after.shapes != ctx.baseline.shapes:
        return _row(plan, level, removed=int(idxs.numel()), status="failed", params_removed=params_removed,
                    note=f"output shape changed: {after.shapes[0]} instead of {ctx.baseline.shapes[0]}",
                    **predicted)
    acc_delta = None if after.acc is None or ctx.baseline.acc is None else after.acc - ctx.baseline.acc
    return _row(plan, level, removed=int(idxs.numel()), loss=after.loss, acc=after.acc,
                loss_delta=after.loss - ctx.baseline.loss, acc_delta=acc_delta, params_removed=params_removed,
                note="" if math.isfinite(after.loss) else "non-finite loss", **predicted)


def _measure_trial(ctx: _Context, snap: Any) -> Measurement:
    """:func:`measure` the pruned model, reusing the baseline outputs of the top-level blocks it left unchanged."""
    if ctx.cache is None:
        return measure(ctx.model, ctx.batches, ctx.loss_fn)
    changed = changed_modules(snap.modules)
    unchanged = [c for c in ctx.cache.children if not any(m in changed for m in c.modules())]
    with ctx.cache.reusing(unchanged):
        return measure(ctx.model, ctx.batches, ctx.loss_fn)


@dataclass
class _Context:
    model: nn.Module
    pruner: Any
    batches: list[tuple[Any, Tensor]]
    loss_fn: LossFn
    baseline: Measurement
    predicts: bool
    min_keep_ratio: float | None
    cache: PrefixCache | None


# ----------------------------------------------------------------------------------------------- entry point
def _default_importance(model: nn.Module, batches: list, loss_fn: LossFn,
                        min_keep_ratio: float | None) -> tuple[Any, str]:
    """OrthoReg's Fisher score on the analysis batches; L2 magnitude when the loss has no gradient."""
    imp = OrthoRegImportance(min_keep_ratio=min_keep_ratio)
    try:
        imp.accumulate(model, batches, num_samples=sum(_batch_size(x) for x, _ in batches), loss_fn=loss_fn,
                       progress=False)
        return imp, "orthoreg"
    except (ValueError, RuntimeError) as err:
        warnings.warn(f"sensitivity: no data gradient ({type(err).__name__}: {err}); ranking channels by L2 "
                      "magnitude instead, without a predicted loss change", stacklevel=3)
        magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
        if min_keep_ratio is None:
            return magnitude, "magnitude"
        return FloorImportance(magnitude, min_keep_ratio=min_keep_ratio), "magnitude"


def _check_options(levels: Sequence[float], num_batches: int, min_keep_ratio: float | None) -> tuple[float, ...]:
    levels = tuple(float(v) for v in levels)
    if not levels or any(not 0.0 < v < 1.0 for v in levels):
        raise ValueError(f"levels must be fractions in (0, 1), got {levels!r}")
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    if min_keep_ratio is not None and not 0.0 <= min_keep_ratio < 1.0:
        raise ValueError(f"min_keep_ratio must be in [0, 1) or None, got {min_keep_ratio!r}")
    return tuple(sorted(set(levels)))


def sensitivity(model: nn.Module, example_inputs: Any, data: Iterable, *,
                levels: Sequence[float] = (0.25, 0.5, 0.75), num_batches: int = 4, loss_fn: LossFn | None = None,
                importance: Any = None, min_keep_ratio: float | None = 0.05, progress: bool = True,
                prefix_cache: bool = True, **pruner_kwargs: Any) -> SensitivityResult:
    """Prune each dependency group alone at each level, measure the loss and accuracy change, restore it.

    The groups are those :func:`orthoreg_tp.adapters.build_pruner` ranks (the adapters' graph, the spec's
    ignored layers and fix-ups). The baseline is measured once; each trial removes the group's lowest-scored
    channels (:func:`removal_indices`), applies the fix-ups, measures the same batches in eval mode and restores
    the model in place. A group whose pruning or forward raises, or that changes the output shape, gets a
    ``"failed"`` row with the reason. At the end the model has its original modules, parameter objects and
    values, train/eval modes and ``requires_grad`` flags.

    Args:
        model: The model to analyse (pruned and restored in place).
        example_inputs: Inputs for tracing (a tensor, a tuple/list of positional inputs, or a dict).
        data: Iterable of ``(inputs, targets)`` batches; the first ``num_batches`` are used (moved to the model's
            device) for the baseline, every trial and the default importance.
        levels: Fractions of a group's channels to remove, each in ``(0, 1)``.
        num_batches: Batches to measure on.
        loss_fn: ``loss_fn(output, targets) -> mean loss``; default: cross-entropy on the (first) output.
        importance: A torch-pruning importance to choose the channels; default: ``OrthoRegImportance``
            accumulated on the same batches (L2 magnitude, with a warning, when the loss has no gradient). The
            predicted loss change is reported for Fisher-type scores (``OrthoRegImportance`` and its subclasses,
            without a normalizer) only.
        min_keep_ratio: Per-layer floor: a group keeps ``int(min_keep_ratio * width) + 1`` channels; ``None``: no
            floor.
        progress: Show a tqdm progress bar.
        prefix_cache: Reuse the baseline outputs of the model's top-level blocks that a trial leaves unchanged and
            calls with equal inputs (up to 1 GiB of recorded tensors; see
            :mod:`orthoreg_tp.analyze.prefix_cache`); ``False``: run every block in every trial.
        **pruner_kwargs: For :func:`~orthoreg_tp.adapters.build_pruner` (``ignored_layers``, ``num_heads``...).

    Returns:
        A :class:`SensitivityResult`.

    Raises:
        ValueError: Bad options, or ``data`` yields nothing.
        Exception: Whatever the importance raised (the model is restored).

    Example:
        >>> result = sensitivity(model, x, loader, levels=(0.25, 0.5))  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
    """
    levels = _check_options(levels, num_batches, min_keep_ratio)
    start = time.perf_counter()
    loss_fn = loss_fn or default_loss
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = _take(data, num_batches, device)
    state = _ModelState(model)
    final = snapshot(model)
    try:
        model.eval()
        if importance is None:
            importance, kind = _default_importance(model, batches, loss_fn, min_keep_ratio)
        else:
            kind = type(importance).__name__
        cache = PrefixCache(model) if prefix_cache else None
        with cache.recording() if cache is not None else contextlib.nullcontext():
            baseline = measure(model, batches, loss_fn)
        for p in model.parameters():
            p.requires_grad_(True)  # torch-pruning traces the graph through autograd
        pruner = build_pruner(model, example_inputs, importance=importance, pruning_ratio=0.0, **pruner_kwargs)
        model.eval()
        state.restore_flags()  # frozen parameters stay unscored, as the importance accumulated them
        predicts = isinstance(importance, OrthoRegImportance) and importance.normalizer is None
        plans = _plan(pruner, importance, predicts)
        ctx = _Context(model, pruner, batches, loss_fn, baseline, predicts, min_keep_ratio, cache)
        rows = []
        with tqdm(total=len(plans) * len(levels), desc="sensitivity", unit="trial", disable=not progress) as bar:
            for plan in plans:
                for level in levels:
                    rows.append(_trial(ctx, plan, level))
                    bar.update(1)
    finally:
        restore(final)
        state.restore()
    return SensitivityResult(
        rows=rows, baseline_loss=baseline.loss, baseline_acc=baseline.acc, levels=levels, importance=kind,
        num_samples=sum(_batch_size(x) for x, _ in batches), seconds=time.perf_counter() - start,
        model_class=type(model).__name__, roots={p.root: p.root_module for p in plans})
