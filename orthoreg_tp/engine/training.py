"""Training and evaluation loops, the paper's piecewise-constant learning rate, and optimizer building.

Besides the paper's setup (SGD, piecewise-constant "step" rates), the loops offer what the timm and torchvision
training references offer: AdamW, a cosine schedule with linear warmup (:func:`scheduled_lr`), label
smoothing, and distillation from a frozen teacher (:class:`~orthoreg_tp.engine.distill.Teacher`).

Example:
    >>> sched = LRSchedule.parse("0.1:80,0.01:40,0.001:40")   # the paper's base training
    >>> sched.total_epochs, sched.lr_at(100)
    (160, 0.01)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .distributed import all_reduce_sum


@dataclass(frozen=True)
class LRSchedule:
    """Piecewise-constant learning rate: ``lrs[i]`` for ``epochs[i]`` epochs, in order.

    Args:
        lrs: Learning rate of each piece.
        epochs: Number of epochs of each piece (0 allowed; a schedule of total 0 trains nothing).

    Example:
        >>> LRSchedule((0.1, 0.01), (24, 1)).lr_at(24)
        0.01
    """

    lrs: tuple[float, ...]
    epochs: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.lrs) != len(self.epochs) or not self.lrs:
            raise ValueError(f"lrs and epochs must be non-empty and of equal length, got {self.lrs!r}, "
                             f"{self.epochs!r}")
        if any(e < 0 for e in self.epochs) or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"epochs must be >= 0 and lrs > 0, got {self.epochs!r}, {self.lrs!r}")
        object.__setattr__(self, "lrs", tuple(float(v) for v in self.lrs))
        object.__setattr__(self, "epochs", tuple(int(v) for v in self.epochs))

    @property
    def total_epochs(self) -> int:
        """Sum of the pieces' epochs."""
        return sum(self.epochs)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch`` (the last piece's rate past the end)."""
        for lr, n in zip(self.lrs, self.epochs):
            if epoch < n:
                return lr
            epoch -= n
        return self.lrs[-1]

    @classmethod
    def parse(cls, text: str) -> LRSchedule:
        """Parse ``"LR:EPOCHS,LR:EPOCHS,..."`` (e.g. ``"0.1:24,0.01:1"``).

        Raises:
            ValueError: On malformed text.
        """
        try:
            pieces = [p.split(":") for p in text.split(",") if p.strip()]
            return cls(tuple(float(lr) for lr, _ in pieces), tuple(int(e) for _, e in pieces))
        except (TypeError, ValueError) as err:
            raise ValueError(f"expected 'LR:EPOCHS,LR:EPOCHS,...', got {text!r} ({err})") from None

    def __str__(self) -> str:
        return ",".join(f"{lr:g}:{e}" for lr, e in zip(self.lrs, self.epochs))

    def to_dict(self) -> dict:
        """JSON form: ``{"lrs": [...], "epochs": [...]}``."""
        return {"lrs": list(self.lrs), "epochs": list(self.epochs)}

    @classmethod
    def from_dict(cls, d: dict) -> LRSchedule:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["lrs"]), tuple(d["epochs"]))


LR_SHAPES: tuple[str, ...] = ("step", "cosine")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")


