"""Zero-copy snapshots of a model's structure, so a failed pruning can be rolled back in place.

torch-pruning never edits a tensor in place: it assigns new ``nn.Parameter`` objects and new buffers, and
changes Python attributes (``out_channels``, ``num_heads``...). Keeping each module's attribute dictionary
(containers copied one level deep) therefore keeps every original tensor alive and unchanged; restoring puts
those dictionaries back into the *same* module objects, so references held elsewhere (optimizers, hooks, the
user's variables) stay valid. Tensor version counters detect the rare in-place edit that would defeat this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["Snapshot", "restore", "snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """Module attribute dictionaries and tensor versions captured by :func:`snapshot`."""

    modules: tuple[tuple[nn.Module, dict], ...]
    tensors: tuple[tuple[torch.Tensor, int], ...]


def _copy_attrs(module: nn.Module) -> dict:
    return _copy_attrs_from(module.__dict__)


def snapshot(model: nn.Module) -> Snapshot:
    """Capture ``model``'s structure without copying any tensor."""
    modules = tuple((m, _copy_attrs(m)) for m in model.modules())
    tensors: dict[int, tuple[torch.Tensor, int]] = {}
    for m in model.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None:
                tensors.setdefault(id(t), (t, t._version))
    return Snapshot(modules=modules, tensors=tuple(tensors.values()))


def restore(snap: Snapshot) -> None:
    """Put every module captured in ``snap`` back into its captured state, in place.

    Raises:
        RuntimeError: A captured tensor was modified in place since the snapshot (its values cannot be
            recovered without a copy).
    """
    for module, attrs in snap.modules:
        module.__dict__.clear()
        module.__dict__.update(_copy_attrs_from(attrs))
    changed = [tuple(t.shape) for t, version in snap.tensors if t._version != version]
    if changed:
        raise RuntimeError(
            f"{len(changed)} tensor(s) were modified in place after the snapshot (shapes {changed[:3]}); "
            "their original values cannot be restored"
        )


def _copy_attrs_from(attrs: dict) -> dict:
    # Copy again so the snapshot itself stays reusable (a restored model may be pruned and restored again).
    # ``.copy()`` keeps the container's type (OrderedDict hooks, defaultdicts) and is much cheaper than copy.copy
    return {k: v.copy() if isinstance(v, (dict, list, set)) else v for k, v in attrs.items()}
