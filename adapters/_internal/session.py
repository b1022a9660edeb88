"""One pruning call: the snapshot, the ranking, the attempts, the repair loop, the budget search, ``round_to``.

Every prune of the project goes through :func:`execute` (via :func:`orthoreg_tp.adapters.prune`): one point
where the pruner is built (:func:`.host.make_pruner`), one rollback (:mod:`.transaction`, zero-copy), one MACs
counter (:func:`.verify.checked_forward`), one budget search (:mod:`.budget`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from orthoreg_tp import _compat
from orthoreg_tp._state import requires_grad_all
from orthoreg_tp.floor import FloorImportance, RoundedFloorImportance, is_protected
from orthoreg_tp.ties import TieBreakImportance

from ..prune_config import AUTO_ROUND_TO, PruneConfig
from ..report import PruningError
from ..spec import FixupError, PruningSpec
from .budget import BudgetUnreachable, search_ratio
from .generic import looks_like_attention
from .host import make_pruner, merge_pruner_kwargs
from .hostgraph import GroupExplosion
from .latency_probe import LatencyProbe
from .layers import LAYER_TYPES
from .tracing import Trace, input_producers, run_model
from .transaction import restore, snapshot
from .verify import (
    VerificationError,
    checked_forward,
    compare_outputs,
    count_params,
    first_non_finite_layer,
    layer_widths,
)

__all__ = ["Outcome", "PruneSession", "Trial", "execute"]


class ImportanceFailure(Exception):
    """The importance raised; ``original`` is its exception, re-raised to the caller once the model is restored."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class StepError(RuntimeError):
    """torch-pruning failed while building its graph or pruning; ``layer`` names the group being handled."""

    def __init__(self, reason: str, layer: str | None) -> None:
        super().__init__(reason)
        self.layer = layer


class _Guarded:
    """Calls the ranking importance, remembering the group's root and marking the importance's own errors.

    Scores are kept per group object until :meth:`forget`: the ranking and the first attempt share one graph
    (whose groups are walked once), so the attempt's step reuses the ranking's scores.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.current: Any = None
        self.scores: dict[int, tuple[Any, torch.Tensor | None]] = {}

    def __call__(self, group: Any) -> torch.Tensor | None:
        self.current = group[0].dep.target.module
        known = self.scores.get(id(group))
        if known is not None and known[0] is group:
            return known[1]
        try:
            scores = self.inner(group)
        except Exception as exc:
            raise ImportanceFailure(exc) from exc
        self.scores[id(group)] = (group, scores)
        return scores

    def forget(self) -> None:
        """Drop the kept scores (the groups they belong to are stale)."""
        self.scores.clear()


def ranking_importance(importance: Any, cfg: PruneConfig, round_to: int) -> Any:
    """``importance`` behind the floor (unless it has one), the rounded floor and tie-breaking."""
    imp = importance
    if cfg.min_keep_ratio is not None and getattr(importance, "floor", None) is None:
        imp = FloorImportance(imp, min_keep_ratio=cfg.min_keep_ratio)
    if round_to > 1:
        imp = RoundedFloorImportance(imp, round_to)
    return imp if isinstance(imp, TieBreakImportance) else TieBreakImportance(imp)


@dataclass
class Ranking:
    """What the ranking sees before pruning: channels, those the floor protects, the groups' roots."""

    scored: int = 0  # channels torch-pruning ranks (channel groups counted once)
    protected: int = 0  # of those, the ones the floor protects
    prunable: int = 0  # _compat.prunable_channel_count: the base of the achieved ratio
    layers: dict[str, int] = field(default_factory=dict)
    caps: dict[Any, float] = field(default_factory=dict)  # root module -> largest ratio its floor allows

    def removable(self, ratio: float) -> int:
        """Channels torch-pruning's global ranking selects at ``ratio``."""
        return self.scored - int(self.scored * (1.0 - ratio))

    def largest_ratio(self) -> float:
        """The largest ratio that never selects a protected channel."""
        free = self.scored - self.protected
        return 0.0 if free < 1 else (free - 0.5) / self.scored


