"""Hugging Face ``Trainer``: ``OrthoRegCallback`` trains with OrthoReg and can prune mid-training."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from transformers import TrainerCallback

from .hook import base_optimizer, grad_scale_of
from .midtrain import OrthoRegTraining, is_distributed
from .resume import HISTORY_FILE

__all__ = ["OrthoRegCallback", "rewrap_ddp_"]


def rewrap_ddp_(ddp: torch.nn.parallel.DistributedDataParallel) -> None:
    """Rebuild a ``DistributedDataParallel`` wrapper in place over its module's current parameters.

    DDP's reducer holds the parameters it saw when it was built; after pruning replaced them it would wait for
    gradients that never come. The wrapper object stays the same (the ``Trainer``'s loop keeps a reference to it);
    its options are kept, a communication hook registered on it is not.

    Example:
        >>> ddp = trainer.model_wrapped  # after the model was pruned  # doctest: +SKIP
        >>> rewrap_ddp_(ddp)  # doctest: +SKIP
    """
    options = dict(
        device_ids=ddp.device_ids, output_device=ddp.output_device, dim=ddp.dim,
        broadcast_buffers=ddp.broadcast_buffers if hasattr(ddp, "broadcast_buffers") else True,
        process_group=ddp.process_group, bucket_cap_mb=ddp.bucket_bytes_cap / (1024 * 1024),
        find_unused_parameters=ddp.find_unused_parameters, gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
    )
    torch.nn.parallel.DistributedDataParallel.__init__(ddp, ddp.module, **options)


class OrthoRegCallback(TrainerCallback):
    """Adds the OrthoReg gradient before every optimizer step of a ``Trainer``; optionally prunes after an epoch.

    The gradient goes in where ``on_pre_optimizer_step`` fires: after the ``Trainer`` clipped the gradients
    (``max_grad_norm``), right before ``optimizer.step()``; the regularizer's gradient is not clipped. It is
    added by a step pre-hook on the optimizer itself, so under ``fp16`` it lands in the gradients' own units
    whether or not the ``Trainer`` unscaled them for clipping (it does only when ``max_grad_norm > 0``):
    ``GradScaler.step()`` unscales before the hook, and a fused optimizer's scale is applied (see
    :func:`orthoreg_tp.integrations.attach`). With ``prune_epoch`` it accumulates
    :class:`~orthoreg_tp.OrthoRegImportance` from the training-loss gradients of the last ``importance_batches``
    optimizer steps of that epoch (before adding its own gradient), prunes ``model`` at the end of the epoch
    through :func:`orthoreg_tp.adapters.prune`, points the optimizer at the new parameters (state sliced to the
    kept channels; the optimizer and scheduler objects stay) and training goes on. Under ``torchrun`` the
    importance is summed over ranks (every rank prunes the same channels) and the DDP wrapper is rebuilt over
    the new parameters, which needs :meth:`bind` (a callback is not handed the wrapped model).
    Checkpoints saved after the prune get ``orthoreg_tp.json`` (the pruning history) beside the weights:
    :func:`orthoreg_tp.integrations.load_pruned_checkpoint` reloads one.

    Args:
        coefficient: ``lambda`` of the penalty.
        every: Regularize every ``every``-th optimizer step with ``every`` times the gradient.
        prune_epoch: 0-based epoch after which to prune (``None``: regularize only).
        ratio: Fraction of prunable channels to remove.
        target: ``(kind, fraction)`` budget instead of ``ratio``.
        example_inputs: Inputs for tracing: a dict of keyword inputs (``{"pixel_values": x}``), a tensor or a
            tuple of positional inputs.
        importance_batches: Optimizer steps at the end of ``prune_epoch`` that feed the importance.

    Example:
        >>> from orthoreg_tp.integrations.transformers import OrthoRegCallback
        >>> cb = OrthoRegCallback(prune_epoch=1, ratio=0.3, example_inputs={"pixel_values": torch.randn(1, 3, 32, 32)})
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])  # doctest: +SKIP
        >>> cb.bind(trainer)  # needed under torchrun only  # doctest: +SKIP
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
        self.core = OrthoRegTraining(
            coefficient=coefficient, every=every, prune_epoch=prune_epoch, ratio=ratio, target=target,
            example_inputs=example_inputs, importance_batches=importance_batches,
        )
        self.trainer: Any = None
        self._handle: Any = None
        self._epoch, self._step, self._steps, self._samples = 0, 0, math.inf, 1

    @property
    def report(self) -> Any:
        """The :class:`~orthoreg_tp.adapters.PruneReport` of the prune (``None`` before it)."""
        return self.core.report

    def load_history(self, checkpoint: Any) -> OrthoRegCallback:
        """On resume: adopt the pruning history of ``checkpoint`` (a ``checkpoint-N`` folder) as already done.

        Replay it on the model first (:func:`~orthoreg_tp.integrations.replay_checkpoint_`); later checkpoints
        then carry the full history and the run does not prune again.
        """
        from .resume import pruning_history

        history = pruning_history(checkpoint)
        self.core.load_state_dict({"history": history, "pruned": bool(history)})
        return self

    def bind(self, trainer: Any) -> OrthoRegCallback:
        """Give the callback its ``Trainer`` (to rebuild the DDP wrapper after a prune under ``torchrun``)."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Bind the regularizer to the model and the step pre-hook to the optimizer."""
        self.core.start(model)
        if self._handle is not None:
            self._handle.remove()
        self._handle = base_optimizer(optimizer).register_step_pre_hook(self._pre_step)
        self._samples = args.per_device_train_batch_size * args.gradient_accumulation_steps

    def on_epoch_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        """Reset the step count of the epoch; optimizer steps per epoch from the dataloader's length."""
        self._epoch, self._step = int(state.epoch or 0), 0
        try:
            self._steps = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        except TypeError:  # no length (an iterable dataset): the importance window cannot be placed
            self._steps = math.inf

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.core.before_step(epoch=self._epoch, step=self._step, steps_in_epoch=self._steps,
                              num_samples=self._samples, scale=grad_scale_of(optimizer))
        self._step += 1

    def on_epoch_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Prune at the end of ``prune_epoch``; carry the optimizer (and DDP) over to the new parameters."""
        if not self.core.should_prune(self._epoch):
            return
        wrapped = getattr(self.trainer, "model_wrapped", None)
        if is_distributed() and not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError("OrthoRegCallback prunes under torch.distributed only with its Trainer bound: "
                               "call callback.bind(trainer) before trainer.train()")
        self.core.prune([optimizer])
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            rewrap_ddp_(wrapped)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the pruning history into the checkpoint folder just saved."""
        if not self.core.history or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, HISTORY_FILE), "w") as f:
                json.dump(self.core.state_dict(), f)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the step pre-hook from the optimizer."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
