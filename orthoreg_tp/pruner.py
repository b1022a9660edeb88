"""``OrthoRegPruner``: torch-pruning's pruner with OrthoReg's regularizer and importance."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch_pruning as tp
from torch import Tensor, nn

from .floor import DEFAULT_MIN_KEEP_RATIO, FloorImportance
from .importance import AccumulatingImportance, OrthoRegImportance
from .metrics import prunable_channels
from .regularizer import OrthoRegularizer


class OrthoRegPruner(tp.pruner.BasePruner):
    """A torch-pruning pruner whose ``regularize`` applies the OrthoReg gradient.

    Everything but the regularizer is torch-pruning's ``BasePruner``: keyword arguments are forwarded to it
    unchanged. Defaults differ only where the paper does: ``global_pruning=True`` (filters of all layers are
    ranked together) and ``importance=OrthoRegImportance()``. The per-layer floor (``int(0.05 * width) + 1``
    channels) lives in the importance's scores, because torch-pruning's ``max_pruning_ratio`` does not cap a global
    step: an importance without a floor of its own is wrapped in :class:`~orthoreg_tp.FloorImportance`.

    Args:
        model: The model to prune.
        example_inputs: Inputs for tracing the dependency graph.
        importance: Group importance (default :class:`OrthoRegImportance`; accumulate it before ``step()``).
        coefficient: The regularizer's ``lambda``.
        regularizer_kwargs: Extra keyword arguments for :class:`OrthoRegularizer` (``norm``, ``layer_weights``).
        **kwargs: Any ``tp.pruner.BasePruner`` argument (``pruning_ratio``, ``ignored_layers``, ...).

    Example:
        >>> pruner = OrthoRegPruner(model, x, coefficient=1e-2, pruning_ratio=0.5,
        ...                         ignored_layers=[model.fc])  # doctest: +SKIP
        >>> loss.backward(); pruner.regularize(model); optimizer.step()  # doctest: +SKIP
        >>> pruner.importance.accumulate(model, loader); pruner.step(); pruner.update_regularizer()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor | Any,
        importance: Any = None,
        *,
        coefficient: float = 1e-2,
        regularizer_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("global_pruning", True)
        importance = importance or OrthoRegImportance()
        if getattr(importance, "floor", None) is None:
            importance = FloorImportance(importance, min_keep_ratio=DEFAULT_MIN_KEEP_RATIO)
        self.regularizer = OrthoRegularizer(
            model,
            coefficient,
            ignored_layers=[m for m in kwargs.get("ignored_layers") or [] if isinstance(m, nn.Module)],
            **dict(regularizer_kwargs or {}),
        )
        super().__init__(model, example_inputs, importance=importance, **kwargs)
        self._initial_channels = prunable_channels(self)

    def regularize(self, model: nn.Module, loss: Tensor | None = None) -> None:
        """Add the OrthoReg gradient to ``.grad`` (between ``loss.backward()`` and ``optimizer.step()``)."""
        self.regularizer.regularize(model)

    def update_regularizer(self) -> None:
        """Follow the pruned shapes (call after every ``step()``; shapes are also read live)."""
        self.regularizer.update()

    def step(self, interactive: bool = False) -> Any:
        """One pruning step (see ``tp.pruner.BasePruner.step``); warns if the achieved ratio misses the target.

        Raises:
            RuntimeError: The importance (or one it wraps) has no accumulated statistics. Checked before
                torch-pruning counts the step, so a later ``step()`` still prunes the scheduled amount.
        """
        self._check_accumulated()
        result = super().step(interactive=interactive)
        if not interactive:
            target = self.per_step_pruning_ratio[min(self.current_step, self.iterative_steps)]
            achieved = self.achieved_ratio
            if self.global_pruning and not self.pruning_ratio_dict and abs(achieved - target) > 0.02:
                warnings.warn(
                    f"OrthoRegPruner removed {achieved:.3f} of prunable channels, target {target:.3f}",
                    stacklevel=2,
                )
        return result

    def _check_accumulated(self) -> None:
        imp, seen = self.importance, set()
        while imp is not None and id(imp) not in seen:  # walk wrappers (floors, tie-breaking) down to the source
            seen.add(id(imp))
            if isinstance(imp, AccumulatingImportance) and len(imp.stats) == 0:
                raise RuntimeError(
                    f"{type(imp).__name__} has no accumulated {imp.statistic}s: call imp.accumulate(model, data) "
                    "(or imp.accumulate_grad(model) after each backward) before pruner.step(); nothing was pruned"
                )
            imp = imp.__dict__.get("inner")

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the initially prunable channels removed so far."""
        return 1.0 - prunable_channels(self) / max(self._initial_channels, 1)
