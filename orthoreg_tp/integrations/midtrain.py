"""What both trainer callbacks share: regularize each step, score the last batches of an epoch, prune, go on.

:class:`OrthoRegTraining` holds the state; the Lightning and transformers callbacks only translate their
framework's events into its calls (:meth:`~OrthoRegTraining.before_step` right before every optimizer step,
:meth:`~OrthoRegTraining.prune` at the end of the pruning epoch).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..importance import OrthoRegImportance
from ..regularizer import OrthoRegularizer
from .hook import regularize_scaled
from .rebuild import kept_flat_indices, map_tensors, remap_optimizer_

__all__ = ["OrthoRegTraining", "is_distributed"]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialized with more than one rank.

    Example:
        >>> is_distributed()
        False
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class OrthoRegTraining:
    """The regularizer, the importance window and the mid-training prune of one training run.

    Args:
        coefficient: ``lambda`` of the OrthoReg penalty (0 disables the regularizer).
        every: Regularize every ``every``-th optimizer step, with ``every`` times the gradient.
        prune_epoch: 0-based epoch at whose end the model is pruned (``None``: never prune).
        ratio: Fraction of the prunable channels to remove (see :func:`orthoreg_tp.adapters.prune`).
        target: ``(kind, fraction)`` budget instead of ``ratio`` (``"macs"``, ``"params"``, ``"latency"``).
        example_inputs: Inputs the model is traced with for pruning (required with ``prune_epoch``; a tensor, a
            tuple of positional inputs or a dict of keyword inputs).
        importance_batches: Optimizer steps at the end of the pruning epoch whose training-loss gradients are
            accumulated into :class:`~orthoreg_tp.OrthoRegImportance` (no extra pass over the data).

    Example:
        >>> state = OrthoRegTraining(coefficient=1e-2)
        >>> state.start(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
        >>> state.pruned
        False
    """

    def __init__(
        self,
        *,
        coefficient: float = 1e-2,
        every: int = 1,
        prune_epoch: int | None = None,
        ratio: float | None = None,
        target: tuple[str, float] | None = None,
        example_inputs: Any = None,
        importance_batches: int = 32,
    ) -> None:
        if not float(coefficient) >= 0.0:
            raise ValueError(f"coefficient must be a non-negative number, got {coefficient!r}")
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if int(importance_batches) != importance_batches or importance_batches < 1:
            raise ValueError(f"importance_batches must be a positive integer, got {importance_batches!r}")
        if prune_epoch is not None:
            if int(prune_epoch) != prune_epoch or prune_epoch < 0:
                raise ValueError(f"prune_epoch must be a non-negative integer or None, got {prune_epoch!r}")
            if (ratio is None) == (target is None):
                raise ValueError(f"with prune_epoch give exactly one of ratio= and target=, got {ratio!r}, {target!r}")
            if example_inputs is None:
                raise ValueError("prune_epoch needs example_inputs (inputs to trace the model with), got None")
        elif ratio is not None or target is not None:
            raise ValueError(f"ratio={ratio!r} / target={target!r} need prune_epoch (the epoch to prune after)")
        self.coefficient, self.every = float(coefficient), int(every)
        self.prune_epoch = None if prune_epoch is None else int(prune_epoch)
        self.ratio, self.target = ratio, target
        self.example_inputs = example_inputs
        self.importance_batches = int(importance_batches)
        self.history: list[list] = []
        self.pruned = False
        self.report: Any = None
        self.model: nn.Module | None = None
        self.regularizer: OrthoRegularizer | None = None
        self.importance: OrthoRegImportance | None = None

    def start(self, model: nn.Module) -> None:
        """Bind to the (bare) model about to be trained."""
        self.model = model
        self.regularizer = OrthoRegularizer(model, self.coefficient, every=self.every)

    def in_window(self, epoch: int, step: int, steps_in_epoch: int | float) -> bool:
        """Whether optimizer step ``step`` (0-based within ``epoch``) feeds the importance."""
        if self.prune_epoch is None or self.pruned or epoch != self.prune_epoch:
            return False
        return step >= steps_in_epoch - self.importance_batches

    def before_step(
        self, *, epoch: int, step: int, steps_in_epoch: int | float, num_samples: int, scale: Any = None
    ) -> None:
        """Right before an optimizer step: accumulate the importance (in its window), then regularize.

        Args:
            epoch: 0-based epoch.
            step: 0-based optimizer step within the epoch.
            steps_in_epoch: Optimizer steps per epoch (``inf`` when unknown: the window never opens).
            num_samples: Samples behind the gradient in ``.grad`` (its weight in the importance average).
            scale: Factor the gradients are still multiplied by (an AMP scale), or ``None``.
        """
        if self.model is None:
            raise RuntimeError("OrthoRegTraining.before_step() before start(model)")
        if self.in_window(epoch, step, steps_in_epoch):
            if self.importance is None:
                self.importance = OrthoRegImportance()
            self._accumulate(num_samples, scale)
        regularize_scaled(self.regularizer, scale)

    def _accumulate(self, num_samples: int, scale: Any) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not all(bool(g.isfinite().all()) for g in grads):
            logger.warning("OrthoReg importance: skipped a step with non-finite gradients (an AMP overflow)")
            return
        if scale is None:
            self.importance.accumulate_grad(self.model, num_samples=max(int(num_samples), 1))
            return
        inv = 1.0 / float(scale)  # AMP scales are powers of two: dividing and multiplying back is exact
        torch._foreach_mul_(grads, inv)
        try:
            self.importance.accumulate_grad(self.model, num_samples=max(int(num_samples), 1))
        finally:
            torch._foreach_mul_(grads, float(scale))

    def should_prune(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` is the time to prune."""
        return self.prune_epoch is not None and not self.pruned and epoch == self.prune_epoch

    def prune(self, optimizers: Iterable[Any] = ()) -> Any:
        """Prune the model with the accumulated importance and remap ``optimizers`` onto the new parameters.

        Under ``torch.distributed`` the importance is summed over ranks first, so every rank ranks the same
        scores and prunes the same channels. Each optimizer keeps its object (a scheduler bound to it keeps
        working) and every surviving parameter's state, sliced to its kept entries.

        Returns:
            The :class:`~orthoreg_tp.adapters.PruneReport`.
        """
        from ..adapters import prune
        from .hook import base_optimizer

        model = self.model
        if self.importance is None or len(self.importance.stats) == 0:
            raise RuntimeError(
                f"no importance was accumulated in epoch {self.prune_epoch}: its last {self.importance_batches} "
                "optimizer steps never reached the callback (fewer steps than expected, or all skipped)"
            )
        if is_distributed():
            self.importance.all_reduce()
        device = next(model.parameters()).device
        inputs = map_tensors(self.example_inputs, lambda t: t.to(device))
        old = dict(model.named_parameters())
        before = copy.deepcopy(model)
        options = {"ratio": self.ratio} if self.target is None else {"target": tuple(self.target)}
        report = prune(model, inputs, importance=self.importance, **options)
        kept = kept_flat_indices(before, inputs, report.history)
        del before
        for opt in optimizers:
            remap_optimizer_(base_optimizer(opt), old, model, kept)
        self.history.extend([list(h) for h in report.history])
        self.pruned, self.report, self.importance = True, report, None
        self.regularizer.update()
        logger.info("OrthoReg pruned %s: params %d -> %d", type(model).__name__, report.params_before,
                    report.params_after)
        return report

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs: the pruning history (JSON-able) and whether the prune happened."""
        return {"history": [list(h) for h in self.history], "pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model itself must already be pruned, see ``replay_checkpoint_``)."""
        self.history = [list(h) for h in state.get("history", [])]
        self.pruned = bool(state.get("pruned", bool(self.history)))

