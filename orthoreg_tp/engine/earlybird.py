"""Early-bird ticket detection (You et al., ICLR 2020) on the pruning masks of any method.

Each epoch, the channels a pruning step *would* remove form a binary mask; when the normalized Hamming
distance between consecutive epochs' masks stays under ``threshold`` for ``patience`` consecutive epochs
(0.1 over 5 epochs in the paper), the ticket has emerged and training can stop early.

Example:
    >>> detector = EarlyBirdDetector(threshold=0.1, patience=2)
    >>> [detector.update({"conv": torch.tensor(m)}) for m in ([1, 0, 1], [1, 0, 1], [1, 0, 1])]
    [False, False, True]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import prune
from .pruning import round_config

Mask = dict[str, Tensor]


def pruning_mask(model: nn.Module, example_inputs: Tensor, importance: Any, *, ratio: float, seed: int = 0) -> Mask:
    """The keep-mask (``True`` = kept) of every ranked group's root layer under a dry-run pruning round.

    A dry run of the one pruning path (:func:`orthoreg_tp.adapters.prune` with ``dry_run=True``): the channels
    a round at ``ratio`` would remove, read from its history. The model is left unchanged (restored in place).

    Example:
        >>> mask = pruning_mask(model, x, importance, ratio=0.5)  # doctest: +SKIP
    """
    report = prune(model, example_inputs, importance=importance, config=round_config(ratio=ratio, seed=seed,
                                                                                      dry_run=True))
    mask: Mask = {name: torch.ones(width, dtype=torch.bool) for name, width in report.prunable_layers.items() if width}
    for name, is_out, idxs in report.history:
        if is_out and name in mask:
            mask[name][idxs] = False
    return mask


def mask_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Normalized Hamming distance: the fraction of mask entries (over all shared layers) that differ.

    Raises:
        ValueError: When the masks share no layer of equal width.

    Example:
        >>> mask_distance({"c": torch.tensor([1, 0, 1, 1])}, {"c": torch.tensor([1, 1, 1, 1])})
        0.25
    """
    differ = total = 0
    for name, m in a.items():
        if name in b and b[name].numel() == m.numel():
            differ += int((m.bool() != b[name].bool()).sum())
            total += m.numel()
    if total == 0:
        raise ValueError(f"masks share no layer of equal width, got layers {sorted(a)!r} and {sorted(b)!r}")
    return differ / total


class EarlyBirdDetector:
    """Fires once ``patience`` consecutive mask distances are all below ``threshold``.

    Args:
        threshold: Distance under which two consecutive masks count as equal (0.1 in You et al.).
        patience: How many consecutive small distances are needed (5 in You et al.).

    Example:
        >>> d = EarlyBirdDetector()
        >>> d.fired_epoch is None
        True
    """

    def __init__(self, *, threshold: float = 0.1, patience: int = 5):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience!r}")
        self.threshold = threshold
        self.patience = patience
        self.previous: Mask | None = None
        self.distances: list[float] = []
        self.fired_epoch: int | None = None

    def update(self, mask: Mapping[str, Tensor], epoch: int | None = None) -> bool:
        """Record this epoch's mask; return whether the early bird has been found (now or before).

        Args:
            mask: This epoch's keep-mask (:func:`pruning_mask`).
            epoch: The epoch number to report as the firing epoch (default: the number of masks seen - 1).
        """
        mask = {k: v.detach().bool().cpu() for k, v in mask.items()}
        if self.previous is not None:
            self.distances.append(mask_distance(self.previous, mask))
        self.previous = mask
        recent = self.distances[-self.patience:]
        if self.fired_epoch is None and len(recent) == self.patience and max(recent) < self.threshold:
            self.fired_epoch = len(self.distances) if epoch is None else epoch
        return self.fired_epoch is not None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a resume (tensors and plain values only)."""
        return {"threshold": self.threshold, "patience": self.patience, "previous": self.previous,
                "distances": list(self.distances), "fired_epoch": self.fired_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.threshold, self.patience = float(state["threshold"]), int(state["patience"])
        self.previous = None if state["previous"] is None else dict(state["previous"])
        self.distances = [float(d) for d in state["distances"]]
        self.fired_epoch = state["fired_epoch"]
