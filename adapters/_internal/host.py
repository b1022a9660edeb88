"""``build_pruner``: any torch-pruning pruner, on a :class:`~orthoreg_tp.adapters.graph.RobustDependencyGraph`.

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

from .graph import RobustDependencyGraph

__all__ = ["adapted_pruner_class", "build_pruner"]

_GRAPH_ARGS = ("forward_fn", "output_transform", "unwrapped_parameters", "customized_pruners")


def _no_forward(model: nn.Module, example_inputs: Any) -> torch.Tensor:
    """The forward function of the host's placeholder graph: a tensor unconnected to the model."""
    return torch.zeros(())


class _RobustPrunerMixin:
    """Builds the dependency graph as a :class:`RobustDependencyGraph`; finalizes after every step."""

    finalizer: Callable[[nn.Module, Any], None] | None = None

    def __init__(self, model: nn.Module, example_inputs: Any, **kwargs: Any) -> None:
        ignored_params = [p for p in kwargs.get("ignored_layers") or [] if isinstance(p, nn.Parameter)]
        graph_args = {k: kwargs.get(k) for k in _GRAPH_ARGS}
        if graph_args["unwrapped_parameters"] is not None:
            graph_args["unwrapped_parameters"] = list(graph_args["unwrapped_parameters"])  # the host appends to it
        graph = RobustDependencyGraph().build_dependency(
            model, example_inputs=example_inputs, ignored_params=ignored_params, **graph_args
        )
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


def _merged_kwargs(model: nn.Module, spec: Any, user: dict[str, Any]) -> dict[str, Any]:
    """The spec's pruner arguments with the user's: lists concatenated, dicts merged, anything else replaced.

    Parameters of layers the user gives a customized pruner are that pruner's: the spec's entries for them in
    ``unwrapped_parameters`` (a gate's scale it found used functionally) are dropped.
    """
    kwargs = spec.pruner_kwargs()
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
    cls = adapted_pruner_class(pruner_class)
    if spec is None:
        from .api import prepare

        spec = prepare(model, example_inputs)
    kwargs = _merged_kwargs(model, spec, torch_pruning_kwargs)
    pruner = cls(model, example_inputs, importance=importance, **kwargs)
    pruner.finalizer = spec.finalize
    return pruner
