"""Entry points: :func:`prepare` (describe a model), :func:`prune` (prune it, transactionally), :func:`replay`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .budget import BudgetUnreachable, search_ratio
from .config import AUTO_ROUND_TO, TARGET_KINDS, PruneConfig
from .generic import Trace, call_style, describe_modules, input_producers, run_model, trace_outputs
from .latency import LatencyProbe
from .opaque import describe_opaque_parameters, describe_tied_parameters
from .pruner import check_importance
from .registry import AdapterContext, ModelAdapter, model_adapters
from .report import PruneReport, PruningError
from .session import ImportanceFailure, PruneSession, StepError, Trial, make_pruner
from .spec import PruningSpec, SpecPart, merge_parts
from .transaction import restore
from .verify import count_params, layer_widths

__all__ = ["TARGET_KINDS", "PruneConfig", "prepare", "prune", "replay"]

_CONFIG_KEYS = frozenset(f.name for f in fields(PruneConfig))
_RESERVED = ("pruning_ratio", "ch_sparsity", "importance", "model", "example_inputs")


def _pick_adapter(model: nn.Module) -> ModelAdapter | None:
    for adapter in model_adapters():
        if adapter.detect(model):
            return adapter
    return None


def _describe_inputs(example_inputs: Any) -> str:
    if isinstance(example_inputs, torch.Tensor):
        return f"of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, dict):
        return "with keys " + ", ".join(map(str, example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return f"({type(example_inputs).__name__} of {len(example_inputs)})"
    return f"of type {type(example_inputs).__name__}"


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (Python, CUDA, or the CPU allocator's ``RuntimeError``)."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def _reference_forward(
    model: nn.Module, example_inputs: Any, select: Callable[[Any], Any] | None
) -> tuple[bool | None, Trace]:
    """Trace the unpruned model once; pick the calling convention; raise ValueError when inputs do not fit.

    ``select`` picks the predictions out of the output (``ModelAdapter.outputs``; ``None``: all of it).
    """
    styles: tuple[bool | None, ...] = (True, False) if isinstance(example_inputs, (tuple, list)) else (None,)
    error: Exception | None = None
    for unpack in styles:
        try:
            return unpack, trace_outputs(model, example_inputs, unpack=unpack, select=select)
        except Exception as err:
            if _out_of_memory(err):
                raise  # not a problem with the inputs
            error = error or err
    raise ValueError(
        f"example_inputs {_describe_inputs(example_inputs)} do not run through {type(model).__name__}: "
        f"{type(error).__name__}: {error}"
    )


def _build_spec(
    model: nn.Module,
    example_inputs: Any,
    unpack: bool | None,
    trace: Trace,
    freeze_unhandled: bool,
    adapter: ModelAdapter | None,
) -> PruningSpec:
    source = adapter.source if adapter is not None else "generic"
    names = {m: n for n, m in model.named_modules()}
    ctx = AdapterContext(model=model, names=names, source=source)
    out_layers, functional = trace.output_layers, trace.functional
    parts = [
        SpecPart(
            ignored_layers=list(out_layers),
            notes=[f"output layers kept: {', '.join(names.get(m, '?') for m in out_layers)}"] if out_layers else [],
        )
    ]
    if adapter is not None:
        parts.append(adapter.describe(model, ctx))
    parts.extend(describe_modules(model, ctx, freeze_unhandled=freeze_unhandled))
    parts.extend(describe_tied_parameters(model))
    parts.extend(describe_opaque_parameters(model, trace.opaque))
    pinned = [m for part in parts for m in part.pinned_inputs]
    if pinned:
        producers = input_producers(model, pinned, example_inputs, unpack=unpack)
        parts.append(SpecPart(ignored_layers=producers, notes=[f"inputs pinned for {len(pinned)} modules"]))
    handled = {i for part in parts for i in part.handled}
    parts[0].unhandled.extend(
        f"{names.get(m, '?')} ({type(m).__name__}): weight used functionally, invisible to torch-pruning"
        for m in functional
        if id(m) not in handled
    )
    check_shape = adapter.check_output_shape(model) if adapter is not None else True
    select = adapter.outputs if adapter is not None else None
    return merge_parts(parts, model_class=type(model).__name__, source=source, check_output_shape=check_shape,
                       select_outputs=select)


class _ModeGuard:
    """Put a model in eval mode (as torch-pruning's tracing does) and restore per-module modes afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = {m: m.training for m in model.modules()}

    def __enter__(self) -> _ModeGuard:
        self.model.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.model.modules():
            if m in self.modes:
                m.training = self.modes[m]


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
    with _ModeGuard(model):
        adapter = _pick_adapter(model)
        unpack, trace = _reference_forward(model, example_inputs, adapter.outputs if adapter is not None else None)
        return _build_spec(model, example_inputs, unpack, trace, freeze_unhandled, adapter)


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
    names = {m: n for n, m in model.named_modules()}
    grad_flags = {(names[m], k): p.requires_grad for m in model.modules() for k, p in m._parameters.items()
                  if p is not None}
    widths_before, params_before = layer_widths(model), count_params(model)
    with _ModeGuard(model):
        adapter = _pick_adapter(model) if spec is None else None
        select = spec.select_outputs if spec is not None else adapter.outputs if adapter is not None else None
        unpack, ref = _reference_forward(model, example_inputs, select)
        if spec is None:
            spec = _build_spec(model, example_inputs, unpack, ref, freeze_unhandled=True, adapter=adapter)
        probe = LatencyProbe(model, example_inputs, cfg) if _measures_latency(cfg) else None

        def session_for(round_to: int | None) -> PruneSession:
            return PruneSession(model, example_inputs, importance, replace(cfg, round_to=round_to), spec, ref, unpack,
                                pruner_class, dict(pruner_kwargs))

        session = None
        try:
            candidates: dict[int, float] = {}
            round_to = cfg.round_to
            if round_to == "auto":
                round_to, candidates = _fastest_round_to(session_for, probe, ref.macs, params_before)
            session = session_for(round_to)
            applied, trial, trials = _run(session, ref.macs, params_before, probe)
            by_latency = cfg.target is not None and cfg.target[0] == "latency"
            latency = probe.report(model, candidates, reuse_last=by_latency) if probe is not None else None
            widths_after = layer_widths(model)
            if cfg.dry_run:
                restore(session.snap)
        except BaseException:
            if session is not None:
                restore(session.snap)
            _restore_grad_flags(model, grad_flags)
            raise
    _restore_grad_flags(model, grad_flags)
    if session.frozen:
        warnings.warn(f"pruning {type(model).__name__}: kept {len(session.frozen)} block(s) unpruned after failed "
                      "attempts: " + "; ".join(f"{k or '<model>'} ({v[:160]})" for k, v in session.frozen.items()),
                      stacklevel=2)
    ranking = session.ranking()
    return PruneReport(
        model_class=type(model).__name__,
        source=spec.source,
        params_before=params_before,
        params_after=trial.params,
        macs_before=ref.macs,
        macs_after=trial.macs,
        widths={k: (v, widths_after.get(k, v)) for k, v in widths_before.items()},
        seconds=time.perf_counter() - start,
        ratio=applied,
        target=cfg.target,
        trials=tuple(trials),
        frozen=tuple(f"{k or '<model>'}: {v}" for k, v in session.frozen.items()),
        spec=spec.summary(),
        history=trial.history,
        channels_before=ranking.prunable,
        channels_after=trial.channels_after,
        prunable_layers=dict(ranking.layers),
        requested_ratio=cfg.ratio,
        dry_run=cfg.dry_run,
        config=cfg.to_dict(),
        latency=latency,
    )


def _measures_latency(cfg: PruneConfig) -> bool:
    return cfg.round_to == "auto" or (cfg.target is not None and cfg.target[0] == "latency")


def _fastest_round_to(session_for: Callable[[int], PruneSession], probe: LatencyProbe, macs_before: int,
                      params_before: int) -> tuple[int, dict[int, float]]:
    """Prune with each of :data:`AUTO_ROUND_TO` (restoring after each): the fastest multiple and every ratio."""
    candidates: dict[int, float] = {}
    error: PruningError | None = None
    for multiple in AUTO_ROUND_TO:
        session = session_for(multiple)
        try:
            _run(session, macs_before, params_before, probe)
            candidates[multiple] = probe.measure(session.model)[0]
        except PruningError as err:  # e.g. a budget no multiple-of-32 width can reach
            error = err
        finally:
            restore(session.snap)
    if not candidates:
        raise error if error is not None else PruningError(probe.model_class, None, "no round_to candidate")
    return min(candidates, key=lambda m: (candidates[m], m)), candidates


def _run(session: PruneSession, macs_before: int, params_before: int,
         probe: LatencyProbe | None) -> tuple[float, Trial, list[tuple[float, float]]]:
    """Prune by ratio or budget: ``(ratio used, the kept trial, (ratio, kept fraction) of every trial)``."""
    cfg, model_class = session.cfg, session.model_class
    try:
        ranking = session.ranking()
    except ImportanceFailure as err:
        raise err.original from None
    except StepError as err:
        raise PruningError(model_class, err.layer, str(err)) from err
    limit = ranking.largest_ratio() if cfg.global_ranking else 1.0
    if cfg.target is None:
        applied = float(cfg.ratio)
        if cfg.global_ranking and ranking.removable(applied) > ranking.scored - ranking.protected:
            applied = limit
            if limit > 0:  # else nothing can go: the error below says why
                warnings.warn(f"pruning {model_class}: ratio {cfg.ratio:.4g} would cut into the per-layer floor "
                              f"(min_keep_ratio={cfg.min_keep_ratio!r}); pruning {applied:.4g} instead",
                              stacklevel=3)
        trial = session.attempt_repaired(applied)
        if cfg.ratio > 0 and not trial.history:
            raise PruningError(model_class, None, session.why_nothing(cfg.ratio))
        return applied, trial, []
    kind, goal = cfg.target
    base = macs_before if kind == "macs" else params_before
    kept: dict[float, Trial] = {}

    def measure(r: float) -> float:
        kept[r] = session.attempt_repaired(r)
        if kind == "latency":
            return probe.measure(session.model)[0]
        return (kept[r].macs if kind == "macs" else kept[r].params) / max(base, 1)

    try:
        applied, trials = search_ratio(measure, goal, cfg.tolerance, min(cfg.max_ratio, limit),
                                       what=f"{kind} budget")
    except BudgetUnreachable as err:
        under = [r for r, f in err.trials if f <= goal]
        if kind != "latency" or not under:
            raise PruningError(model_class, None, str(err)) from err
        applied, trials = min(under), err.trials  # noisy timings: the least-pruned trial within the budget
        trial = session.attempt_repaired(applied)
        probe.measure(session.model)  # the report's figure is of the model kept
        return applied, trial, trials
    return applied, kept[applied], trials


def _restore_grad_flags(model: nn.Module, flags: dict[tuple[str, str], bool]) -> None:
    for n, m in model.named_modules():
        for k, p in m._parameters.items():
            if p is not None and (n, k) in flags:
                p.requires_grad_(flags[(n, k)])


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
    names = {m: n for n, m in model.named_modules()}
    flags = {(names[m], k): p.requires_grad for m in model.modules() for k, p in m._parameters.items()
             if p is not None}
    with _ModeGuard(model):
        try:
            for p in model.parameters():
                p.requires_grad_(True)
            kwargs = spec.pruner_kwargs()
            kwargs["forward_fn"] = lambda m, x: run_model(m, x, unpack=unpack)
            pruner = make_pruner(tp.pruner.MetaPruner, model, example_inputs, tp.importance.RandomImportance(),
                                 0.0, kwargs)
            pruner.DG.load_pruning_history([list(e) for e in history])
            spec.finalize(model, pruner)
        finally:
            _restore_grad_flags(model, flags)
    return model
