"""The pruning methods of the recipes: ``--method`` name -> importance, data it needs, regularizer or not.

Every method ranks channels of all layers together (raw scores, no per-layer normalization, as the paper
ranks them) and keeps at least ``int(0.05 * original_width) + 1`` channels per layer (:class:`FloorImportance`).

Example:
    >>> m = get_method("orthoreg")
    >>> m.regularized, m.needs
    (True, 'accumulate')
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from ..baselines import GraSPImportance, RDTImportance, TFOImportance
from ..floor import DEFAULT_MIN_KEEP_RATIO, FloorImportance
from ..importance import FisherImportance, OrthoRegImportance
from .distributed import all_reduce_grads_

logger = logging.getLogger(__name__)

Needs = Literal["accumulate", "grad", "none"]


@dataclass(frozen=True)
class Method:
    """A pruning method of the paper's comparison.

    Attributes:
        name: The ``--method`` name.
        regularized: Train with the OrthoReg regularizer before each importance estimate.
        needs: ``"accumulate"``: the importance averages statistics over data (``imp.accumulate``);
            ``"grad"``: torch-pruning reads a dataset gradient from ``.grad``; ``"none"``: weights only.
        description: One line for ``--help`` and the README.
        factory: ``factory(seed) -> importance`` (floors are added by :func:`build_importance`).
    """

    name: str
    regularized: bool
    needs: Needs
    description: str
    factory: Callable[[int], Any]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("orthoreg", True, "accumulate", "OrthoReg: regularized training + Fisher group score",
           lambda seed: OrthoRegImportance(min_keep_ratio=None)),
    Method("fisher", False, "accumulate", "Fisher score (sum theta*g_bar)^2 without the regularizer",
           lambda seed: FisherImportance(min_keep_ratio=None)),
    Method("bn", False, "none", "BN scale |gamma| (network slimming / Early-Bird)",
           lambda seed: tp.importance.BNScaleImportance(normalizer=None)),
    Method("tfo", False, "accumulate", "Taylor first order on BN: (gamma * g_bar_gamma)^2",
           lambda seed: TFOImportance(min_keep_ratio=None)),
    Method("l1", False, "none", "filter L1 norm (Li et al.)",
           lambda seed: tp.importance.MagnitudeImportance(p=1, normalizer=None)),
    Method("l2", False, "none", "filter L2 norm (SFP-style)",
           lambda seed: tp.importance.MagnitudeImportance(p=2, normalizer=None)),
    Method("grasp", False, "accumulate", "GraSP: theta * (H g), logits / 200",
           lambda seed: GraSPImportance(min_keep_ratio=None)),
    Method("rdt", False, "accumulate", "diagonal true-Fisher sum",
           lambda seed: RDTImportance(seed=seed, min_keep_ratio=None)),
    Method("taylor", False, "grad", "torch-pruning Taylor |theta * g| on a dataset gradient",
           lambda seed: tp.importance.TaylorImportance(normalizer=None)),
    Method("random", False, "none", "random scores (seeded)",
           lambda seed: tp.importance.RandomImportance()),
)}


def get_method(name: str) -> Method:
    """Look up a method by ``--method`` name.

    Raises:
        ValueError: For an unknown name, listing the known ones.

    Example:
        >>> get_method("l1").needs
        'none'
    """
    if name not in METHODS:
        raise ValueError(f"unknown method, got {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_importance(method: Method, initial_widths: Mapping[str, int], *, seed: int = 0,
                     min_keep_ratio: float = DEFAULT_MIN_KEEP_RATIO, normalizer: str | None = None) -> FloorImportance:
    """The method's importance behind the per-layer floor (scores normalized per layer if ``normalizer``).

    Example:
        >>> imp = build_importance(get_method("l2"), {"features.0": 16}, normalizer="mean")
    """
    return FloorImportance(method.factory(seed), initial_widths, min_keep_ratio=min_keep_ratio,
                           normalizer=normalizer)


def feed_importance_(method: Method, importance: Any, model: nn.Module, data: Iterable, *, num_samples: int,
                     world_size: int = 1, progress: bool = True) -> None:
    """Give an importance the data it needs, identically on every rank.

    ``"accumulate"`` methods average their statistic over ``num_samples`` samples (split across ranks, then
    all-reduced); ``"grad"`` methods get the dataset-averaged gradient in ``.grad`` (all-reduced).

    Args:
        method: The method.
        importance: Its importance (from :func:`build_importance`, or unwrapped).
        model: The bare model (never the DDP wrapper).
        data: ``(inputs, targets)`` batches of this rank's shard.
        num_samples: Samples over all ranks (10,000 in the paper).
        world_size: Number of ranks.
        progress: Show a progress bar.

    Example:
        >>> feed_importance_(get_method("orthoreg"), imp, model, loader, num_samples=10_000)  # doctest: +SKIP
    """
    local = max(1, num_samples // world_size)
    if method.needs == "accumulate":
        inner = getattr(importance, "inner", importance)
        inner.reset()
        inner.accumulate(model, data, local, progress=progress)
        inner.all_reduce()
    elif method.needs == "grad":
        _dataset_gradient_(model, data, local, world_size=world_size, progress=progress)


def _dataset_gradient_(model: nn.Module, data: Iterable, num_samples: int, *, world_size: int,
                       progress: bool) -> None:
    """Leave the gradient of the mean loss over ``num_samples`` samples (per rank) in ``.grad``, eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    seen = 0
    with tqdm(total=num_samples, desc="gradient", unit="sample", leave=False, disable=not progress) as bar:
        for x, y in data:
            take = min(y.shape[0], num_samples - seen)
            x, y = x[:take].to(device), y[:take].to(device)
            loss = F.cross_entropy(model(x), y, reduction="sum") / (num_samples * world_size)
            loss.backward()
            seen += take
            bar.update(take)
            if seen >= num_samples:
                break
    model.train(was_training)
    if seen < num_samples:  # fewer samples than asked: rescale to a mean over what was seen
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(num_samples / max(seen, 1))
    all_reduce_grads_(model)
