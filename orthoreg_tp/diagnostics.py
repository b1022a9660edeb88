"""Diagnostics of OrthoReg's central claim: is the sum of single-channel importances a group's importance?

:func:`additivity` draws random groups of channels from a layer, *predicts* each group's importance as the sum
of its channels' single-channel scores (the Fisher score ``(sum theta * g_bar)^2`` by default, or any
torch-pruning importance), *measures* the loss change when the group is removed, and reports how well the
two agree (Spearman rank correlation and a scale-free relative error), per layer and pooled over layers.

Removal is simulated exactly and without touching a weight: the group's channels are zeroed at the input of
every conv/linear layer that consumes them (forward pre-hooks, removed afterwards), which gives the same
outputs as physically pruning the group with torch-pruning (also for residual streams, whose channels are
zeroed at every consumer).

The pure math (:func:`rankdata`, :func:`spearman`, :func:`relative_error`, :func:`sample_groups`) is
tensor-in / tensor-out; :func:`mask_channels` and :func:`mean_loss` are the measuring primitives.

Example:
    >>> from orthoreg_tp.diagnostics import additivity
    >>> result = additivity(model, held_batches, None, group_size=0.25, num_groups=20)  # doctest: +SKIP
    >>> result.overall.spearman, result.overall.additive_relative_error  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from . import _compat
from .accumulate import model_device, to_device
from .floor import is_protected
from .importance import AccumulatingImportance, LossFn, OrthoRegImportance, default_loss
from .metrics import filter_correlations, layer_widths, orthonormality
from .regularizer import find_classifier

# Layers whose output depends on *all* channels of their input (normalization over the channel dim,
# attention, free parameters): zeroing a channel there is not the same as removing it.
_NOT_MASKABLE = (nn.Parameter, nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention, nn.Embedding)
_CONSUMERS = (nn.modules.conv._ConvNd, nn.Linear)


# ---------------------------------------------------------------------------------------------- pure math
def rankdata(x: Tensor) -> Tensor:
    """Ranks ``1..n`` of a 1-D tensor, ties sharing their average rank (as ``scipy.stats.rankdata``).

    Args:
        x: A 1-D tensor.

    Returns:
        A float64 tensor of ranks, shaped like ``x``.

    Example:
        >>> rankdata(torch.tensor([3.0, 1.0, 3.0]))
        tensor([2.5000, 1.0000, 2.5000], dtype=torch.float64)
    """
    if x.dim() != 1:
        raise ValueError(f"rankdata needs a 1-D tensor, got shape {tuple(x.shape)}")
    n = x.numel()
    values, order = torch.sort(x.detach().double(), stable=True)
    ranks = torch.empty(n, dtype=torch.float64, device=x.device)
    start = 0
    while start < n:  # walk runs of equal values; n is small (groups of a diagnostic)
        end = start + 1
        while end < n and values[end] == values[start]:
            end += 1
        ranks[order[start:end]] = (start + end + 1) / 2.0
        start = end
    return ranks


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman rank correlation of two equally long 1-D tensors (Pearson correlation of their ranks).

    Args:
        x: Predicted values.
        y: Measured values.

    Returns:
        A float64 scalar in ``[-1, 1]``; ``nan`` when either input has fewer than 2 distinct values.

    Example:
        >>> float(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 15.0])))
        0.5
    """
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"spearman needs two 1-D tensors of equal length, got {tuple(x.shape)} and {tuple(y.shape)}")
    rx = rankdata(x) - (x.numel() + 1) / 2.0
    ry = rankdata(y) - (y.numel() + 1) / 2.0
    denom = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    if x.numel() < 2 or denom == 0:
        return torch.full((), float("nan"), dtype=torch.float64)
    return ((rx * ry).sum() / denom).clamp(-1.0, 1.0)


