"""The two entry points: :func:`prepare` (describe a model) and :func:`prune` (prune it, transactionally)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .generic import (
    LAYER_TYPES,
    Trace,
    describe_modules,
    input_producers,
    looks_like_attention,
    run_model,
    trace_outputs,
)
from .graph import GroupExplosion
from .opaque import describe_opaque_parameters, describe_tied_parameters
from .pruner import adapted_pruner_class
from .registry import AdapterContext, ModelAdapter, model_adapters
from .report import PruneReport, PruningError
from .spec import FixupError, PruningSpec, SpecPart, merge_parts
from .transaction import restore, snapshot
from .verify import (
    ForwardResult,
    VerificationError,
    checked_forward,
    compare_outputs,
    count_params,
    first_non_finite_layer,
    layer_widths,
)

__all__ = ["prepare", "prune"]

TARGET_KINDS = ("macs", "params")
_MAX_TRIALS = 12


class _StepError(RuntimeError):
    def __init__(self, reason: str, layer: str | None) -> None:
        super().__init__(reason)
        self.layer = layer


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


def _reference_forward(model: nn.Module, example_inputs: Any) -> tuple[bool | None, Trace]:
    """Trace the unpruned model once; pick the calling convention; raise ValueError when inputs do not fit."""
    styles: tuple[bool | None, ...] = (True, False) if isinstance(example_inputs, (tuple, list)) else (None,)
    error: Exception | None = None
    for unpack in styles:
        try:
            return unpack, trace_outputs(model, example_inputs, unpack=unpack)
        except Exception as err:
            if _out_of_memory(err):
                raise  # not a problem with the inputs
            error = error or err
    raise ValueError(
        f"example_inputs {_describe_inputs(example_inputs)} do not run through {type(model).__name__}: "
        f"{type(error).__name__}: {error}"
    )


def _build_spec(
    model: nn.Module, example_inputs: Any, unpack: bool | None, trace: Trace, freeze_unhandled: bool
) -> PruningSpec:
    adapter = _pick_adapter(model)
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
    return merge_parts(parts, model_class=type(model).__name__, source=source, check_output_shape=check_shape)


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
        >>> pruner = build_pruner(model, x, importance=tp.importance.GroupMagnitudeImportance(), spec=spec,
        ...                       pruning_ratio=0.5)
        >>> pruner.step()  # prunes, then applies the spec's fix-ups
    """
    with _ModeGuard(model):
        unpack, trace = _reference_forward(model, example_inputs)
        return _build_spec(model, example_inputs, unpack, trace, freeze_unhandled)


def _validate(
    ratio: float | None, target: Any, tolerance: float, max_ratio: float, pruner_kwargs: dict
) -> tuple[str, float] | None:
    for key in ("pruning_ratio", "ch_sparsity", "importance", "model", "example_inputs"):
        if key in pruner_kwargs:
            raise ValueError(f"pass {key!r} through prune()'s own arguments (ratio=/target=), not as a pruner kwarg")
    if (ratio is None) == (target is None):
        raise ValueError(f"give exactly one of ratio= or target=, got ratio={ratio!r}, target={target!r}")
    if not 0.0 < max_ratio < 1.0:
        raise ValueError(f"max_ratio must be in (0, 1), got {max_ratio!r}")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
        return None
    if not isinstance(target, (tuple, list)) or len(target) != 2:
        raise ValueError(f"target must be a (kind, fraction) pair such as ('macs', 0.5), got {target!r}")
    kind, fraction = target
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"target fraction must be in (0, 1] (the share of {kind} to keep), got {fraction!r}")
    return str(kind), float(fraction)