@dataclass(frozen=True)
class Trial:
    """One pruning attempt that passed verification."""

    ratio: float
    macs: int
    params: int
    channels_after: int
    history: tuple[list, ...]


class PruneSession:
    """Prunes one model for one call; every attempt starts from the snapshot taken here.

    Args:
        model: The model (pruned in place).
        example_inputs: Inputs for tracing and verification.
        importance: The user's importance (wrapped by :func:`ranking_importance`).
        cfg: The call's options.
        spec: The model's spec (built once per call).
        reference: The unpruned model's trace.
        unpack: The calling convention for tuple inputs.
        pruner_class: torch-pruning pruner class.
        pruner_kwargs: The user's extra pruner arguments (merged with the spec's).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, importance: Any, cfg: PruneConfig,
                 spec: PruningSpec, reference: Trace, unpack: bool | None, pruner_class: type,
                 pruner_kwargs: dict[str, Any]) -> None:
        self.model, self.example_inputs, self.cfg, self.spec = model, example_inputs, cfg, spec
        self.reference, self.unpack, self.pruner_class = reference, unpack, pruner_class
        self.user_ignored = list(pruner_kwargs.pop("ignored_layers", None) or [])
        self.pruner_kwargs = pruner_kwargs
        self.names = {m: n for n, m in model.named_modules()}
        self.model_class = type(model).__name__
        self.round_to = math.lcm(cfg.round_to or 1, spec.round_to or 1)
        self.importance = _Guarded(ranking_importance(importance, cfg, self.round_to))
        self.snap = snapshot(model)
        self.params_before = count_params(model)
        self.frozen: dict[str, str] = {}
        self.extra_ignored: list[nn.Module] = []
        self.frozen_classes: dict[type, int] = {}
        self._ranking: Ranking | None = None
        self._ranked_graph: Any = None  # the ranking's unpruned graph, reused by the next attempt
        self._touched = False  # pruned since the snapshot was last restored
        # the reference pass, from which the first graph is built (unless the user traces with their own forward,
        # or the spec traces with attributes set: fused attention off, a training-only branch on)
        own_forward = "forward_fn" in pruner_kwargs or bool(spec.trace_attrs)
        self._recording = reference.recording if not own_forward else None

    # ------------------------------------------------------------------ building blocks
    def _restore(self) -> None:
        """Restore the snapshot unless the model is untouched since it was taken or last restored."""
        if self._touched:
            restore(self.snap)
            self._touched = False

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[], enabled=self.cfg.seed is not None):
            if self.cfg.seed is not None:
                torch.manual_seed(self.cfg.seed)
            yield

    def _kwargs(self, ratio: float, ranking: Ranking | None) -> dict[str, Any]:
        base = self.spec.pruner_kwargs()
        base["ignored_layers"] += self.user_ignored + self.extra_ignored
        base["round_to"] = self.round_to if self.round_to > 1 else None
        base["global_pruning"] = self.cfg.global_ranking
        base["pruning_ratio"] = ratio
        if ranking is not None and not self.cfg.global_ranking:
            base["pruning_ratio_dict"] = {m: min(ratio, cap) for m, cap in ranking.caps.items()}
        kwargs = merge_pruner_kwargs(self.model, base, self.pruner_kwargs)
        kwargs.setdefault("forward_fn", lambda m, x: run_model(m, x, unpack=self.unpack))
        return kwargs

    def _build(self, ratio: float, ranking: Ranking | None, graph: Any = None) -> Any:
        """A pruner at ``ratio``; on ``graph`` (an unpruned graph of the same arguments) when given, else traced."""
        recording = None
        if graph is None:
            self.importance.forget()  # new graph, new groups
            recording, self._recording = self._recording, None  # valid for the unpruned model only: use it once
        # torch-pruning traces the graph through autograd: every parameter requires grad while it builds, and only
        # then (an importance accumulated with some parameters frozen scores them as frozen)
        tracing = requires_grad_all(self.model) if graph is None else contextlib.nullcontext()
        try:
            with tracing:
                return make_pruner(self.pruner_class, self.model, self.example_inputs, self.importance,
                                   self._kwargs(ratio, ranking), graph=graph, recording=recording)
        except ImportanceFailure:
            raise
        except Exception as exc:
            layer = self.names.get(exc.module) if isinstance(exc, GroupExplosion) else None
            raise StepError(f"torch-pruning graph build failed: {type(exc).__name__}: {exc}", layer) from exc

    def ranking(self) -> Ranking:
        """Score every ranked group once on the unpruned model (cached until a repair freezes a block)."""
        if self._ranking is None:
            self._restore()
            with self._seeded():
                pruner = self._build(0.0, None)
                self._ranking = self._rank(pruner)
                self._ranked_graph = pruner.DG
        return self._ranking

    def _rank(self, pruner: Any) -> Ranking:
        """Count ranked and protected channels as torch-pruning's next step will ."""
        ranking = Ranking(prunable=_compat.prunable_channel_count(pruner))
        for group, ch_groups in _compat.ranked_groups(pruner):
            scores = pruner.estimate_importance(group)
            if scores is None:
                continue
            scores = scores.detach().float().cpu()
            per_channel = scores.view(ch_groups, -1).mean(0) if ch_groups > 1 else scores
            protected = int(is_protected(per_channel).sum())
            root = group[0].dep.target.module
            ranking.scored += per_channel.numel()
            ranking.protected += protected
            ranking.layers[_compat.layer_name(group, root)] = _compat.current_width(group) or 0
            ranking.caps[root] = max(0.0, 1.0 - (protected + 0.5) / max(per_channel.numel(), 1))
        return ranking

    # ------------------------------------------------------------------ attempts
    def attempt(self, ratio: float) -> Trial:
        """Prune the restored model at ``ratio``, finalize and verify it (raises on any failure)."""
        ranking = self.ranking()
        self._restore()  # same module and parameter objects: the ranking's graph stays valid
        graph, self._ranked_graph = self._ranked_graph, None
        with self._seeded():
            pruner = self._build(ratio, ranking, graph=graph if graph is not None and not graph.generation else None)
            try:
                self._step(pruner)
            finally:
                self.importance.forget()
            channels_after = _compat.prunable_channel_count(pruner)
        history = tuple([str(n), bool(o), [int(i) for i in idxs]] for n, o, idxs in pruner.DG.pruning_history())
        self.spec.finalize(self.model, pruner)
        result = checked_forward(self.model, self.example_inputs, names=self.names, unpack=self.unpack,
                                 select=self.spec.select_outputs)
        problem = compare_outputs(self.reference.outputs, result.tensors, check_shape=self.spec.check_output_shape)
        if problem is not None:
            layer = None
            if "non-finite" in problem:
                layer = first_non_finite_layer(self.model, self.example_inputs, self.names, unpack=self.unpack)
            raise VerificationError(problem, layer)
        return Trial(ratio, result.macs, count_params(self.model), channels_after, history)

    def _step(self, pruner: Any) -> None:
        """Prune one step, naming the group being handled on failure."""
        current: Any = None
        self._touched = True
        try:
            for group in pruner.step(interactive=True):
                current = group[0].dep.target.module
                group.prune()
        except ImportanceFailure:
            raise
        except Exception as exc:
            module = exc.module if isinstance(exc, GroupExplosion) else current or self.importance.current
            layer = self.names.get(module) if module is not None else None
            raise StepError(f"torch-pruning pruning step failed: {type(exc).__name__}: {exc}", layer) from exc

    def attempt_repaired(self, ratio: float) -> Trial:
        """:meth:`attempt`, freezing the failing block and trying again (at most ``max_repairs`` times).

        Raises:
            PruningError: The attempt cannot be repaired (the model is restored).
            Exception: The importance's own error, unchanged (the model is restored).
        """
        while True:
            try:
                return self.attempt(ratio)
            except ImportanceFailure as err:
                restore(self.snap)
                raise err.original from None
            except (StepError, VerificationError) as err:
                restore(self.snap)
                candidate = _freeze_candidate(self.model, err.layer, self.frozen,
                                              layer_first=isinstance(err, StepError))
                if candidate is None or sum(self.frozen_classes.values()) >= self.cfg.max_repairs:
                    after = f" (after freezing {', '.join(self.frozen)})" if self.frozen else ""
                    raise PruningError(self.model_class, err.layer, f"{err}{after}") from err
                self.freeze(candidate, f"{type(err).__name__}: {err}"[:300])
            except FixupError as err:
                restore(self.snap)
                raise PruningError(self.model_class, err.layer, str(err)) from err

    def freeze(self, name: str, reason: str) -> None:
        """Keep block ``name`` (and what it reads) unpruned in later attempts."""
        module = self.model.get_submodule(name)
        cls = type(module)
        seen = self.frozen_classes.get(cls, 0)
        self.frozen_classes[cls] = seen + 1
        targets = [(name, module)]
        if seen and looks_like_attention(module):
            # a second attention block of the same class failed: freeze the whole class at once
            targets = [(n, m) for n, m in self.model.named_modules() if type(m) is cls and n not in self.frozen]
            reason = f"every {cls.__name__} ({len(targets)} more): {reason}"
        for n, m in targets:
            self.frozen[n] = reason
            self.extra_ignored.extend(x for x in m.modules() if isinstance(x, LAYER_TYPES))
        # pin what the blocks read too: a failing block usually misreads its input width
        self.extra_ignored.extend(
            input_producers(self.model, [m for _, m in targets], self.example_inputs, unpack=self.unpack)
        )
        self._ranking = self._ranked_graph = None  # fewer groups to rank now

    # ------------------------------------------------------------------ diagnosis
    def why_nothing(self, ratio: float) -> str:
        """Why pruning at ``ratio`` removed no channel."""
        ranking = self.ranking()
        frozen = f"; frozen after failed attempts: {', '.join(self.frozen)}" if self.frozen else ""
        if ranking.scored == 0:
            return ("nothing prunable: no layer is left to rank (every layer is ignored, an output layer, frozen "
                    f"or unscored by the importance){frozen}")
        if ranking.scored == ranking.protected:
            return (f"the per-layer floor is reached: all {ranking.scored} ranked channels are protected "
                    f"(min_keep_ratio={self.cfg.min_keep_ratio!r}){frozen}")
        if ranking.removable(ratio) == 0:
            return f"ratio {ratio:.4g} of {ranking.scored} ranked channels rounds to zero channels"
        return (f"torch-pruning removed no channel at ratio {ratio:.4g} (round_to={self.round_to} may exceed what "
                f"the layers can lose){frozen}")


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


