"""The host pruners: any torch-pruning pruner on a :class:`.hostgraph.RobustDependencyGraph`, built in one place.

``tp.pruner.BasePruner.__init__`` builds its ``tp.DependencyGraph`` inline. The pruner classes made here build a
:class:`RobustDependencyGraph` first, then run the host ``__init__`` with a forward function that does not run
the model (so the host's own graph is empty and cheap), and take the robust graph where the host assigns
``self.DG``: everything the host and its subclasses compute from the graph in ``__init__`` (initial widths,
channel counts, the regularized groups of ``GroupNormPruner``...) is computed on the robust graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .autograd import structure_only
from .hostgraph import RobustDependencyGraph

__all__ = ["adapted_pruner_class", "make_pruner", "merge_pruner_kwargs"]

_GRAPH_ARGS = ("forward_fn", "output_transform", "unwrapped_parameters", "customized_pruners")


def _no_forward(model: nn.Module, example_inputs: Any) -> torch.Tensor:
    """The forward function of the host's placeholder graph: a tensor unconnected to the model."""
    return torch.zeros(())


def _build_graph(model: nn.Module, example_inputs: Any, kwargs: dict[str, Any],
                 recording: Any = None) -> RobustDependencyGraph:
    """The robust graph of ``model`` for the pruner arguments ``kwargs``.

    One traced forward pass, or none when ``recording`` holds one.
    """
    ignored_params = [p for p in kwargs.get("ignored_layers") or [] if isinstance(p, nn.Parameter)]
    graph_args = {k: kwargs.get(k) for k in _GRAPH_ARGS}
    if graph_args["unwrapped_parameters"] is not None:
        graph_args["unwrapped_parameters"] = list(graph_args["unwrapped_parameters"])  # the host appends to it
    if recording is not None:
        return RobustDependencyGraph().build_dependency(
            model, example_inputs=example_inputs, ignored_params=ignored_params, recording=recording, **graph_args
        )
    try:
        with structure_only():  # the graph keeps the autograd graph: without activations, it holds little
            return RobustDependencyGraph().build_dependency(
                model, example_inputs=example_inputs, ignored_params=list(ignored_params), **graph_args
            )
    except Exception:  # e.g. a forward that differentiates inside: trace again with the activations
        pass
    if graph_args["unwrapped_parameters"] is not None:
        graph_args["unwrapped_parameters"] = list(graph_args["unwrapped_parameters"])
    return RobustDependencyGraph().build_dependency(
        model, example_inputs=example_inputs, ignored_params=ignored_params, **graph_args
    )


class _RobustPrunerMixin:
    """Builds the dependency graph as a :class:`RobustDependencyGraph`; finalizes after every step."""

    finalizer: Callable[[nn.Module, Any], None] | None = None

    def __init__(self, model: nn.Module, example_inputs: Any, *, graph: RobustDependencyGraph | None = None,
                 recording: Any = None, **kwargs: Any) -> None:
        if graph is None:
            graph = _build_graph(model, example_inputs, kwargs, recording)
        elif graph.model is not model or graph.generation:
            raise ValueError("graph= must be an unpruned graph of the same model (reused instead of tracing again)")
        self.__dict__["_pending_graph"] = graph
        self.__dict__["_finalized_generation"] = graph.generation
        # the host builds a placeholder graph (no forward pass; the detected parameters passed so that it does not
        # warn about them twice) and assigns it to self.DG, where the property below takes the robust one instead
        host_kwargs = dict(kwargs, forward_fn=_no_forward, output_transform=None,
                           unwrapped_parameters=list(graph.unwrapped_parameters))
        try:
            super().__init__(model, example_inputs, **host_kwargs)
        finally:
            self.__dict__.pop("_pending_graph", None)
        if self.__dict__.get("_robust_graph") is not graph:
            raise RuntimeError(f"{type(self).__name__}: the host pruner never assigned its dependency graph")

    @property
    def DG(self) -> Any:  # noqa: N802 - the host's attribute name
        """The pruner's dependency graph (a :class:`RobustDependencyGraph`)."""
        return self.__dict__["_robust_graph"]

    @DG.setter
    def DG(self, graph: Any) -> None:  # noqa: N802
        pending = self.__dict__.get("_pending_graph")
        self.__dict__["_robust_graph"] = pending if pending is not None else graph

    def step(self, interactive: bool = False) -> Generator[Any, None, None] | None:
        """One pruning step (``tp.pruner.BasePruner.step``), then :meth:`finalize`.

        With ``interactive=True`` the fix-ups run when the returned generator is exhausted; call
        :meth:`finalize` yourself if you stop iterating early.
        """
        if interactive:
            return self._finalizing(super().step(interactive=True))
        result = super().step(interactive=False)
        self.finalize()
        return result

    def _finalizing(self, groups: Generator[Any, None, None] | None) -> Generator[Any, None, None]:
        if groups is not None:
            yield from groups
        self.finalize()

    def finalize(self) -> None:
        """Apply the fix-ups (``finalizer(model, pruner)``) if a group was pruned since the last call."""
        generation = self.DG.generation
        if self.finalizer is not None and generation != self.__dict__.get("_finalized_generation"):
            self.finalizer(self.model, self)
        self.__dict__["_finalized_generation"] = generation


