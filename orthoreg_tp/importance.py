"""OrthoReg's group importance: the Fisher loss-preservation score with a dataset-averaged gradient.

``I_c = (sum over every parameter entry removed with channel c of theta * g_bar)^2`` (docs/method.md, section 3),
where ``g_bar`` is the gradient of the mean loss averaged over the data (accumulated by the importance object
itself, never read from whatever happens to be in ``.grad`` at pruning time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _compat
from .accumulate import ParamStatistics, batch_size_of, model_device, to_device, trainable_params
from .floor import DEFAULT_MIN_KEEP_RATIO, LayerFloor
from .grouping import iter_group, scatter_channel_sums

logger = logging.getLogger(__name__)

Scope = Literal["group", "filter"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def default_loss(output: Any, target: Tensor) -> Tensor:
    """Mean cross-entropy on a model output (the first element if the model returns a tuple or list)."""
    if isinstance(output, tuple | list):
        output = output[0]
    return F.cross_entropy(output, target)


class AccumulatingImportance(tp.importance.Importance):
    """Base class for importances computed from dataset-averaged per-parameter statistics.

    Subclasses choose the statistic (:meth:`_batch_statistics`), how a parameter and its statistic combine
    element-wise (:meth:`_elementwise`), which slices count (:meth:`_keep_slice`), and how the per-channel
    sums become scores (:meth:`_finalize`). Scores of every group item are summed onto the group's root
    channels, so one score is returned per channel of the group.

    Args:
        scope: ``"group"`` sums over every parameter slice removed with a channel (producer weights and
            bias, norm affine parameters, consumer input slices); ``"filter"`` keeps only conv/linear output
            filters and their bias, as the authors' code did.
        normalizer: ``None`` (raw scores; comparable across layers, as the paper ranks them) or one of
            torch-pruning's normalizers (``"mean"``, ``"max"``, ``"sum"``, ``"lamp"``, ...).
        min_keep_ratio: The paper's per-layer floor: each group keeps at least
            ``int(min_keep_ratio * initial_width) + 1`` channels (they score ``PROTECTED_SCORE``, 1e30: finite, above
            every real score); ``None`` disables it.
            Layers are never emptied, so torch-pruning does not silently drop whole groups and the achieved
            global ratio matches the requested one.
        initial_widths: ``{layer name: original width}`` for the floor (default: each layer's width the first
            time this importance scores it); pass the dense model's :func:`~orthoreg_tp.layer_widths` when a new
            importance object scores an already pruned model.
    """

    statistic = "gradient"

    def __init__(
        self,
        *,
        scope: Scope = "group",
        normalizer: Any = None,
        min_keep_ratio: float | None = DEFAULT_MIN_KEEP_RATIO,
        initial_widths: Mapping[str, int] | None = None,
    ) -> None:
        if scope not in ("group", "filter"):
            raise ValueError(f"scope must be 'group' or 'filter', got {scope!r}")
        if min_keep_ratio is not None and not 0.0 <= min_keep_ratio < 1.0:
            raise ValueError(f"min_keep_ratio must be in [0, 1) or None, got {min_keep_ratio!r}")
        self.scope = scope
        self.normalizer = normalizer
        self.min_keep_ratio = min_keep_ratio
        self.floor = None if min_keep_ratio is None else LayerFloor(min_keep_ratio, initial_widths)
        self.stats = ParamStatistics()

    # ------------------------------------------------------------------ accumulation
    def reset(self) -> None:
        """Forget all accumulated statistics (the per-layer initial widths are kept)."""
        self.stats.clear()

    def all_reduce(self) -> None:
        """Sum the accumulated statistics over ``torch.distributed`` ranks so every rank prunes identically."""
        self.stats.all_reduce()

    @property
    def num_samples(self) -> int:
        """Largest number of samples any parameter's statistic averages over."""
        return max((e[2] for e in self.stats._entries.values()), default=0)

    def accumulate(
        self,
        model: nn.Module,
        data: Iterable,
        num_samples: int = 10_000,
        *,
        loss_fn: LossFn = default_loss,
        progress: bool = True,
    ) -> int:
        """Accumulate the statistic over (up to) ``num_samples`` samples, with the model in eval mode.

        Args:
            model: The bare model (not a DDP wrapper; call :meth:`all_reduce` afterwards on every rank).
            data: Iterable of ``(inputs, targets)`` batches; batches are moved to the model's device.
            num_samples: Samples to use; the last batch is truncated to hit it exactly.
            loss_fn: ``loss_fn(output, target) -> mean loss``.
            progress: Show a tqdm progress bar.

        Returns:
            The number of samples used.

        Example:
            >>> imp = OrthoRegImportance()
            >>> imp.accumulate(model, loader, num_samples=10_000)  # doctest: +SKIP
        """
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples!r}")
        params = trainable_params(model)
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to accumulate gradients for")
        device = model_device(model)
        was_training = model.training
        model.eval()
        seen = 0
        try:
            with tqdm(
                total=num_samples,
                desc=f"{type(self).__name__}: {self.statistic}",
                unit="sample",
                disable=not progress,
                leave=False,
            ) as bar:
                for batch in data:
                    x, y = batch[0], batch[1]
                    take = min(batch_size_of(x), num_samples - seen)
                    x = to_device(x, device)
                    y = y.to(device)
                    if take < batch_size_of(x):
                        x = x[:take] if isinstance(x, Tensor) else [t[:take] for t in x]
                        y = y[:take]
                    means = list(self._batch_statistics(model, params, x, y, loss_fn))
                    for i, (name, p) in enumerate(params):
                        s, means[i] = means[i], None  # the first batch's tensors become the running sums
                        if s is not None:
                            self._add(name, p, s, take, owned=True)
                        del s
                    del means
                    seen += take
                    bar.update(take)
                    if seen >= num_samples:
                        break
        finally:
            model.train(was_training)
        if seen == 0:
            raise ValueError("data yielded no samples to accumulate over")
        logger.debug("%s accumulated over %d samples", type(self).__name__, seen)
        return seen

    def accumulate_grad(self, model: nn.Module, num_samples: int = 1, *, consume: bool = False) -> None:
        """Accumulate the gradients currently in ``.grad`` (call after your own ``loss.backward()``).

        Args:
            model: The model whose ``.grad`` holds the gradient of a *mean* loss over a batch.
            num_samples: The batch size behind that mean (its weight in the dataset average).
            consume: Take the ``.grad`` tensors over and set ``.grad`` to ``None``: a parameter's first gradient
                becomes its running sum without a copy (for a dedicated importance pass; by default ``.grad``
                is read and left unchanged).

        Example:
            >>> loss.backward(); imp.accumulate_grad(model, num_samples=x.shape[0])  # doctest: +SKIP
        """
        if self.statistic != "gradient":
            raise NotImplementedError(
                f"{type(self).__name__} needs its own passes over the data ({self.statistic}); use accumulate()"
            )
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples!r}")
        found = False
        for name, p in trainable_params(model):
            if p.grad is not None:
                self._add(name, p, p.grad, num_samples, owned=consume)
                if consume:
                    p.grad = None
                found = True
        if not found:
            raise RuntimeError("accumulate_grad found no .grad on the model; call loss.backward() first")

    def _add(self, name: str, param: Tensor, batch_mean: Tensor, num_samples: int, *, owned: bool = False) -> None:
        try:
            self.stats.add(param, batch_mean, num_samples, owned=owned)
        except RuntimeError as err:
            raise RuntimeError(f"{type(self).__name__}: parameter {name!r}: {err}") from None

    def _batch_statistics(
        self, model: nn.Module, params: list[tuple[str, nn.Parameter]], x: Any, y: Tensor, loss_fn: LossFn
    ) -> list[Tensor | None]:
        """Per-parameter batch means of the statistic (default: the gradient of the mean loss).

        The returned list and tensors belong to the caller, which modifies them in place (the first batch's
        tensors become the running sums), so never return tensors that live on (such as ``p.grad``).
        """
        loss = loss_fn(model(x), y)
        return list(torch.autograd.grad(loss, [p for _, p in params], allow_unused=True))

    # ------------------------------------------------------------------ scoring
    def _elementwise(self, param: Tensor, stat: Tensor) -> Tensor:
        return param.detach().to(stat.dtype) * stat

    def _keep_slice(self, dep: Any, param: Tensor) -> bool:
        return True

    def _finalize(self, sums: Tensor) -> Tensor:
        return sums

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        """One score per channel of the group (higher = keep), or ``None`` if nothing in it is scored."""
        if len(self.stats) == 0:
            raise RuntimeError(
                f"{type(self).__name__} has no accumulated {self.statistic}s: call imp.accumulate(model, data) "
                "(or imp.accumulate_grad(model) after each backward) before pruning"
            )
        width = len(group[0].idxs)
        scores: Tensor | None = None
        for dep, layer_idxs, root_idxs, param, per_channel in iter_group(group, producers_only=self.scope == "filter"):
            if not param.requires_grad or not self._keep_slice(dep, param):
                continue
            stat = self.stats.mean(param)
            if stat is None:
                raise RuntimeError(
                    f"{type(self).__name__}: no accumulated {self.statistic} for a parameter of "
                    f"{_compat.layer_name(group, dep.layer)!r} with shape {tuple(param.shape)} (the model was "
                    "probably pruned since the last accumulation): call imp.reset() and accumulate again"
                )
            sums = per_channel(self._elementwise(param, stat))
            if scores is None:
                scores = torch.zeros(width, dtype=torch.float32, device=sums.device)
            scatter_channel_sums(scores, sums, layer_idxs, root_idxs, where=_compat.layer_name(group, dep.layer))
        if scores is None:
            return None
        scores = _compat.normalize_scores(self._finalize(scores), self.normalizer)
        return scores if self.floor is None else self.floor(group, scores)