def relative_error(predicted: Tensor, measured: Tensor, *, fit_scale: bool = False) -> Tensor:
    """``||c * predicted - measured||_2 / ||measured||_2`` over groups.

    With ``fit_scale=True``, ``c`` is the least-squares scale ``<p, m> / <p, p>``: a scale-free error for
    predictors in other units than a loss (the Fisher score is a squared first-order loss change; global
    ranking uses only its proportions). The value then lies in ``[0, 1]``: 0 when the prediction is exactly
    proportional to the measurement, 1 when it explains none of it. With ``fit_scale=False``, ``c = 1``
    (a prediction in loss units, such as the sum of measured single-channel loss changes).

    Args:
        predicted: 1-D predicted importances.
        measured: 1-D measured loss changes, same length.
        fit_scale: Fit the scale ``c`` first.

    Returns:
        A float64 scalar; ``nan`` when ``measured`` is all zero.

    Example:
        >>> float(relative_error(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), fit_scale=True))
        0.0
    """
    if predicted.shape != measured.shape or predicted.dim() != 1:
        raise ValueError(
            f"relative_error needs two 1-D tensors of equal length, got {tuple(predicted.shape)} and "
            f"{tuple(measured.shape)}"
        )
    p, m = predicted.detach().double(), measured.detach().double()
    norm_m = m.norm()
    if norm_m == 0:
        return torch.full((), float("nan"), dtype=torch.float64)
    scale = torch.ones((), dtype=torch.float64)
    if fit_scale:
        pp = (p * p).sum()
        scale = (p * m).sum() / pp if pp > 0 else torch.zeros((), dtype=torch.float64)
    return (scale * p - m).norm() / norm_m


def sample_groups(width: int, group_size: int, num_groups: int, *, generator: torch.Generator) -> list[list[int]]:
    """``num_groups`` random groups of ``group_size`` distinct channels out of ``width``, each sorted.

    Args:
        width: Number of channels to draw from.
        group_size: Channels per group, ``1 <= group_size <= width``.
        num_groups: Number of groups (they may repeat).
        generator: Seeded ``torch.Generator`` (reproducible draws).

    Returns:
        A list of sorted channel-index lists.

    Example:
        >>> sample_groups(8, 3, 2, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
        [[0, 4, 7], [1, 2, 6]]
    """
    if not 1 <= group_size <= width:
        raise ValueError(f"group_size must be in [1, {width}] for a layer of width {width}, got {group_size!r}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups!r}")
    return [sorted(torch.randperm(width, generator=generator)[:group_size].tolist()) for _ in range(num_groups)]


# ---------------------------------------------------------------------------------------------- masking
def _consumer_masks(group: Any, channels: Sequence[int]) -> dict[nn.Module, list[int]]:
    """Input indices to zero at each conv/linear consumer so that ``channels`` (root indices) vanish."""
    chosen = set(int(c) for c in channels)
    masks: dict[nn.Module, set[int]] = {}
    consumers = 0
    for i, (dep, idxs) in enumerate(group):
        layer = dep.layer
        if isinstance(layer, _NOT_MASKABLE):
            raise ValueError(
                f"cannot simulate removing channels of this group by masking: it contains "
                f"{_compat.layer_name(group, layer)!r} ({type(layer).__name__}), whose output mixes channels"
            )
        if not isinstance(layer, _CONSUMERS) or _compat.handler_direction(dep.handler):
            continue
        consumers += 1
        root = _compat.root_indices(group, i)
        if root is None:
            raise ValueError(f"torch-pruning could not map the channels of {_compat.layer_name(group, layer)!r}")
        picked = {int(idx) for idx, r in zip(idxs, root) if int(r) in chosen}
        if picked:
            masks.setdefault(layer, set()).update(picked)
    if consumers == 0:
        raise ValueError(
            f"group rooted at {_compat.layer_name(group, group[0].dep.target.module)!r} has no conv/linear layer "
            "consuming its channels, so removing them cannot be simulated by masking"
        )
    return {layer: sorted(idx) for layer, idx in masks.items()}


def _mask_hook(layer: nn.Module, idxs: list[int]):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1
        keep = torch.ones(x.shape[dim], dtype=x.dtype, device=x.device)
        keep[idxs] = 0
        shape = [1] * x.dim()
        shape[dim] = -1
        return (x * keep.view(shape), *args[1:])

    return hook