def scheduled_lr(schedule: LRSchedule, epoch: int, *, shape: str = "step", warmup_epochs: int = 0) -> float:
    """Learning rate of 0-based ``epoch`` of a phase.

    ``"step"`` is the paper's piecewise-constant schedule (:meth:`LRSchedule.lr_at`). ``"cosine"`` decays
    from the phase's first rate to 0 over the phase's total epochs (per epoch, as torchvision's
    ``CosineAnnealingLR`` with ``eta_min=0`` after the warmup; the later pieces' rates are not used). A warmup of
    ``w`` epochs scales the first ``w`` epochs' rate by ``(epoch + 1) / (w + 1)`` (linear ramp), and cosine
    then spans the remaining ``total - w`` epochs.

    Args:
        schedule: The phase's schedule (its total epochs and rates).
        epoch: 0-based epoch in the phase.
        shape: ``"step"`` or ``"cosine"``.
        warmup_epochs: Linear-warmup epochs at the start of the phase (0: none).

    Returns:
        The rate.

    Example:
        >>> s = LRSchedule.parse("0.1:3,0.01:1")
        >>> [round(scheduled_lr(s, e, shape="cosine"), 4) for e in range(4)]
        [0.1, 0.0854, 0.05, 0.0146]
        >>> [round(scheduled_lr(s, e, warmup_epochs=1), 4) for e in range(4)]
        [0.05, 0.1, 0.1, 0.01]
    """
    if shape not in LR_SHAPES:
        raise ValueError(f"unknown lr schedule, got {shape!r}; choose one of {list(LR_SHAPES)}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
    if shape == "step":
        lr = schedule.lr_at(epoch)
    else:
        span = max(1, schedule.total_epochs - warmup_epochs)
        t = min(max(epoch - warmup_epochs, 0), span) / span
        lr = 0.5 * schedule.lrs[0] * (1.0 + math.cos(math.pi * t))
    if epoch < warmup_epochs:
        lr *= (epoch + 1) / (warmup_epochs + 1)
    return lr


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
    regularized: bool = False, optimizer: str = "sgd",
) -> torch.optim.Optimizer:
    """SGD with momentum as in the paper (or AdamW); weight decay is 0 whenever the OrthoReg regularizer is on.

    Build a new one after every pruning step (pruning replaces the parameters).

    Args:
        model: The model whose parameters are optimized.
        lr: Initial learning rate.
        momentum: SGD momentum (unused by AdamW, which keeps torch's betas).
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay; forced to 0 when ``regularized``.
        regularized: The OrthoReg regularizer is on.
        optimizer: ``"sgd"`` or ``"adamw"``.

    Returns:
        The optimizer.

    Example:
        >>> opt = build_optimizer(nn.Linear(2, 2), lr=0.1, regularized=True)
        >>> opt.param_groups[0]["weight_decay"]
        0.0
    """
    decay = 0.0 if regularized else weight_decay
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
    raise ValueError(f"unknown optimizer, got {optimizer!r}; choose one of {list(OPTIMIZERS)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    regularizer=None,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    progress: bool = True,
    desc: str = "train",
    label_smoothing: float = 0.0,
    teacher=None,
) -> dict[str, float]:
    """One epoch of cross-entropy training, with the OrthoReg gradient added after ``backward()`` if given.

    Args:
        model: The model (or its DDP wrapper), in any mode; it is put in train mode.
        loader: ``(inputs, targets)`` batches.
        optimizer: The optimizer over ``model``'s current parameters.
        device: Where batches go.
        regularizer: An :class:`~orthoreg_tp.OrthoRegularizer` (applied after backward), or ``None``.
        scaler: A ``GradScaler`` for AMP (unscaled before the regularizer touches ``.grad``).
        amp: float16 autocast (CUDA only).
        progress: Show a tqdm bar.
        desc: The bar's label.
        label_smoothing: Label smoothing of the cross-entropy (0: none).
        teacher: A :class:`~orthoreg_tp.engine.distill.Teacher`: the loss becomes its distillation loss.

    Returns:
        ``{"loss", "acc"}`` averaged over all samples of all ranks (accuracy in %).

    Example:
        >>> stats = train_one_epoch(model, loader, opt, device=torch.device("cpu"))  # doctest: +SKIP
    """
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            out = model(x)
            if teacher is not None:
                loss = teacher.loss(out, x, y, label_smoothing=label_smoothing)
            else:
                loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if regularizer is not None:
            regularizer.regularize(model)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        n = y.shape[0]
        totals += torch.tensor([loss.item() * n, (out.argmax(1) == y).sum().item(), n],
                               dtype=torch.float64, device=device)
    return _summarize(all_reduce_sum(totals))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device, amp: bool = False,
             progress: bool = False) -> dict[str, float]:
    """Test loss and accuracy (%) in eval mode, summed over ranks (use a non-padding sharded sampler).

    Example:
        >>> evaluate(model, test_loader, device=torch.device("cpu"))  # doctest: +SKIP
        {'loss': 0.12, 'acc': 96.4}
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y, reduction="sum")
        totals += torch.tensor([loss.item(), (out.argmax(1) == y).sum().item(), y.shape[0]],
                               dtype=torch.float64, device=device)
    model.train(was_training)
    return _summarize(all_reduce_sum(totals))


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, loader: Iterable, *, device: torch.device, batches: int = 20) -> int:
    """Re-estimate every batch-norm layer's running statistics on ``batches`` batches (no weight changes).

    After pruning, a layer's running mean and variance were measured on inputs it no longer gets; evaluated
    with stale statistics a pruned network can sit at chance even where its weights still hold the task (the
    "adaptive BN" step of EagleEye, Li et al. 2020). The statistics are reset and averaged over the batches
    (``momentum=None`` while it runs); the model's mode and momenta are restored.

    Args:
        model: The model (changed in place: running statistics only).
        loader: ``(inputs, targets)`` batches (training data, augmented or not).
        device: Where batches go.
        batches: How many batches to average (>= 1).

    Returns:
        The number of batch-norm layers re-estimated (0: the model has none, nothing ran).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> data = [(torch.randn(8, 1, 6, 6) + 3.0, torch.zeros(8))]
        >>> recalibrate_bn_(net, data, device=torch.device("cpu"), batches=1)
        1
        >>> bool(net[1].running_mean.abs().sum() > 0)
        True
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches!r}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(x.to(device, non_blocking=True))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def _summarize(totals: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc": 100.0 * correct / count}
