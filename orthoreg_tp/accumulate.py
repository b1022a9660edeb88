"""Dataset-averaged per-parameter statistics (gradients, squared gradients, ...), keyed by parameter.

torch-pruning replaces ``nn.Parameter`` objects when it prunes, so statistics are keyed by the parameter
object itself (through a weak reference): after pruning, the new parameters simply have no statistics and the
old entries disappear with the old parameters. Nothing is ever looked up by a stale shape.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn


class ParamStatistics:
    """Running sums of a per-parameter statistic and the number of samples behind each.

    Example:
        >>> p = nn.Parameter(torch.zeros(3))
        >>> stats = ParamStatistics()
        >>> stats.add(p, torch.ones(3), num_samples=4)
        >>> stats.mean(p)
        tensor([1., 1., 1.])
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Tensor, int]] = {}

    def __len__(self) -> int:
        self._drop_dead()
        return len(self._entries)

    def _drop_dead(self) -> None:
        dead = [k for k, (ref, _, _) in self._entries.items() if ref() is None]
        for k in dead:
            del self._entries[k]

    def _lookup(self, param: Tensor) -> tuple[weakref.ref, Tensor, int] | None:
        entry = self._entries.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry

    def add(self, param: Tensor, batch_mean: Tensor, num_samples: int, *, owned: bool = False) -> None:
        """Add a statistic averaged over ``num_samples`` samples (accumulated in place, no temporary copy).

        Args:
            param: The parameter the statistic belongs to (the key).
            batch_mean: The statistic's mean over the batch, shaped like ``param``.
            num_samples: The batch size behind the mean (its weight).
            owned: ``batch_mean`` is a temporary nobody else reads: a parameter's first statistic becomes the
                running sum in place instead of a copy (the first batch then costs no extra memory).
        """
        if not torch.isfinite(batch_mean).all():
            raise RuntimeError(
                f"non-finite values in the accumulated statistic of a parameter of shape {tuple(param.shape)}; "
                "check the loss and the inputs (NaN/inf gradients)"
            )
        entry = self._lookup(param)
        value = batch_mean.detach()
        if entry is None or entry[1].shape != value.shape:
            if owned and value.dtype == torch.float32:
                total = value.mul_(num_samples)
            else:
                total = value.to(torch.float32) * num_samples
            self._entries[id(param)] = (weakref.ref(param), total, int(num_samples))
        else:
            entry[1].add_(value, alpha=num_samples)
            self._entries[id(param)] = (entry[0], entry[1], entry[2] + int(num_samples))

    def mean(self, param: Tensor) -> Tensor | None:
        """The average statistic of ``param`` over the samples seen, or ``None`` if it has none."""
        entry = self._lookup(param)
        if entry is None or entry[2] == 0 or entry[1].shape != param.shape:
            return None
        return entry[1] / entry[2]

    def num_samples(self, param: Tensor) -> int:
        """How many samples ``param``'s statistic averages over (0 if none)."""
        entry = self._lookup(param)
        return 0 if entry is None else entry[2]

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def all_reduce(self) -> None:
        """Sum statistics and sample counts over all ``torch.distributed`` ranks (no-op when not initialized).

        Every rank must hold statistics for the same parameters in the same order (the model's order).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        self._drop_dead()
        keys = list(self._entries)
        if not keys:
            return
        sums = [self._entries[k][1] for k in keys]
        flat = torch.cat(
            [s.reshape(-1) for s in sums]
            + [torch.tensor([float(self._entries[k][2]) for k in keys], device=sums[0].device)]
        )
        dist.all_reduce(flat)
        offset = 0
        for s in sums:
            s.copy_(flat[offset : offset + s.numel()].view_as(s))
            offset += s.numel()
        counts = flat[offset:].round().long().tolist()
        for k, c in zip(keys, counts):
            ref, s, _ = self._entries[k]
            self._entries[k] = (ref, s, int(c))


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters that require gradients, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's first parameter (CPU for parameter-free models)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Tensor | Iterable, device: torch.device) -> Tensor | list:
    """Move a tensor (or a list/tuple of tensors) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    return [to_device(b, device) for b in batch]


def batch_size_of(x: Tensor | Iterable) -> int:
    """Leading dimension of the first tensor in a batch."""
    if isinstance(x, Tensor):
        return int(x.shape[0])
    return batch_size_of(next(iter(x)))
