"""The paper's baseline criteria that torch-pruning lacks, on the same accumulation machinery.

L1, L2, BN-scale, Taylor and random come from torch-pruning (``tp.importance.MagnitudeImportance(p=1|2)``,
``BNScaleImportance``, ``TaylorImportance``, ``RandomImportance``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .accumulate import ParamStatistics
from .importance import AccumulatingImportance, LossFn, OrthoRegImportance, default_loss

NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class TFOImportance(OrthoRegImportance):
    """Molchanov's Taylor first-order score on normalization scales: ``(sum gamma * g_bar_gamma)^2``.

    Only norm-layer scales (BatchNorm, GroupNorm, LayerNorm) of the group count; groups without one score
    ``None`` (torch-pruning then leaves them alone).

    Example:
        >>> imp = TFOImportance(); imp.accumulate(model, loader, num_samples=10_000)  # doctest: +SKIP
    """

    def _keep_slice(self, dep: Any, param: Tensor) -> bool:
        return isinstance(dep.layer, NORM_LAYERS) and param is getattr(dep.layer, "weight", None)


class GraSPImportance(AccumulatingImportance):
    """GraSP (Wang et al., 2020) per channel: ``sum theta * (H g)`` over the channel's slices, higher = keep.

    ``g`` is the dataset-averaged gradient of the loss on ``logits / temperature`` and ``H g`` its
    Hessian-gradient product by double backprop (two passes over the data, so ``data`` must be re-iterable).

    Args:
        temperature: Logit temperature ``T`` (200 in the authors' code).
        **kwargs: See :class:`~orthoreg_tp.importance.AccumulatingImportance`.

    Example:
        >>> imp = GraSPImportance(); imp.accumulate(model, loader, num_samples=1_000)  # doctest: +SKIP
    """

    statistic = "Hessian-gradient product"

    def __init__(self, *, temperature: float = 200.0, **kwargs: Any) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        super().__init__(**kwargs)
        self.temperature = float(temperature)
        self._grad_pass: ParamStatistics | None = None

    def _tempered(self, loss_fn: LossFn) -> LossFn:
        def tempered(output: Any, target: Tensor) -> Tensor:
            if isinstance(output, tuple | list):
                output = output[0]
            return loss_fn(output / self.temperature, target)

        return tempered

    def accumulate(
        self,
        model: nn.Module,
        data: Iterable,
        num_samples: int = 10_000,
        *,
        loss_fn: LossFn = default_loss,
        progress: bool = True,
    ) -> int:
        """Two passes: the averaged tempered gradient ``g``, then ``H g`` (see :class:`AccumulatingImportance`)."""
        grad_pass = OrthoRegImportance()
        grad_pass.accumulate(model, data, num_samples, loss_fn=self._tempered(loss_fn), progress=progress)
        grad_pass.all_reduce()  # under DDP, H g must use the global gradient (no-op otherwise)
        self._grad_pass = grad_pass.stats
        try:
            return super().accumulate(model, data, num_samples, loss_fn=self._tempered(loss_fn), progress=progress)
        finally:
            self._grad_pass = None

    def _batch_statistics(
        self, model: nn.Module, params: list[tuple[str, nn.Parameter]], x: Any, y: Tensor, loss_fn: LossFn
    ) -> list[Tensor | None]:
        assert self._grad_pass is not None
        tensors = [p for _, p in params]
        g_bar = [self._grad_pass.mean(p) for p in tensors]
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
            z = sum((g * gb).sum() for g, gb in zip(grads, g_bar) if g is not None and gb is not None)
            if not isinstance(z, Tensor) or not z.requires_grad:
                return [None] * len(tensors)
            hg = torch.autograd.grad(z, tensors, allow_unused=True)
        return [None if h is None else h.detach() for h in hg]


class RDTImportance(AccumulatingImportance):
    """Diagonal true-Fisher score: ``sum F_pp`` over the channel's slices, higher = keep.

    ``F_pp = E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta_p)^2]``, with labels sampled from the model's own
    predictive distribution and per-sample gradients (``torch.func``, falling back to a per-sample loop).

    Args:
        seed: Seed of the label sampler (reproducible scores).
        **kwargs: See :class:`~orthoreg_tp.importance.AccumulatingImportance`.

    Example:
        >>> imp = RDTImportance(); imp.accumulate(model, loader, num_samples=1_000)  # doctest: +SKIP
    """

    statistic = "squared per-sample gradient"

    def __init__(self, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    def _elementwise(self, param: Tensor, stat: Tensor) -> Tensor:
        return stat

    def accumulate(self, model: nn.Module, data: Iterable, num_samples: int = 10_000, **kwargs: Any) -> int:
        """See :meth:`AccumulatingImportance.accumulate`; the labels are sampled, ``data``'s targets unused."""
        self._generator = torch.Generator().manual_seed(self.seed)
        return super().accumulate(model, data, num_samples, **kwargs)

    def _batch_statistics(
        self, model: nn.Module, params: list[tuple[str, nn.Parameter]], x: Any, y: Tensor, loss_fn: LossFn
    ) -> list[Tensor | None]:
        with torch.no_grad():
            logits = model(x)
            if isinstance(logits, tuple | list):
                logits = logits[0]
            probs = F.softmax(logits.float(), dim=1).cpu()
            sampled = torch.multinomial(probs, 1, generator=self._generator).squeeze(1).to(logits.device)
        try:
            return self._vmapped(model, params, x, sampled)
        except Exception:  # noqa: BLE001 - models that torch.func cannot trace fall back to a loop
            return self._looped(model, params, x, sampled)

    @staticmethod
    def _vmapped(model: nn.Module, params: list[tuple[str, nn.Parameter]], x: Tensor, y: Tensor) -> list[Tensor | None]:
        from torch.func import functional_call, grad, vmap

        names = [n for n, _ in params]
        detached = {n: p.detach() for n, p in params}
        buffers = dict(model.named_buffers())

        def nll(ps: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            out = functional_call(model, (ps, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0))

        per_sample = vmap(grad(nll), in_dims=(None, 0, 0), chunk_size=16)(detached, x, y)
        return [per_sample[n].pow(2).mean(0) for n in names]

    @staticmethod
    def _looped(model: nn.Module, params: list[tuple[str, nn.Parameter]], x: Tensor, y: Tensor) -> list[Tensor | None]:
        tensors = [p for _, p in params]
        sums: list[Tensor | None] = [None] * len(tensors)
        for i in range(y.shape[0]):
            out = model(x[i : i + 1])
            if isinstance(out, tuple | list):
                out = out[0]
            grads = torch.autograd.grad(F.cross_entropy(out, y[i : i + 1]), tensors, allow_unused=True)
            for j, g in enumerate(grads):
                if g is not None:
                    sums[j] = g.pow(2) if sums[j] is None else sums[j] + g.pow(2)
        return [None if t is None else t / y.shape[0] for t in sums]
