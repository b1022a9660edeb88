"""Entry points: :func:`prepare`, :func:`prune`, :func:`replay` and :func:`build_pruner`.

:func:`prepare` describes a model, :func:`prune` prunes it (transactionally), :func:`replay` re-applies a pruning
and :func:`build_pruner` hands out a torch-pruning pruner to drive yourself.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from orthoreg_tp._state import eval_mode, requires_grad_all, restore_grad_flags, saved_grad_flags

from ._internal.describe import build_spec, pick_adapter, reference_forward
from ._internal.host import adapted_pruner_class, make_pruner, merge_pruner_kwargs
from ._internal.session import Outcome, execute
from ._internal.tracing import call_style, run_model
from ._internal.verify import layer_widths
from .prune_config import TARGET_KINDS, PruneConfig
from .report import PruneReport
from .spec import PruningSpec

__all__ = ["TARGET_KINDS", "PruneConfig", "build_pruner", "check_importance", "prepare", "prune", "replay"]

_CONFIG_KEYS = frozenset(f.name for f in fields(PruneConfig))
_RESERVED = ("pruning_ratio", "ch_sparsity", "importance", "model", "example_inputs")


def prepare(model: nn.Module, example_inputs: Any, *, freeze_unhandled: bool = True) -> PruningSpec:
    """Describe how to prune ``model`` with torch-pruning (detects timm, torchvision or a generic model).

    Runs one forward pass with autograd (in eval mode; the model's modes are restored) to find the output
    layers, then asks the registered adapters about every module.

    Args:
        model: The model to describe. It is not modified.
        example_inputs: Inputs for one forward pass (a tensor, a tuple/list of positional inputs, or a dict).
        freeze_unhandled: Keep the projections of attention-like modules no adapter understands.

    Returns:
        A frozen :class:`PruningSpec`.

    Raises:
        ValueError: ``example_inputs`` do not run through the model.

    Example:
        >>> import timm, torch, torch_pruning as tp
        >>> from orthoreg_tp.adapters import build_pruner, prepare
        >>> model, x = timm.create_model("test_vit", pretrained=False), torch.randn(1, 3, 160, 160)
        >>> spec = prepare(model, x)
        >>> spec.source
        'timm'
        >>> pruner = build_pruner(model, x, importance=tp.importance.GroupMagnitudeImportance(), spec=spec,
        ...                       pruning_ratio=0.5)
        >>> pruner.step()  # prunes, then applies the spec's fix-ups
    """
    with eval_mode(model):
        adapter = pick_adapter(model)
        unpack, trace = reference_forward(model, example_inputs, adapter.outputs if adapter is not None else None)
        return build_spec(model, example_inputs, unpack, trace, freeze_unhandled=freeze_unhandled, adapter=adapter)


def _split_options(config: PruneConfig | None, options: dict[str, Any]) -> tuple[PruneConfig, dict[str, Any]]:
    """The call's :class:`PruneConfig` and the remaining (torch-pruning) keyword arguments."""
    for key in _RESERVED:
        if key in options:
            raise ValueError(f"pass {key!r} through prune()'s own arguments (ratio=/target=), not as a pruner kwarg")
    if "global_pruning" in options:  # torch-pruning's name for the same choice
        options["global_ranking"] = options.pop("global_pruning")
    given = {k: options.pop(k) for k in list(options) if k in _CONFIG_KEYS}
    given = {k: v for k, v in given.items() if v is not None}
    if config is None:
        return PruneConfig(**given), options
    if not isinstance(config, PruneConfig):
        raise ValueError(f"config must be a PruneConfig, got {type(config).__name__}: {config!r}")
    if given:
        raise ValueError(f"give either config= or the options {sorted(given)}, got both")
    return config, options


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    importance: Any,
    ratio: float | None = None,
    target: tuple[str, float] | None = None,
    config: PruneConfig | None = None,
    spec: PruningSpec | None = None,
    pruner_class: type = tp.pruner.MetaPruner,
    **options: Any,
) -> PruneReport:
    """Prune ``model`` in place (or dry-run it), verify it, and roll it back on any failure.

    The project's one pruning path: prepare (once) + rank + prune + finalize + verify. By default channels of
    all layers are ranked together (``global_ranking=True``), every layer keeps the paper's floor
    ``int(0.05 * width) + 1`` and equal scores are tie-broken, so a ratio removes that many channels.
    Verification runs ``example_inputs`` through the pruned model: every output keeps its shape (except where
    the adapter says otherwise) and stays finite. A failed attempt is rolled back, the failing block frozen
    (with a warning) and the attempt repeated, at most ``max_repairs`` times. A call that cannot do what was
    asked restores the model in place (same module and parameter objects, same values) and raises.

    Args:
        model: The model, pruned in place. Its train/eval modes and ``requires_grad`` flags are preserved.
        example_inputs: Inputs for tracing and verification (tensor, tuple/list of positional inputs, dict).
        importance: A torch-pruning importance (e.g. ``orthoreg_tp.OrthoRegImportance`` after accumulation).
        ratio: Fraction of the prunable channels to remove, in ``[0, 1)``.
        target: ``(kind, fraction)``: keep at most ``fraction`` of the ``"macs"``, ``"params"`` or ``"latency"``
            (the ratio is searched; each trial starts from the restored original; latency is timed on the
            inputs' device and batch against a copy of the unpruned model, see :class:`PruneConfig`).
        config: All options at once (instead of ``ratio=``/``target=`` and the option keywords).
        spec: A spec from :func:`prepare`; built here when omitted.
        pruner_class: The torch-pruning pruner class.
        **options: :class:`PruneConfig` fields (``global_ranking``, ``min_keep_ratio``, ``round_to`` (or
            ``"auto"``: the fastest of 1, 8, 16, 32),
            ``tolerance``, ``max_ratio``, ``max_repairs``, ``dry_run``, ``seed``; torch-pruning's
            ``global_pruning`` is read as ``global_ranking``); everything else goes to the pruner
            (``ignored_layers``, ``num_heads``...; lists and dicts are merged with the spec's).

    Returns:
        A :class:`PruneReport` (with the replayable ``history``).

    Raises:
        ValueError: Bad arguments (see :class:`PruneConfig`), or ``example_inputs`` that do not run through
            the model.
        PruningError: Pruning failed, a budget was out of reach, or a positive ratio removed nothing (the
            reason says why: floor reached, nothing prunable, ratio too small); the model was restored.
        Exception: Whatever the importance raised (e.g. ``RuntimeError`` for an importance that was never
            accumulated), unchanged; the model was restored.

    Example:
        >>> import timm, torch, torch_pruning as tp
        >>> from orthoreg_tp.adapters import prune
        >>> model, x = timm.create_model("test_resnet", pretrained=False), torch.randn(1, 3, 64, 64)
        >>> report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
        >>> report.params_after < report.params_before
        True
    """
    start = time.perf_counter()
    check_importance(importance)
    options.update(ratio=ratio, target=target)
    cfg, pruner_kwargs = _split_options(config, options)
    grad_flags = saved_grad_flags(model)
    widths_before = layer_widths(model)
    try:
        with eval_mode(model):
            adapter = pick_adapter(model) if spec is None else None
            select = spec.select_outputs if spec is not None else adapter.outputs if adapter is not None else None
            unpack, ref = reference_forward(model, example_inputs, select)
            if spec is None:
                spec = build_spec(model, example_inputs, unpack, ref, freeze_unhandled=True, adapter=adapter)
            outcome = execute(model, example_inputs, importance, cfg, spec, ref, unpack, pruner_class,
                              pruner_kwargs)
    finally:
        restore_grad_flags(model, grad_flags)
    _warn_frozen(model, outcome)
    return _report(model, cfg, spec, outcome, widths_before, time.perf_counter() - start)