# ---------------------------------------------------------------------------------------------- the call's loop
@dataclass
class Outcome:
    """What :func:`execute` leaves: the session kept, the ratio applied, the kept trial, the budget's trials."""

    session: PruneSession
    ratio: float
    trial: Trial
    trials: list[tuple[float, float]]
    latency: dict[str, Any] | None
    widths_after: dict[str, int]


def execute(model: nn.Module, example_inputs: Any, importance: Any, cfg: PruneConfig, spec: PruningSpec,
            reference: Trace, unpack: bool | None, pruner_class: type, pruner_kwargs: dict[str, Any]) -> Outcome:
    """Prune ``model`` as ``cfg`` asks (ratio or budget, ``round_to`` chosen when ``"auto"``), or restore and raise.

    With ``cfg.dry_run`` the model is restored after the kept trial was measured.
    """
    probe = LatencyProbe(model, example_inputs, cfg) if _measures_latency(cfg) else None

    def session_for(round_to: int | None) -> PruneSession:
        return PruneSession(model, example_inputs, importance, dataclasses.replace(cfg, round_to=round_to), spec,
                            reference, unpack, pruner_class, dict(pruner_kwargs))

    session = None
    try:
        candidates: dict[int, float] = {}
        round_to = cfg.round_to
        if round_to == "auto":
            round_to, candidates = _fastest_round_to(session_for, probe)
        session = session_for(round_to)
        applied, trial, trials = _run(session, probe)
        by_latency = cfg.target is not None and cfg.target[0] == "latency"
        latency = probe.report(model, candidates, reuse_last=by_latency) if probe is not None else None
        widths_after = layer_widths(model)
        if cfg.dry_run:
            restore(session.snap)
    except BaseException:
        if session is not None:
            restore(session.snap)
        raise
    return Outcome(session, applied, trial, trials, latency, widths_after)