@contextlib.contextmanager
def mask_channels(group: Any, channels: Sequence[int]) -> Iterator[None]:
    """Within the block, the model behaves as if ``channels`` of ``group`` were pruned.

    The channels are zeroed at the input of every conv/linear layer of the group that consumes them; no
    parameter or buffer is touched and the hooks are removed on exit (also on exceptions).

    Args:
        group: A torch-pruning group (``DependencyGraph.get_pruning_group``), covering the channels.
        channels: Root indices of the channels to remove (empty: no change).

    Raises:
        ValueError: If the group contains a layer that mixes channels (LayerNorm, GroupNorm, attention,
            free parameters) or no conv/linear consumer, where masking is not equivalent to removal.

    Example:
        >>> with mask_channels(group, [0, 3]):  # doctest: +SKIP
        ...     loss = mean_loss(model, batches)
    """
    handles = []
    try:
        for layer, idxs in _consumer_masks(group, channels).items():
            handles.append(layer.register_forward_pre_hook(_mask_hook(layer, idxs)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable, *, loss_fn: LossFn = default_loss) -> float:
    """Mean loss over all samples of ``batches`` (``(inputs, targets)`` pairs), as a float64 sum.

    The model runs in whatever mode it is in; :func:`additivity` puts it in eval mode.

    Example:
        >>> mean_loss(model.eval(), [(x, y)])  # doctest: +SKIP
        0.1234
    """
    device = model_device(model)
    total, count = 0.0, 0
    for x, y in batches:
        y = y.to(device)
        total += float(loss_fn(model(to_device(x, device)), y).double()) * y.shape[0]
        count += y.shape[0]
    if count == 0:
        raise ValueError("batches yielded no samples to measure the loss on")
    return total / count


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class AdditivityStats:
    """Agreement of predicted and measured group importances.

    Attributes:
        num_groups: Groups compared.
        spearman: Rank correlation of the predicted importance (sum of single-channel scores) with the
            measured loss change of the group.
        relative_error: ``||c p - m|| / ||m||`` with the least-squares scale ``c`` (0 = proportional).
        additive_spearman: Rank correlation of the *sum of measured single-channel loss changes* with the
            measured group loss change (additivity itself, free of the score's approximation), or ``None``.
        additive_relative_error: ``||sum of single changes - group change|| / ||group change||`` (no scale
            fit: both are loss changes), or ``None``.
        additive_ratio: ``sum of group changes / sum of their single-channel changes``: 1 when removals add up,
            above 1 when removing channels together costs more than the parts (interactions), or ``None``.
    """

    num_groups: int
    spearman: float
    relative_error: float
    additive_spearman: float | None = None
    additive_relative_error: float | None = None
    additive_ratio: float | None = None

    @classmethod
    def compute(cls, predicted: Tensor, measured: Tensor, singles: Tensor | None = None) -> AdditivityStats:
        """Statistics of 1-D ``predicted``/``measured`` (and optional ``singles``) tensors.

        Example:
            >>> AdditivityStats.compute(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])).spearman
            1.0
        """
        add_rho = add_err = add_ratio = None
        if singles is not None:
            add_rho = float(spearman(singles, measured))
            add_err = float(relative_error(singles, measured))
            total = float(singles.double().sum())
            add_ratio = float(measured.double().sum()) / total if total != 0 else float("nan")
        return cls(
            num_groups=int(measured.numel()),
            spearman=float(spearman(predicted, measured)),
            relative_error=float(relative_error(predicted, measured, fit_scale=True)),
            additive_spearman=add_rho,
            additive_relative_error=add_err,
            additive_ratio=add_ratio,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable)."""
        return asdict(self)


@dataclass(frozen=True)
class LayerAdditivity:
    """Per-layer additivity measurements.

    Attributes:
        name: The group's root layer.
        width: Channels of the group.
        groups: The sampled channel groups (root indices).
        predicted: Sum of single-channel scores of each group.
        measured: Loss change when each group is removed (masked loss minus base loss).
        singles: Sum of the measured single-channel loss changes of each group, or ``None``.
        stats: Agreement statistics of this layer.
    """

    name: str
    width: int
    groups: list[list[int]]
    predicted: list[float]
    measured: list[float]
    singles: list[float] | None
    stats: AdditivityStats

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable)."""
        return asdict(self)


@dataclass(frozen=True)
class AdditivityResult:
    """What :func:`additivity` returns.

    Attributes:
        base_loss: Mean loss of the unmodified model on the held data.
        num_samples: Held samples the losses average over.
        layers: One entry per layer or group.
        overall: Statistics pooled over the groups of all layers (global pruning ranks them together).
    """

    base_loss: float
    num_samples: int
    layers: list[LayerAdditivity]
    overall: AdditivityStats

    def __getitem__(self, name: str) -> LayerAdditivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in this result; layers: {[entry.name for entry in self.layers]}")

    @property
    def mean_spearman(self) -> float:
        """Average of the per-layer rank correlations (layers with an undefined one skipped)."""
        values = [entry.stats.spearman for entry in self.layers if not math.isnan(entry.stats.spearman)]
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable).

        Example:
            >>> json.dumps(result.to_dict())  # doctest: +SKIP
        """
        return {
            "base_loss": self.base_loss,
            "num_samples": self.num_samples,
            "mean_spearman": self.mean_spearman,
            "overall": self.overall.to_dict(),
            "layers": [entry.to_dict() for entry in self.layers],
        }


# ---------------------------------------------------------------------------------------------- additivity
LayerSpec = nn.Module | str | Any


def _is_group(obj: Any) -> bool:
    return isinstance(obj, tp.dependency.Group)


def _take_batches(data: Iterable, num_samples: int | None) -> list[tuple[Any, Tensor]]:
    batches, seen = [], 0
    for batch in data:
        x, y = batch[0], batch[1]
        if num_samples is not None:
            take = min(int(y.shape[0]), num_samples - seen)
            x, y = x[:take], y[:take]
        batches.append((x, y))
        seen += int(y.shape[0])
        if num_samples is not None and seen >= num_samples:
            break
    if seen == 0:
        raise ValueError("data yielded no samples for the additivity diagnostic")
    return batches


def _resolve_groups(
    model: nn.Module, layer_or_groups: LayerSpec | Sequence[LayerSpec] | None, example_inputs: Any
) -> list[tuple[str, Any]]:
    """``[(name, full group)]`` for a layer, a layer name, a group, a list of them, or ``None`` (all groups)."""
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    specs = [layer_or_groups] if layer_or_groups is None or isinstance(layer_or_groups, nn.Module | str) or _is_group(
        layer_or_groups
    ) else list(layer_or_groups)
    if not specs:
        raise ValueError(f"layer_or_groups must name at least one layer or group, got {layer_or_groups!r}")
    graph = None

    def dependency_graph() -> tp.DependencyGraph:
        nonlocal graph
        if graph is None:
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        return graph

    out: list[tuple[str, Any]] = []
    for spec in specs:
        if spec is None:
            head = find_classifier(model)
            ignored = [head] if head is not None else []
            order = {m: i for i, m in enumerate(modules.values())}
            found = dependency_graph().get_all_groups(ignored_layers=ignored, root_module_types=_CONSUMERS)
            for group in sorted(found, key=lambda g: order.get(g[0].dep.target.module, len(order))):
                out.append((names.get(group[0].dep.target.module, "?"), group))
            continue
        if _is_group(spec):
            out.append((_compat.layer_name(spec, spec[0].dep.target.module), spec))
            continue
        if isinstance(spec, str):
            if spec not in modules:
                raise ValueError(f"model has no layer named {spec!r}")
            spec = modules[spec]
        if not isinstance(spec, _CONSUMERS):
            raise ValueError(f"layer_or_groups entries must be conv/linear layers, names or groups, got {spec!r}")
        if spec not in names:
            raise ValueError(f"layer {spec!r} is not part of the model")
        dg = dependency_graph()
        pruner = dg.get_pruner_of_module(spec)
        width = pruner.get_out_channels(spec)
        out.append((names[spec], dg.get_pruning_group(spec, pruner.prune_out_channels, list(range(width)))))
    if not out:
        raise ValueError("found no prunable group in the model (is every conv/linear layer the classifier?)")
    return out


def _single_scores(importance: Any, group: Any, name: str) -> Tensor:
    with torch.no_grad():
        scores = importance(group)
    if scores is None:
        raise ValueError(f"importance {type(importance).__name__} returned no scores for {name!r}")
    scores = scores.detach().double().cpu()
    if scores.numel() != len(group[0].idxs):
        raise ValueError(f"importance returned {scores.numel()} scores for {len(group[0].idxs)} channels of {name!r}")
    if not torch.isfinite(scores).all() or bool(is_protected(scores).any()):
        raise ValueError(
            f"importance {type(importance).__name__} returned non-finite or floor-protected scores for {name!r} (a "
            "per-layer floor raises its protected channels above every real score): build it with min_keep_ratio=None"
        )
    return scores


def _group_size(group_size: int | float, width: int | None, name: str) -> int:
    """Channels per group for a layer of ``width`` (``width=None``: only validate ``group_size``)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int | float):
        raise ValueError(f"group_size must be an int or a float in (0, 1), got {group_size!r}")
    if isinstance(group_size, float):
        if not 0.0 < group_size < 1.0:
            raise ValueError(f"a float group_size is a fraction of the width and must be in (0, 1), got {group_size!r}")
        return 1 if width is None else max(1, round(group_size * width))
    if width is None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size!r}")
        return group_size
    if not 1 <= group_size <= width:
        raise ValueError(f"group_size must be in [1, {width}] for layer {name!r} of width {width}, got {group_size!r}")
    return group_size