class OrthoRegImportance(AccumulatingImportance):
    """OrthoReg's Fisher group score ``(sum theta * g_bar)^2`` over every slice removed with a channel.

    A ``tp.importance.Importance``: pass it to any torch-pruning pruner. Higher = keep. Accumulate the
    dataset-averaged gradient first (:meth:`accumulate` or :meth:`accumulate_grad`).

    Args:
        scope: ``"group"`` (default) or ``"filter"`` (producer conv/linear filters and bias only).
        normalizer: ``None`` (default, raw scores as in the paper) or a torch-pruning normalizer name.
        min_keep_ratio: Per-layer floor, keep ``int(0.05 * initial_width) + 1`` channels by default.

    Example:
        >>> imp = OrthoRegImportance()
        >>> imp.accumulate(model, loader, num_samples=10_000)  # doctest: +SKIP
        >>> pruner = tp.pruner.MetaPruner(model, x, importance=imp, global_pruning=True,
        ...                               pruning_ratio=0.5, ignored_layers=[model.fc])  # doctest: +SKIP
        >>> pruner.step()  # doctest: +SKIP
    """

    def _finalize(self, sums: Tensor) -> Tensor:
        return sums.pow(2)


class FisherImportance(OrthoRegImportance):
    """The same Fisher criterion, named for the unregularized baseline (a model trained without OrthoReg)."""