def _run_pruner(
    pruner_class: type,
    model: nn.Module,
    example_inputs: Any,
    importance: Any,
    ratio: float,
    kwargs: dict[str, Any],
    names: dict[nn.Module, str],
) -> Any:
    """Build the pruner and prune; any exception becomes a ``_StepError`` naming the group being handled."""
    current: list[Any] = [None]
    try:
        robust_class = adapted_pruner_class(pruner_class)  # the graph works around torch-pruning's bugs
        pruner = robust_class(model, example_inputs, importance=importance, pruning_ratio=ratio, **kwargs)
        estimate = pruner.estimate_importance

        def tracked(group: Any) -> Any:
            current[0] = group[0].dep.target.module
            return estimate(group)

        pruner.estimate_importance = tracked
        for group in pruner.step(interactive=True):
            current[0] = group[0].dep.target.module
            group.prune()
    except Exception as exc:
        if isinstance(exc, GroupExplosion):
            current[0] = exc.module
        layer = names.get(current[0]) if current[0] is not None else None
        stage = "graph build" if current[0] is None else "pruning step"
        raise _StepError(f"torch-pruning {stage} failed: {type(exc).__name__}: {exc}", layer) from exc
    return pruner


def _freeze_candidate(model: nn.Module, layer: str | None, frozen: dict[str, str], *, layer_first: bool) -> str | None:
    """Qualified name of the module to freeze after a failure located at ``layer`` (``None``: give up)."""
    if not layer:
        return None
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return None
    name = layer
    if not layer_first and not any(isinstance(m, LAYER_TYPES) for m in module.modules() if m is not module):
        name = layer.rpartition(".")[0]  # a leaf: freeze the block around it
    while name in frozen:
        if not name:
            return None
        name = name.rpartition(".")[0]
    return name or None


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    importance: Callable[[Any], torch.Tensor | None],
    ratio: float | None = None,
    target: tuple[str, float] | None = None,
    spec: PruningSpec | None = None,
    tolerance: float = 0.05,
    max_ratio: float = 0.95,
    max_repairs: int = 6,
    pruner_class: type = tp.pruner.MetaPruner,
    **pruner_kwargs: Any,
) -> PruneReport:
    """Prune ``model`` in place, verify it, and roll it back on any failure.

    One call does prepare + prune + finalize + verify. Verification runs ``example_inputs`` through the
    pruned model: every output must keep its shape (except where the adapter says otherwise, e.g. detection
    boxes) and stay finite. When an attempt fails the model is restored, the failing block is frozen and the
    attempt repeated (at most ``max_repairs`` times, each freeze listed in ``report.frozen``). When it cannot
    succeed, the model is restored in place (same module and parameter objects, same values) and a
    :class:`PruningError` names the model class, the layer and the reason.

    With ``target=("macs", f)`` or ``("params", f)`` the global ``pruning_ratio`` is searched (secant steps
    inside a bracket, each trial pruned from the restored original so importance statistics keyed by the
    original parameters stay valid) until the kept fraction is within ``tolerance`` (relative) of ``f``.

    Args:
        model: The model, pruned in place. Its train/eval modes and ``requires_grad`` flags are preserved.
        example_inputs: Inputs for tracing and verification (tensor, tuple/list of positional inputs, dict).
        importance: A torch-pruning importance (e.g. ``orthoreg_tp.OrthoRegImportance`` after accumulation).
        ratio: torch-pruning ``pruning_ratio`` in ``[0, 1)``.
        target: ``(kind, fraction)`` with kind ``"macs"`` or ``"params"`` and the fraction to keep in ``(0, 1]``.
        spec: A spec from :func:`prepare`; built here when omitted.
        tolerance: Relative tolerance on a target budget (0.05: within 5%).
        max_ratio: Largest ``pruning_ratio`` tried when searching a budget.
        max_repairs: Failed attempts to repair by freezing the failing block before giving up.
        pruner_class: The torch-pruning pruner class.
        **pruner_kwargs: Passed to the pruner (``global_pruning``, ``iterative_steps``, ``ignored_layers``...);
            lists and dicts are merged with the spec's.

    Returns:
        A :class:`PruneReport`.

    Raises:
        ValueError: Bad arguments: both or neither of ratio/target, a ratio outside ``[0, 1)``, an unknown
            target kind, or ``example_inputs`` that do not run through the model.
        PruningError: Pruning failed; the model was restored.

    Example:
        >>> import timm, torch, torch_pruning as tp
        >>> from orthoreg_tp.adapters import prune
        >>> model, x = timm.create_model("test_resnet", pretrained=False), torch.randn(1, 3, 64, 64)
        >>> report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
        >>> report.params_after < report.params_before
        True
    """
    start = time.perf_counter()
    budget = _validate(ratio, target, tolerance, max_ratio, pruner_kwargs)
    if not isinstance(max_repairs, int) or max_repairs < 0:
        raise ValueError(f"max_repairs must be a non-negative int, got {max_repairs!r}")
    model_class = type(model).__name__
    names = {m: n for n, m in model.named_modules()}
    grad_flags = {
        (names[m], k): p.requires_grad for m in model.modules() for k, p in m._parameters.items() if p is not None
    }
    widths_before = layer_widths(model)
    params_before = count_params(model)

    with _ModeGuard(model):
        unpack, ref = _reference_forward(model, example_inputs)
        if spec is None:
            spec = _build_spec(model, example_inputs, unpack, ref, freeze_unhandled=True)
        snap = snapshot(model)
        frozen: dict[str, str] = {}
        extra_ignored: list[nn.Module] = []
        user_ignored = list(pruner_kwargs.pop("ignored_layers", None) or [])

        def attempt(r: float) -> ForwardResult:
            restore(snap)  # every attempt starts from the original model
            kwargs = spec.pruner_kwargs()
            kwargs["ignored_layers"] += user_ignored + extra_ignored
            for key, value in pruner_kwargs.items():
                if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
                    kwargs[key] = {**kwargs[key], **value}
                elif isinstance(value, (list, tuple)) and isinstance(kwargs.get(key), list):
                    kwargs[key] = kwargs[key] + list(value)
                else:
                    kwargs[key] = value
            kwargs.setdefault("forward_fn", lambda m, x: run_model(m, x, unpack=unpack))
            for p in model.parameters():
                p.requires_grad_(True)
            pruner = _run_pruner(pruner_class, model, example_inputs, importance, r, kwargs, names)
            spec.finalize(model, pruner)
            result = checked_forward(model, example_inputs, names=names, unpack=unpack)
            problem = compare_outputs(ref.outputs, result.tensors, check_shape=spec.check_output_shape)
            if problem is not None:
                layer = None
                if "non-finite" in problem:
                    layer = first_non_finite_layer(model, example_inputs, names, unpack=unpack)
                raise VerificationError(problem, layer)
            return result

        frozen_classes: dict[type, int] = {}

        def freeze(name: str, reason: str) -> None:
            module = model.get_submodule(name)
            cls = type(module)
            seen = frozen_classes.get(cls, 0)
            frozen_classes[cls] = seen + 1
            targets = [(name, module)]
            if seen and looks_like_attention(module):
                # a second attention block of the same class failed: freeze the whole class at once
                targets = [(n, m) for n, m in model.named_modules() if type(m) is cls and n not in frozen]
                reason = f"every {cls.__name__} ({len(targets)} more): {reason}"
            for n, m in targets:
                frozen[n] = reason
                extra_ignored.extend(x for x in m.modules() if isinstance(x, LAYER_TYPES))
            # pin what the blocks read too: a failing block usually misreads its input width
            extra_ignored.extend(input_producers(model, [m for _, m in targets], example_inputs, unpack=unpack))

        def attempt_repaired(r: float) -> ForwardResult:
            while True:
                try:
                    return attempt(r)
                except (_StepError, VerificationError) as err:
                    restore(snap)
                    candidate = _freeze_candidate(model, err.layer, frozen, layer_first=isinstance(err, _StepError))
                    if candidate is None or sum(frozen_classes.values()) >= max_repairs:
                        after = f" (after freezing {', '.join(frozen) or 'nothing'})" if frozen else ""
                        raise PruningError(model_class, err.layer, f"{err}{after}") from err
                    freeze(candidate, f"{type(err).__name__.lstrip('_')}: {err}"[:300])
                except FixupError as err:
                    restore(snap)
                    raise PruningError(model_class, err.layer, str(err)) from err

        try:
            if budget is None:
                final_ratio, result, trials = float(ratio), attempt_repaired(float(ratio)), ()
            else:
                final_ratio, result, trials = _search_budget(
                    attempt_repaired, budget, ref.macs, params_before, model, tolerance, max_ratio
                )
        except PruningError:
            restore(snap)
            raise
        except Exception as exc:
            restore(snap)
            raise PruningError(model_class, None, f"{type(exc).__name__}: {exc}") from exc

    new_names = {m: n for n, m in model.named_modules()}
    for m, n in new_names.items():
        for k, p in m._parameters.items():
            if p is not None and (n, k) in grad_flags:
                p.requires_grad_(grad_flags[(n, k)])
    widths_after = layer_widths(model)
    return PruneReport(
        model_class=model_class,
        source=spec.source,
        params_before=params_before,
        params_after=count_params(model),
        macs_before=ref.macs,
        macs_after=result.macs,
        widths={k: (v, widths_after.get(k, v)) for k, v in widths_before.items()},
        seconds=time.perf_counter() - start,
        ratio=final_ratio,
        target=budget,
        trials=tuple(trials),
        frozen=tuple(f"{k or '<model>'}: {v}" for k, v in frozen.items()),
        spec=spec.summary(),
    )