@functools.cache
def adapted_pruner_class(pruner_class: type = tp.pruner.MetaPruner) -> type:
    """The subclass of ``pruner_class`` whose dependency graph is a :class:`RobustDependencyGraph`.

    Construct it like ``pruner_class`` (keyword arguments after ``example_inputs``). Its ``step()`` also calls
    ``finalizer(model, pruner)`` when set (:func:`build_pruner` sets the spec's fix-ups).

    Args:
        pruner_class: ``tp.pruner.BasePruner`` or any subclass (``MetaPruner``, ``GroupNormPruner``,
            ``BNScalePruner``, ``GrowingRegPruner``, ``orthoreg_tp.OrthoRegPruner``...).

    Raises:
        TypeError: ``pruner_class`` is not a ``tp.pruner.BasePruner`` subclass.

    Example:
        >>> import torch, torch_pruning as tp
        >>> from orthoreg_tp.adapters import adapted_pruner_class
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> cls = adapted_pruner_class(tp.pruner.MetaPruner)
        >>> pruner = cls(model, torch.randn(1, 3, 8, 8), importance=tp.importance.MagnitudeImportance(),
        ...              pruning_ratio=0.5, ignored_layers=[model[1]])
        >>> pruner.step(); model[0].out_channels
        4
    """
    if not (isinstance(pruner_class, type) and issubclass(pruner_class, tp.pruner.BasePruner)):
        raise TypeError(f"pruner_class must be a tp.pruner.BasePruner subclass, got {pruner_class!r}")
    if issubclass(pruner_class, _RobustPrunerMixin):
        return pruner_class
    name = "Robust" + pruner_class.__name__
    return type(name, (_RobustPrunerMixin, pruner_class), {"__module__": __name__, "__qualname__": name})


def merge_pruner_kwargs(model: nn.Module, base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """The one merge of torch-pruning keyword arguments: ``base`` (the spec's, the session's) with the user's.

    Lists are concatenated, dicts merged (the user's entries win), anything else replaced. Parameters of layers
    the user gives a customized pruner are that pruner's: ``base``'s entries for them in
    ``unwrapped_parameters`` (a gate's scale found used functionally) are dropped.

    Example:
        >>> import torch.nn as nn
        >>> merged = merge_pruner_kwargs(nn.Linear(2, 2), {"ignored_layers": [1], "num_heads": {}},
        ...                              {"ignored_layers": (2,), "round_to": 8})
        >>> merged["ignored_layers"], merged["round_to"]
        ([1, 2], 8)
    """
    kwargs = dict(base)
    custom = tuple((user.get("customized_pruners") or {}).keys())
    if custom and kwargs.get("unwrapped_parameters"):
        owned = {
            id(p)
            for m in model.modules()
            if any(m is key or (isinstance(key, type) and isinstance(m, key)) for key in custom)
            for p in m.parameters()
        }
        kwargs["unwrapped_parameters"] = [(p, d) for p, d in kwargs["unwrapped_parameters"] if id(p) not in owned]
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
            kwargs[key] = {**kwargs[key], **value}
        elif isinstance(value, (list, tuple)) and isinstance(kwargs.get(key), list):
            kwargs[key] = kwargs[key] + list(value)
        else:
            kwargs[key] = value
    return kwargs


def make_pruner(pruner_class: type, model: nn.Module, example_inputs: Any, importance: Any,
                kwargs: dict[str, Any], finalizer: Callable[[nn.Module, Any], None] | None = None, *,
                graph: RobustDependencyGraph | None = None, recording: Any = None) -> Any:
    """The one place where the project builds a torch-pruning pruner (an :func:`adapted_pruner_class` instance).

    ``kwargs`` are the merged pruner arguments (:func:`merge_pruner_kwargs`); ``finalizer(model, pruner)`` (the
    spec's fix-ups) runs after every step of the returned pruner. ``graph``: the unpruned graph of an earlier
    pruner of ``model`` built with the same graph arguments (``forward_fn``, ``unwrapped_parameters``,
    ``customized_pruners``, ignored parameters), reused instead of tracing the model again; ``recording``: a
    :class:`~.tracing.Recording` of the unpruned model on ``example_inputs`` with the pruner's forward function,
    from which the graph is built without running the model.
    """
    pruner = adapted_pruner_class(pruner_class)(model, example_inputs, importance=importance, graph=graph,
                                                recording=recording, **kwargs)
    pruner.finalizer = finalizer
    return pruner