def _measures_latency(cfg: PruneConfig) -> bool:
    return cfg.round_to == "auto" or (cfg.target is not None and cfg.target[0] == "latency")


def _fastest_round_to(session_for: Callable[[int], PruneSession], probe: LatencyProbe) -> tuple[int, dict[int, float]]:
    """Prune with each of :data:`AUTO_ROUND_TO` (restoring after each): the fastest multiple and every ratio."""
    candidates: dict[int, float] = {}
    error: PruningError | None = None
    for multiple in AUTO_ROUND_TO:
        session = session_for(multiple)
        try:
            _run(session, probe)
            candidates[multiple] = probe.measure(session.model)[0]
        except PruningError as err:  # e.g. a budget no multiple-of-32 width can reach
            error = err
        finally:
            restore(session.snap)
    if not candidates:
        raise error if error is not None else PruningError(probe.model_class, None, "no round_to candidate")
    return min(candidates, key=lambda m: (candidates[m], m)), candidates


def _run(session: PruneSession, probe: LatencyProbe | None) -> tuple[float, Trial, list[tuple[float, float]]]:
    """Prune by ratio or budget: ``(ratio used, the kept trial, (ratio, kept fraction) of every trial)``."""
    try:
        ranking = session.ranking()
    except ImportanceFailure as err:
        raise err.original from None
    except StepError as err:
        raise PruningError(session.model_class, err.layer, str(err)) from err
    limit = ranking.largest_ratio() if session.cfg.global_ranking else 1.0
    if session.cfg.target is None:
        return _run_ratio(session, ranking, limit)
    return _run_budget(session, probe, limit)