def _search_budget(
    attempt: Callable[[float], ForwardResult],
    budget: tuple[str, float],
    macs_before: int,
    params_before: int,
    model: nn.Module,
    tolerance: float,
    max_ratio: float,
) -> tuple[float, ForwardResult, list[tuple[float, float]]]:
    """Find a pruning ratio whose kept fraction of MACs/params is within ``tolerance`` of the budget."""
    kind, goal = budget
    base = macs_before if kind == "macs" else params_before

    def kept(result: ForwardResult) -> float:
        return (result.macs if kind == "macs" else count_params(model)) / max(base, 1)

    trials: list[tuple[float, float]] = []
    lo, f_lo = 0.0, 1.0  # ratio with kept fraction above the goal
    hi, f_hi = None, None  # ratio with kept fraction below the goal
    r = min(max(1.0 - math.sqrt(goal), 0.0), max_ratio)
    for _ in range(_MAX_TRIALS):
        result = attempt(r)
        f = kept(result)
        trials.append((r, f))
        if abs(f - goal) <= tolerance * goal:
            return r, result, trials
        if f > goal:
            lo, f_lo = r, f
        else:
            hi, f_hi = r, f
        if hi is None:
            if lo >= max_ratio:
                break
            # extrapolate the line through (0, 1) and (lo, f_lo); never stall below max_ratio
            slope = (1.0 - f_lo) / lo if lo > 0 else 0.0
            guess = (1.0 - goal) / slope if slope > 0 else max_ratio
            r = min(max(guess, lo + 0.05), max_ratio)
        else:
            width = hi - lo
            if width < 1e-4:
                break
            guess = lo + width * (f_lo - goal) / max(f_lo - f_hi, 1e-12)
            r = min(max(guess, lo + 0.1 * width), hi - 0.1 * width)
    closest = min(trials, key=lambda t: abs(t[1] - goal))
    raise PruningError(
        type(model).__name__,
        None,
        f"could not reach the {kind} budget {goal:.3f} within {tolerance:.0%}: closest was {closest[1]:.3f} at "
        f"ratio {closest[0]:.3f} after {len(trials)} trials",
    )