def _warn_frozen(model: nn.Module, outcome: Outcome) -> None:
    frozen = outcome.session.frozen
    if frozen:
        warnings.warn(f"pruning {type(model).__name__}: kept {len(frozen)} block(s) unpruned after failed attempts: "
                      + "; ".join(f"{k or '<model>'} ({v[:160]})" for k, v in frozen.items()), stacklevel=3)


def _report(model: nn.Module, cfg: PruneConfig, spec: PruningSpec, outcome: Outcome,
            widths_before: dict[str, int], seconds: float) -> PruneReport:
    session, trial = outcome.session, outcome.trial
    ranking = session.ranking()
    return PruneReport(
        model_class=type(model).__name__,
        source=spec.source,
        params_before=session.params_before,
        params_after=trial.params,
        macs_before=session.reference.macs,
        macs_after=trial.macs,
        widths={k: (v, outcome.widths_after.get(k, v)) for k, v in widths_before.items()},
        seconds=seconds,
        ratio=outcome.ratio,
        target=cfg.target,
        trials=tuple(outcome.trials),
        frozen=tuple(f"{k or '<model>'}: {v}" for k, v in session.frozen.items()),
        spec=spec.summary(),
        history=trial.history,
        channels_before=ranking.prunable,
        channels_after=trial.channels_after,
        prunable_layers=dict(ranking.layers),
        requested_ratio=cfg.ratio,
        dry_run=cfg.dry_run,
        config=cfg.to_dict(),
        latency=outcome.latency,
        unused=spec.unused,
    )


