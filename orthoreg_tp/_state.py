"""Saving and restoring a model's train/eval modes and ``requires_grad`` flags: the one home of both.

Pruning replaces parameters (torch-pruning assigns new ``nn.Parameter`` objects), so flags that must survive a
prune are keyed by ``(module name, parameter name)`` (:func:`saved_grad_flags`); flags that only bracket a
forward pass are keyed by the parameter itself (:func:`requires_grad_all`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn

__all__ = ["eval_mode", "requires_grad_all", "restore_grad_flags", "saved_grad_flags"]


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, train: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval (or ``train``) mode inside the block; restore every module's own mode afterwards.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Dropout()); m[1].eval()
        Dropout(p=0.5, inplace=False)
        >>> with eval_mode(m):
        ...     m[0].training
        False
        >>> m[0].training, m[1].training
        (True, False)
    """
    modes = {m: m.training for m in model.modules()}
    if train:
        model.train()
    else:
        model.eval()  # not train(False): some wrappers (ultralytics' YOLO) override train() to start training
    try:
        yield model
    finally:
        for m in model.modules():
            if m in modes:
                m.training = modes[m]


@contextlib.contextmanager
def requires_grad_all(model: nn.Module) -> Iterator[nn.Module]:
    """Let every parameter of ``model`` require gradients inside the block (autograd tracing); restore after.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Linear(2, 2).requires_grad_(False)
        >>> with requires_grad_all(m):
        ...     m.weight.requires_grad
        True
        >>> m.weight.requires_grad
        False
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(True)
        yield model
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def saved_grad_flags(model: nn.Module) -> dict[tuple[str, str], bool]:
    """``{(module name, parameter name): requires_grad}``: flags that survive the parameters being replaced."""
    return {(n, k): p.requires_grad for n, m in model.named_modules() for k, p in m._parameters.items()
            if p is not None}


def restore_grad_flags(model: nn.Module, flags: dict[tuple[str, str], bool]) -> None:
    """Give the parameters now at each saved position the saved flag (see :func:`saved_grad_flags`).

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Linear(2, 2); m.bias.requires_grad_(False)
        Parameter containing:...
        >>> flags = saved_grad_flags(m); m.bias = nn.Parameter(m.bias.detach()[:1])
        >>> restore_grad_flags(m, flags); m.bias.requires_grad
        False
    """
    for n, m in model.named_modules():
        for k, p in m._parameters.items():
            if p is not None and (n, k) in flags:
                p.requires_grad_(flags[(n, k)])
