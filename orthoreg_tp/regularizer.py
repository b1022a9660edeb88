"""The OrthoReg regularizer: ``lambda * sum_l alpha_l * ||G_l - I||`` over conv and linear layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from .functional import (
    NORMS,
    Norm,
    block_width,
    filter_matrix,
    filter_matrix_shape,
    ortho_grad,
    ortho_penalty,
    sqrt_width_weights,
)

FilterFn = Callable[[nn.Module, str], bool]
REGULARIZABLE = (nn.modules.conv._ConvNd, nn.Linear)


def find_classifier(model: nn.Module) -> nn.Module | None:
    """The model's classifier: ``model.get_classifier()`` when it has one (timm), else its last ``nn.Linear``.

    Example:
        >>> find_classifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
        Linear(in_features=4, out_features=2, bias=True)
    """
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - a model's own helper may not apply; fall back to structure
            head = None
        if isinstance(head, nn.Module) and any(isinstance(m, REGULARIZABLE) for m in head.modules()):
            return head
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def _layer_parts(module: nn.Module, include_bias: bool) -> tuple[Tensor, Tensor | None, int, bool]:
    bias = module.bias if include_bias and module.bias is not None else None
    groups = getattr(module, "groups", 1)
    transposed = bool(getattr(module, "transposed", False))
    return module.weight, bias, groups, transposed


def _blocks_shape(module: nn.Module, include_bias: bool) -> tuple[int, int, int]:
    weight, bias, groups, transposed = _layer_parts(module, include_bias)
    return filter_matrix_shape(weight.shape, has_bias=bias is not None, groups=groups, transposed=transposed)


class OrthoRegularizer:
    """Pushes each layer's filters towards orthonormality (docs/method.md, section 2).

    Layer shapes are read live on every call, so the regularizer keeps working after torch-pruning shrinks the
    model; call :meth:`update` only if modules were added or replaced.

    Args:
        model: The model to regularize.
        coefficient: ``lambda`` (1e-2 for VGG-13/ResNet-34, 1e-3 for MobileNet-V1 in the paper).
        ignored_layers: Modules (and all their submodules) not to regularize.
        filter_fn: ``filter_fn(module, name) -> bool``; only layers for which it returns ``True`` are kept.
        ignore_classifier: Skip the classifier (:func:`find_classifier`), as the paper does.
        norm: ``"l1"`` (entrywise, the paper) or ``"fro"`` (squared Frobenius).
        include_bias: Append each layer's bias as one more column of its filter matrix.
        layer_weights: ``"sqrt"`` (``alpha_l = sqrt(d_l) / sum sqrt(d_m)``, the paper), ``"uniform"``, or a
            mapping from layer name to weight (layers not in it get 0).
        every: Lazy regularization for :meth:`regularize`: apply the gradient on every ``every``-th call only,
            scaled by ``every`` (same average strength, ``1/every`` of the cost; 1 = every step, the paper).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> reg = OrthoRegularizer(model, coefficient=1e-2)
        >>> loss = reg.penalty()  # add to the task loss, or after backward(): reg.regularize(model)
    """

    def __init__(
        self,
        model: nn.Module,
        coefficient: float = 1e-2,
        *,
        ignored_layers: Iterable[nn.Module] | None = None,
        filter_fn: FilterFn | None = None,
        ignore_classifier: bool = True,
        norm: Norm = "l1",
        include_bias: bool = True,
        layer_weights: Literal["sqrt", "uniform"] | Mapping[str, float] = "sqrt",
        every: int = 1,
    ) -> None:
        if not float(coefficient) >= 0.0:
            raise ValueError(f"coefficient must be a non-negative number, got {coefficient!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if isinstance(layer_weights, str) and layer_weights not in ("sqrt", "uniform"):
            raise ValueError(f"layer_weights must be 'sqrt', 'uniform' or a mapping, got {layer_weights!r}")
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.model = model
        self.every = int(every)
        self._calls = 0
        self.coefficient = float(coefficient)
        self.norm = norm
        self.include_bias = include_bias
        self.layer_weights = layer_weights
        self.filter_fn = filter_fn
        self.ignore_classifier = ignore_classifier
        self._ignored = list(ignored_layers or [])
        self.layers: list[tuple[str, nn.Module]] = []
        self.update()

    def update(self) -> None:
        """Re-select the regularized layers from the model (after modules were added or replaced)."""
        skip = {id(m) for layer in self._ignored for m in layer.modules()}
        if self.ignore_classifier:
            head = find_classifier(self.model)
            if head is not None:
                skip.update(id(m) for m in head.modules())
        layers = []
        for name, m in self.model.named_modules():
            if not isinstance(m, REGULARIZABLE) or id(m) in skip:
                continue
            if isinstance(m.weight, nn.parameter.UninitializedParameter) or not m.weight.requires_grad:
                continue
            if self.filter_fn is not None and not self.filter_fn(m, name):
                continue
            layers.append((name, m))
        if not layers:
            raise ValueError(
                f"OrthoRegularizer found no conv/linear layer to regularize in {type(self.model).__name__} "
                "(after ignored_layers, filter_fn and the classifier were excluded)"
            )
        self.layers = layers

    def _blocks(self, module: nn.Module, detach: bool) -> Tensor:
        weight, bias, groups, transposed = _layer_parts(module, self.include_bias)
        if detach:
            weight = weight.detach()
            bias = None if bias is None else bias.detach()
        return filter_matrix(weight, bias, groups=groups, transposed=transposed)

    def weights(self) -> dict[str, float]:
        """The current ``alpha_l`` of every regularized layer (from the live layer shapes)."""
        names = [n for n, _ in self.layers]
        if isinstance(self.layer_weights, Mapping):
            return {n: float(self.layer_weights.get(n, 0.0)) for n in names}
        if self.layer_weights == "uniform":
            return {n: 1.0 / len(names) for n in names}
        widths = [block_width(_blocks_shape(m, self.include_bias)) for _, m in self.layers]
        return dict(zip(names, sqrt_width_weights(widths)))

    def penalty(self) -> Tensor:
        """``coefficient * sum_l alpha_l ||G_l - I||`` as a differentiable scalar (add it to the loss)."""
        alphas = self.weights()
        total = None
        for name, m in self.layers:
            term = alphas[name] * ortho_penalty(self._blocks(m, detach=False), self.norm)
            total = term if total is None else total + term
        return self.coefficient * total

    @torch.no_grad()
    def layer_penalties(self) -> dict[str, float]:
        """Unweighted ``||G_l - I||`` of every regularized layer."""
        return {n: float(ortho_penalty(self._blocks(m, detach=True), self.norm)) for n, m in self.layers}

    @torch.no_grad()
    def regularize(self, model: nn.Module | None = None) -> None:
        """Add ``coefficient * d penalty / d W`` to every regularized parameter's ``.grad``, in place.

        Call between ``loss.backward()`` and ``optimizer.step()`` (under AMP, after
        ``scaler.unscale_(optimizer)``). Equals autograd's gradient of :meth:`penalty` without building a graph,
        for two matrix products per layer (its Gram, symmetric, and the gradient, accumulated straight into
        ``.grad``) and no copy of the weights (:func:`~orthoreg_tp.functional.ortho_grad`).

        Args:
            model: Accepted for torch-pruning's ``regularize(model)`` convention (the model or its DDP
                wrapper); the layers chosen at construction (or the last :meth:`update`) are regularized.
        """
        if model is not None and model is not self.model and getattr(model, "module", None) is not self.model:
            raise ValueError("regularize() got a different model than the one this regularizer was built for")
        self._calls += 1
        if self.coefficient == 0.0 or (self._calls - 1) % self.every:
            return
        scale = self.coefficient * self.every
        alphas = self.weights()
        for name, m in self.layers:
            weight, bias, groups, transposed = _layer_parts(m, self.include_bias)
            gw, gb = ortho_grad(
                weight.detach(), None if bias is None else bias.detach(), groups=groups, transposed=transposed,
                norm=self.norm, scale=scale * alphas[name], add_to=(weight.grad, None if bias is None else bias.grad),
            )
            if weight.grad is None:
                weight.grad = gw
            if bias is not None and bias.grad is None:
                bias.grad = gb
