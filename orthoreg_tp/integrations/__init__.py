"""OrthoReg inside the trainers people use: a framework-free optimizer hook, callbacks, trainer subclasses.

``attach`` (any loop that calls ``optimizer.step()``: hand-written, timm's ``train.py``, accelerate) lives here;
the callbacks are in ``orthoreg_tp.integrations.lightning`` and ``orthoreg_tp.integrations.transformers`` and the
YOLO trainers in ``orthoreg_tp.integrations.ultralytics``, which import their framework (this package does not).
See docs/integrations.md.

Example:
    >>> import torch
    >>> from orthoreg_tp.integrations import attach
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> handle = attach(opt, model, coefficient=1e-2)  # then train as usual
    >>> handle.remove()
"""

from .hook import OrthoRegHandle, attach, base_optimizer, grad_scale_of, regularize_scaled
from .midtrain import OrthoRegTraining
from .rebuild import kept_flat_indices, remap_optimizer_
from .resume import load_pruned_checkpoint, pruning_history, replay_checkpoint_

__all__ = [
    "OrthoRegHandle",
    "OrthoRegTraining",
    "attach",
    "base_optimizer",
    "grad_scale_of",
    "kept_flat_indices",
    "load_pruned_checkpoint",
    "pruning_history",
    "regularize_scaled",
    "remap_optimizer_",
    "replay_checkpoint_",
]
