"""A framework-free way in: an optimizer step pre-hook that adds the OrthoReg gradient before every step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..regularizer import OrthoRegularizer

__all__ = ["OrthoRegHandle", "attach", "base_optimizer", "grad_scale_of", "regularize_scaled"]


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` behind a wrapper (accelerate's ``.optimizer``, Lightning's ``._optimizer``).

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
        >>> base_optimizer(opt) is opt
        True
    """
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or seen > 4:
            raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
        optimizer, seen = inner, seen + 1
    return optimizer


def grad_scale_of(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The factor the gradients are still multiplied by when ``optimizer.step()`` runs, or ``None`` (unscaled).

    ``GradScaler.step()`` unscales the gradients before it calls ``optimizer.step()``, except for optimizers with
    ``_step_supports_amp_scaling`` (``fused=True`` Adam/AdamW/SGD): those get the gradients still scaled and the
    scale as ``optimizer.grad_scale`` for the duration of the call (``None`` there when ``scaler.unscale_`` ran
    first, e.g. for clipping), and divide by it inside their kernel.

    Example:
        >>> grad_scale_of(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)) is None
        True
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    scale = getattr(optimizer, "grad_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


def regularize_scaled(regularizer: OrthoRegularizer, scale: torch.Tensor | float | None = None) -> None:
    """``regularizer.regularize()`` into gradients that are multiplied by ``scale`` (``None``: unscaled).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> regularize_scaled(OrthoRegularizer(model), scale=1024.0)
        >>> model[0].weight.grad.shape
        torch.Size([4, 4])
    """
    if scale is None:
        regularizer.regularize(regularizer.model)
        return
    base = regularizer.coefficient
    regularizer.coefficient = base * float(scale)  # the gradients are still scaled: add in the same units
    try:
        regularizer.regularize(regularizer.model)
    finally:
        regularizer.coefficient = base


class OrthoRegHandle:
    """What :func:`attach` returns: the regularizer it drives and ``remove()`` to stop.

    Attributes:
        regularizer: The :class:`~orthoreg_tp.OrthoRegularizer` (call ``regularizer.update()`` if modules of the
            model were replaced; pruning with torch-pruning keeps the modules, so it is not needed then).
        optimizer: The ``torch.optim.Optimizer`` the hook is registered on.
        steps: Optimizer steps the hook has seen.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, regularizer: OrthoRegularizer, scaler: Any) -> None:
        self.optimizer = optimizer
        self.regularizer = regularizer
        self.scaler = scaler
        self.steps = 0
        self._handle = optimizer.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.steps += 1
        scale = grad_scale_of(optimizer)
        if scale is None:
            self._check_not_scaled(optimizer)
        regularize_scaled(self.regularizer, scale)

    def _check_not_scaled(self, optimizer: torch.optim.Optimizer) -> None:
        enabled = self.scaler is not None and self.scaler.is_enabled()
        if enabled and getattr(optimizer, "_step_supports_amp_scaling", False) and not hasattr(optimizer, "grad_scale"):
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() was called directly while its GradScaler is enabled: "
                "call scaler.step(optimizer) (the gradients are still scaled)"
            )

    def remove(self) -> None:
        """Stop regularizing (the optimizer is left as it was before :func:`attach`)."""
        self._handle.remove()


def attach(
    optimizer: Any,
    model: nn.Module,
    *,
    coefficient: float = 1e-2,
    every: int = 1,
    scaler: torch.amp.GradScaler | None = None,
    **regularizer_options: Any,
) -> OrthoRegHandle:
    """Add the OrthoReg gradient to ``model``'s ``.grad`` right before every ``optimizer.step()``.

    Registers ``optimizer.register_step_pre_hook``, so it works in any loop that calls ``optimizer.step()``
    (a hand-written loop, timm's ``train.py``, accelerate) without touching the loop. The hook runs after
    everything the loop did between ``backward()`` and ``step()`` (gradient clipping included: the
    regularizer's gradient is not clipped). With a ``GradScaler`` it adds in the units the gradients are in:
    ``scaler.step()`` unscales before calling ``optimizer.step()``, so the plain gradient is added, except for
    optimizers that take the scale themselves (``fused=True``), whose gradients are still scaled and get
    ``scale * gradient`` (see :func:`grad_scale_of`). A step the scaler skips for inf/NaN gradients does not
    reach the hook (non-fused optimizers); a fused optimizer's skipped step still counts towards ``every``.

    Args:
        optimizer: The optimizer (or accelerate's / Lightning's wrapper of it). Rebuilding the optimizer
            (e.g. after pruning, unless its state is remapped in place) needs a new :func:`attach`.
        model: The model to regularize (the bare model, not a DDP wrapper).
        coefficient: ``lambda`` of the penalty (1e-2 in the paper for VGG/ResNet, 1e-3 for MobileNet).
        every: Apply the gradient on every ``every``-th step only, multiplied by ``every`` (the same average
            strength at ``1/every`` of the cost; :class:`~orthoreg_tp.OrthoRegularizer`'s ``every``).
        scaler: The ``GradScaler`` whose ``step()`` drives ``optimizer``, if any. Not needed for the arithmetic
            (the scale is read where torch hands it to the optimizer); given, a fused optimizer stepped outside
            ``scaler.step()`` with scaled gradients raises instead of adding in the wrong units.
        **regularizer_options: Keyword options of :class:`~orthoreg_tp.OrthoRegularizer` (``norm``,
            ``ignored_layers``, ``ignore_classifier``, ...).

    Returns:
        An :class:`OrthoRegHandle`; ``handle.remove()`` stops it.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = attach(opt, model, coefficient=1e-2)
        >>> model(torch.randn(2, 3, 8, 8)).sum().backward(); opt.step()  # the OrthoReg gradient went in
        >>> handle.steps
        1
        >>> handle.remove()
    """
    if scaler is not None and not hasattr(scaler, "is_enabled"):
        raise ValueError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    regularizer = OrthoRegularizer(model, coefficient, every=every, **regularizer_options)
    return OrthoRegHandle(base_optimizer(optimizer), regularizer, scaler)
