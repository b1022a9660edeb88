"""Training and evaluation loops, the paper's piecewise-constant learning rate, and optimizer building.

Example:
    >>> sched = LRSchedule.parse("0.1:80,0.01:40,0.001:40")   # the paper's base training
    >>> sched.total_epochs, sched.lr_at(100)
    (160, 0.01)
"""

from __future__ import annotations

import contextlib
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


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
    regularized: bool = False,
) -> torch.optim.SGD:
    """SGD as in the paper; weight decay is 0 whenever the OrthoReg regularizer is on.

    Build a new one after every pruning step (pruning replaces the parameters).

    Example:
        >>> opt = build_optimizer(nn.Linear(2, 2), lr=0.1, regularized=True)
        >>> opt.param_groups[0]["weight_decay"]
        0.0
    """
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                           weight_decay=0.0 if regularized else weight_decay)


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
            loss = F.cross_entropy(out, y)
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


def _summarize(totals: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc": 100.0 * correct / count}
