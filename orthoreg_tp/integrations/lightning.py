"""PyTorch Lightning: ``OrthoRegCallback`` trains with OrthoReg and can prune mid-training (imports lightning)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size

from .midtrain import OrthoRegTraining
from .resume import CHECKPOINT_KEY

__all__ = ["OrthoRegCallback"]


def _prune_averages(trainer: pl.Trainer, example_inputs: Any, history: Any) -> int:
    """Prune the averaged copies of Lightning's weight-averaging callbacks (EMA, SWA) the same way; how many."""
    from lightning.pytorch.callbacks import WeightAveraging

    from ..adapters import replay
    from .rebuild import map_tensors

    done = 0
    for cb in trainer.callbacks:
        average = getattr(cb, "_average_model", None) if isinstance(cb, WeightAveraging) else None
        if average is not None:
            device = next(average.module.parameters()).device
            replay(average.module, map_tensors(example_inputs, lambda t, d=device: t.to(d)), history)
            done += 1
    return done


class OrthoRegCallback(pl.Callback):
    """Adds the OrthoReg gradient before every optimizer step; optionally prunes at the end of an epoch.

    Runs in ``on_before_optimizer_step``: after the backward pass (and after mixed precision unscaled the
    gradients), before Lightning's gradient clipping, so the clip sees the regularized gradient as a
    hand-written loop would. With ``prune_epoch`` it accumulates :class:`~orthoreg_tp.OrthoRegImportance` from
    the training-loss gradients of the last ``importance_batches`` batches of that epoch (before it adds the
    regularizer's gradient), prunes the ``LightningModule`` at the epoch's end through
    :func:`orthoreg_tp.adapters.prune`, points every optimizer at the new parameters (momentum / Adam state
    sliced to the kept channels; the optimizer and scheduler objects stay), re-wraps DDP over the new parameters
    and goes on training (the averaged copy of Lightning's ``EMAWeightAveraging`` / ``WeightAveraging`` is pruned
    the same way, by replaying the history). Under the ``ddp`` strategy the importance is summed over ranks
    first, so every rank prunes the same channels. Checkpoints carry the pruning history (key ``"orthoreg_tp"``):
    reload one with :func:`orthoreg_tp.integrations.load_pruned_checkpoint`, or resume with
    :func:`orthoreg_tp.integrations.replay_checkpoint_` before ``trainer.fit(..., ckpt_path=...)``.

    Args:
        coefficient: ``lambda`` of the penalty (1e-2 in the paper for VGG/ResNet, 1e-3 for MobileNet).
        every: Regularize every ``every``-th step with ``every`` times the gradient.
        prune_epoch: 0-based epoch after which to prune (``None``: regularize only).
        ratio: Fraction of prunable channels to remove.
        target: ``(kind, fraction)`` budget instead of ``ratio``: ``("macs", 0.5)``, ``("params", ...)``, ...
        example_inputs: Inputs ``pl_module(example_inputs)`` runs on (needed with ``prune_epoch``).
        importance_batches: Training batches at the end of ``prune_epoch`` that feed the importance.

    Example:
        >>> from orthoreg_tp.integrations.lightning import OrthoRegCallback
        >>> cb = OrthoRegCallback(coefficient=1e-2, prune_epoch=3, ratio=0.5, example_inputs=torch.randn(1, 3, 32, 32))
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[cb])  # doctest: +SKIP
    """

    def __init__(
        self,
        coefficient: float = 1e-2,
        *,
        every: int = 1,
        prune_epoch: int | None = None,
        ratio: float | None = None,
        target: tuple[str, float] | None = None,
        example_inputs: Any = None,
        importance_batches: int = 32,
    ) -> None:
        super().__init__()
        self.core = OrthoRegTraining(
            coefficient=coefficient, every=every, prune_epoch=prune_epoch, ratio=ratio, target=target,
            example_inputs=example_inputs, importance_batches=importance_batches,
        )
        self._batch_idx = 0
        self._batch_size = 1

    @property
    def report(self) -> Any:
        """The :class:`~orthoreg_tp.adapters.PruneReport` of the prune (``None`` before it)."""
        return self.core.report

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind the regularizer to the module."""
        self.core.start(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Remember where in the epoch the coming optimizer step is, and its batch size."""
        self._batch_idx = batch_idx
        try:
            self._batch_size = extract_batch_size(batch)
        except Exception:  # noqa: BLE001 - an exotic batch: weigh every batch equally
            self._batch_size = 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Importance (in the window), then the OrthoReg gradient; the gradients are unscaled here."""
        steps = trainer.num_training_batches
        self.core.before_step(
            epoch=trainer.current_epoch,
            step=self._batch_idx,
            steps_in_epoch=steps if math.isfinite(steps) else math.inf,
            num_samples=self._batch_size * trainer.accumulate_grad_batches,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune at the end of ``prune_epoch`` and carry the optimizers and DDP over to the new parameters."""
        if not self.core.should_prune(trainer.current_epoch):
            return
        report = self.core.prune(trainer.optimizers)
        _prune_averages(trainer, self.core.example_inputs, report.history)
        strategy = trainer.strategy
        if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel) and hasattr(strategy,
                                                                                           "configure_ddp"):
            strategy.model = pl_module  # DDP's reducer holds the replaced parameters: wrap the pruned module anew
            strategy.configure_ddp()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Store the pruning history where :func:`~orthoreg_tp.integrations.load_pruned_checkpoint` reads it."""
        checkpoint[CHECKPOINT_KEY] = self.core.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """The callback's state in Lightning checkpoints (the history, whether it pruned)."""
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume (a run that already pruned does not prune again)."""
        self.core.load_state_dict(state_dict)