def additivity(
    model: nn.Module,
    data: Iterable,
    layer_or_groups: LayerSpec | Sequence[LayerSpec] | None,
    *,
    group_size: int | float = 0.25,
    num_groups: int = 20,
    importance: Any = None,
    score_data: Iterable | None = None,
    score_samples: int = 10_000,
    num_samples: int | None = None,
    measure_singles: bool = True,
    loss_fn: LossFn = default_loss,
    seed: int = 0,
    example_inputs: Any = None,
) -> AdditivityResult:
    """How well summed single-channel importances predict the loss change of removing a group of channels.

    For each layer (or group), ``num_groups`` random groups of ``group_size`` channels are drawn. For each group:
    *predicted* = sum of the channels' single-channel scores; *measured* = mean loss on ``data`` with the group
    removed (masked, see :func:`mask_channels`) minus the base loss. With ``measure_singles`` the loss change of
    removing each sampled channel alone is measured too, and its sum per group compared with the group's change
    (additivity itself). The model is left exactly as it was (mode, parameters, buffers, hooks).

    Cost: one pass over ``data`` per group, plus one per distinct sampled channel with ``measure_singles``.

    Args:
        model: A trained model.
        data: Held-out ``(inputs, targets)`` batches (re-iterated once per group; materialized up to
            ``num_samples``).
        layer_or_groups: A conv/linear layer, its qualified name, a torch-pruning group, a list of these, or
            ``None`` for every prunable group (the classifier excluded).
        group_size: Channels per group: an int, or a float in (0, 1) as a fraction of each layer's width.
        num_groups: Groups per layer.
        importance: Single-channel scores: any torch-pruning importance (``imp(group) -> scores``), default
            :class:`~orthoreg_tp.OrthoRegImportance` ``(min_keep_ratio=None)``. An accumulating importance
            without statistics is accumulated on ``score_data``.
        score_data: Data for accumulating the importance (default: ``data``).
        score_samples: Samples to accumulate over (the paper uses 10,000).
        num_samples: Held samples to measure on (default: all of ``data``).
        measure_singles: Also measure single-channel removals (the ``additive_*`` statistics).
        loss_fn: ``loss_fn(output, target) -> mean loss``.
        seed: Seed of the group draws (each layer's draws depend only on the seed and the layer's name).
        example_inputs: Inputs for tracing the dependency graph (default: two samples of ``data``).

    Returns:
        An :class:`AdditivityResult` (per layer and pooled statistics, raw values, ``to_dict()``).

    Raises:
        ValueError: On bad arguments, empty data, unknown layers, or groups that masking cannot simulate.

    Example:
        >>> result = additivity(model, test_loader, ["features.0", "features.4"], group_size=4,
        ...                     num_groups=20, score_data=train_loader)  # doctest: +SKIP
        >>> result.overall.spearman, result["features.0"].stats.relative_error  # doctest: +SKIP
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be positive or None, got {num_samples!r}")
    _group_size(group_size, width=None, name="")  # validate before any work
    batches = _take_batches(data, num_samples)
    device = model_device(model)
    if example_inputs is None:
        x0 = batches[0][0]
        example_inputs = to_device(x0[:2] if isinstance(x0, Tensor) else x0, device)
    was_training = model.training
    try:
        groups = _resolve_groups(model, layer_or_groups, example_inputs)
        imp = importance if importance is not None else OrthoRegImportance(min_keep_ratio=None)
        if isinstance(imp, AccumulatingImportance) and len(imp.stats) == 0:
            imp.accumulate(model, batches if score_data is None else score_data, score_samples, loss_fn=loss_fn,
                           progress=False)
        model.eval()
        count = sum(int(y.shape[0]) for _, y in batches)
        base = mean_loss(model, batches, loss_fn=loss_fn)
        layers = [
            _measure_layer(model, batches, name, group, imp, group_size, num_groups, measure_singles, loss_fn, base,
                           _layer_generator(seed, name))
            for name, group in groups
        ]
    finally:
        model.train(was_training)
    pooled = [torch.tensor([v for entry in layers for v in getattr(entry, key)], dtype=torch.float64)
              for key in ("predicted", "measured")]
    singles = None
    if measure_singles:
        singles = torch.tensor([v for entry in layers for v in entry.singles], dtype=torch.float64)
    overall = AdditivityStats.compute(pooled[0], pooled[1], singles)
    return AdditivityResult(base_loss=base, num_samples=count, layers=layers, overall=overall)


def _layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator per layer, so a layer's draws do not depend on which other layers are measured."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _measure_layer(
    model: nn.Module,
    batches: list,
    name: str,
    group: Any,
    importance: Any,
    group_size: int | float,
    num_groups: int,
    measure_singles: bool,
    loss_fn: LossFn,
    base: float,
    generator: torch.Generator,
) -> LayerAdditivity:
    width = len(group[0].idxs)
    size = _group_size(group_size, width, name)
    scores = _single_scores(importance, group, name)
    draws = sample_groups(width, size, num_groups, generator=generator)

    def change(channels: Sequence[int]) -> float:
        with mask_channels(group, channels):
            return mean_loss(model, batches, loss_fn=loss_fn) - base

    predicted = torch.stack([scores[g].sum() for g in draws])
    measured = torch.tensor([change(g) for g in draws], dtype=torch.float64)
    singles = None
    if measure_singles:
        single = {c: change([c]) for c in sorted({c for g in draws for c in g})}
        singles = torch.tensor([sum(single[c] for c in g) for g in draws], dtype=torch.float64)
    return LayerAdditivity(
        name=name,
        width=width,
        groups=draws,
        predicted=predicted.tolist(),
        measured=measured.tolist(),
        singles=None if singles is None else singles.tolist(),
        stats=AdditivityStats.compute(predicted, measured, singles),
    )


# ---------------------------------------------------------------------------------------------- correlation report
@dataclass(frozen=True)
class LayerCorrelation:
    """Orthonormality and filter correlation of one conv/linear layer.

    Attributes:
        name: Qualified layer name.
        width: Output channels.
        orthonormality: The paper's degree ``||diag(G)||_1 / ||G||_1`` (1.0 = orthogonal filters).
        correlation: Mean absolute cosine similarity between distinct filters (0 = orthogonal); ``nan`` for a
            single-filter layer.
    """

    name: str
    width: int
    orthonormality: float
    correlation: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable)."""
        return asdict(self)


def correlation_report(model: nn.Module, *, include_bias: bool = True) -> list[LayerCorrelation]:
    """Per-layer orthonormality and mean ``|cos|`` between distinct filters, in module order.

    Args:
        model: Any model.
        include_bias: Append biases as a filter column, as the regularizer does.

    Returns:
        One :class:`LayerCorrelation` per conv/linear layer.

    Example:
        >>> layer = nn.Linear(4, 4, bias=False)
        >>> _ = nn.init.orthogonal_(layer.weight)
        >>> round(correlation_report(nn.Sequential(layer))[0].correlation, 4)
        0.0
    """
    degrees = orthonormality(model, include_bias=include_bias)
    correlations = filter_correlations(model, include_bias=include_bias)
    widths = layer_widths(model)
    return [
        LayerCorrelation(name, widths[name], degree, correlations.get(name, float("nan")))
        for name, degree in degrees.items()
    ]