def replay(model: nn.Module, example_inputs: Any, history: Sequence[Sequence[Any]], *,
           spec: PruningSpec | None = None) -> nn.Module:
    """Re-apply a pruning ``history`` (``PruneReport.history``, concatenated over calls) to ``model`` in place.

    Rebuilds the pruned structure on a freshly built unpruned model (then load the pruned state dict).

    Args:
        model: The model the history was recorded on, unpruned (or pruned by the history's first entries).
        example_inputs: Inputs for tracing.
        history: ``[layer name, is_out_channel, indices]`` entries.
        spec: A spec from :func:`prepare`; built here when omitted.

    Returns:
        ``model``.

    Example:
        >>> import torch, torch_pruning as tp
        >>> from torch import nn
        >>> make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(1, 3, 8, 8)
        >>> report = prune(make(), x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
        >>> replay(make(), x, report.history)[0].out_channels
        4
    """
    if not history:
        return model
    if spec is None:
        spec = prepare(model, example_inputs)
    unpack = call_style(model, example_inputs)
    flags = saved_grad_flags(model)
    try:
        with eval_mode(model), requires_grad_all(model):
            kwargs = merge_pruner_kwargs(model, spec.pruner_kwargs(), {"pruning_ratio": 0.0})
            kwargs["forward_fn"] = lambda m, x: run_model(m, x, unpack=unpack)
            pruner = make_pruner(tp.pruner.MetaPruner, model, example_inputs, tp.importance.RandomImportance(),
                                 kwargs)
            pruner.DG.load_pruning_history([list(e) for e in history])
            spec.finalize(model, pruner)
    finally:
        restore_grad_flags(model, flags)
    return model


def check_importance(importance: Any) -> None:
    """Raise a ``TypeError`` naming the problem unless ``importance`` is a torch-pruning importance (a callable).

    Example:
        >>> check_importance("magnitude")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: importance must be a torch-pruning importance object (...), got str: 'magnitude'
    """
    if not callable(importance):
        raise TypeError(
            "importance must be a torch-pruning importance object (e.g. tp.importance.GroupMagnitudeImportance() "
            f"or orthoreg_tp.OrthoRegImportance()), got {type(importance).__name__}: {importance!r}"
        )


def build_pruner(
    model: nn.Module,
    example_inputs: Any,
    *,
    importance: Callable[[Any], torch.Tensor | None],
    pruner_class: type = tp.pruner.MetaPruner,
    spec: Any = None,
    **torch_pruning_kwargs: Any,
) -> Any:
    """A torch-pruning pruner for ``model`` that works around the host's graph bugs and applies the fix-ups.

    The pruner is an instance of a subclass of ``pruner_class`` (see :func:`adapted_pruner_class`); drive it as
    usual: ``pruner.step()``, or ``for group in pruner.step(interactive=True): group.prune()``. After each step
    the model is consistent and runnable: the adapters' fix-ups (``spec.finalize``) have run. No torch-pruning
    function or class is modified.

    Args:
        model: The model to prune (in place).
        example_inputs: Inputs for tracing (tensor, tuple/list of positional inputs, or dict).
        importance: A torch-pruning importance (e.g. ``orthoreg_tp.OrthoRegImportance`` after accumulation).
        pruner_class: ``tp.pruner.MetaPruner`` or any other ``tp.pruner.BasePruner`` subclass.
        spec: A :class:`~orthoreg_tp.adapters.PruningSpec` from :func:`~orthoreg_tp.adapters.prepare`; made here
            when omitted.
        **torch_pruning_kwargs: Passed to the pruner (``pruning_ratio``, ``global_pruning``, ``iterative_steps``,
            ``ignored_layers``...); lists and dicts are merged with the spec's.

    Returns:
        The pruner.

    Raises:
        TypeError: ``pruner_class`` is not a ``tp.pruner.BasePruner`` subclass, or ``importance`` is not callable.
        ValueError: ``example_inputs`` do not run through the model (from ``prepare``), or ``model`` or
            ``example_inputs`` is passed as a keyword too.

    Example:
        >>> import torch, torchvision, torch_pruning as tp
        >>> from orthoreg_tp.adapters import build_pruner
        >>> model, x = torchvision.models.shufflenet_v2_x0_5(weights=None), torch.randn(1, 3, 64, 64)
        >>> pruner = build_pruner(model, x, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5)
        >>> pruner.step()
        >>> model(x).shape
        torch.Size([1, 1000])
    """
    for key in ("model", "example_inputs", "importance"):
        if key in torch_pruning_kwargs:
            raise ValueError(f"{key!r} is build_pruner's own argument; do not pass it as a pruner keyword")
    check_importance(importance)
    adapted_pruner_class(pruner_class)  # a TypeError before any work when it is not a torch-pruning pruner
    if spec is None:
        spec = prepare(model, example_inputs)
    kwargs = merge_pruner_kwargs(model, spec.pruner_kwargs(), torch_pruning_kwargs)
    return make_pruner(pruner_class, model, example_inputs, importance, kwargs, finalizer=spec.finalize)