def _run_ratio(session: PruneSession, ranking: Ranking, limit: float) -> tuple[float, Trial, list]:
    cfg = session.cfg
    applied = float(cfg.ratio)
    if cfg.global_ranking and ranking.removable(applied) > ranking.scored - ranking.protected:
        applied = limit
        if limit > 0:  # else nothing can go: the error below says why
            warnings.warn(f"pruning {session.model_class}: ratio {cfg.ratio:.4g} would cut into the per-layer floor "
                          f"(min_keep_ratio={cfg.min_keep_ratio!r}); pruning {applied:.4g} instead", stacklevel=5)
    trial = session.attempt_repaired(applied)
    if cfg.ratio > 0 and not trial.history:
        raise PruningError(session.model_class, None, session.why_nothing(cfg.ratio))
    return applied, trial, []


def _run_budget(session: PruneSession, probe: LatencyProbe | None, limit: float) -> tuple[float, Trial, list]:
    kind, goal = session.cfg.target
    base = session.reference.macs if kind == "macs" else session.params_before
    kept: dict[float, Trial] = {}

    def measure(r: float) -> float:
        kept[r] = session.attempt_repaired(r)
        if kind == "latency":
            return probe.measure(session.model)[0]
        return (kept[r].macs if kind == "macs" else kept[r].params) / max(base, 1)

    try:
        applied, trials = search_ratio(measure, goal, session.cfg.tolerance, min(session.cfg.max_ratio, limit),
                                       what=f"{kind} budget")
    except BudgetUnreachable as err:
        under = [r for r, f in err.trials if f <= goal]
        if kind != "latency" or not under:
            raise PruningError(session.model_class, None, str(err)) from err
        applied, trials = min(under), err.trials  # noisy timings: the least-pruned trial within the budget
        trial = session.attempt_repaired(applied)
        probe.measure(session.model)  # the report's figure is of the model kept
        return applied, trial, trials
    return applied, kept[applied], trials
