"""Reload checkpoints written after a mid-training prune: replay the stored pruning history, then load weights.

The callbacks store the history (``[layer, is_out_channel, indices]`` entries) in every checkpoint they see:
Lightning under the checkpoint key ``"orthoreg_tp"``, the transformers ``Trainer`` as ``orthoreg_tp.json`` in the
``checkpoint-N`` folder. A freshly built (unpruned) model takes the pruned weights after the history is replayed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CHECKPOINT_KEY", "HISTORY_FILE", "load_pruned_checkpoint", "pruning_history", "replay_checkpoint_"]

CHECKPOINT_KEY = "orthoreg_tp"  # key in a Lightning checkpoint dict
HISTORY_FILE = "orthoreg_tp.json"  # file in a transformers checkpoint folder

Checkpoint = str | os.PathLike | Mapping[str, Any]


def _load(checkpoint: Checkpoint, weights_only: bool) -> Mapping[str, Any] | Path:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = Path(checkpoint)
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def pruning_history(checkpoint: Checkpoint, *, weights_only: bool = True) -> list[list]:
    """The pruning history a checkpoint carries (``[]`` for a checkpoint written before any prune).

    Args:
        checkpoint: A Lightning checkpoint (path or loaded dict) or a transformers ``checkpoint-N`` folder.
        weights_only: Passed to ``torch.load`` (``False`` for checkpoints holding arbitrary objects you trust).

    Example:
        >>> pruning_history({"orthoreg_tp": {"history": [["0", True, [1]]]}})
        [['0', True, [1]]]
    """
    ckpt = _load(checkpoint, weights_only)
    if isinstance(ckpt, Path):
        file = ckpt / HISTORY_FILE
        return json.loads(file.read_text())["history"] if file.is_file() else []
    return [list(h) for h in ckpt.get(CHECKPOINT_KEY, {}).get("history", [])]


def replay_checkpoint_(model: nn.Module, checkpoint: Checkpoint, example_inputs: Any, *,
                       weights_only: bool = True) -> nn.Module:
    """Prune a freshly built ``model`` in place to the architecture stored in ``checkpoint``; returns it.

    Call it before ``trainer.fit(model, ckpt_path=...)`` (Lightning) or ``trainer.train(resume_from_checkpoint=...)``
    (transformers) to resume a run that pruned: the framework then loads the pruned weights and optimizer state.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> ckpt = {"orthoreg_tp": {"history": [["0", True, [0, 3]]]}}
        >>> replay_checkpoint_(model, ckpt, torch.randn(1, 3, 4, 4))[0].out_channels
        2
    """
    from ..adapters import replay

    history = pruning_history(checkpoint, weights_only=weights_only)
    return replay(model, example_inputs, history) if history else model


def _state_dict(ckpt: Mapping[str, Any] | Path) -> Mapping[str, torch.Tensor]:
    if isinstance(ckpt, Mapping):
        return ckpt.get("state_dict", ckpt)
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(ckpt / "model.safetensors"))
    if (ckpt / "pytorch_model.bin").is_file():
        return torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {str(ckpt)!r}")


def load_pruned_checkpoint(model: nn.Module, checkpoint: Checkpoint, example_inputs: Any, *, strict: bool = True,
                           weights_only: bool = True) -> nn.Module:
    """Replay ``checkpoint``'s pruning on a freshly built ``model`` and load its weights; returns ``model``.

    Args:
        model: The unpruned model as the training script builds it (the ``LightningModule`` for a Lightning
            checkpoint, the model handed to the ``Trainer`` for a transformers one).
        checkpoint: A Lightning ``.ckpt`` path (or loaded dict) or a transformers ``checkpoint-N`` folder.
        example_inputs: Inputs to trace the model with (as given to the callback).
        strict: Passed to ``load_state_dict``.
        weights_only: Passed to ``torch.load``.

    Example:
        >>> ckpt = "lightning_logs/version_0/checkpoints/epoch=3.ckpt"
        >>> model = load_pruned_checkpoint(MyModule(), ckpt, torch.randn(1, 3, 32, 32))  # doctest: +SKIP
    """
    ckpt = _load(checkpoint, weights_only)
    replay_checkpoint_(model, ckpt if isinstance(ckpt, Mapping) else Path(ckpt), example_inputs)
    model.load_state_dict(_state_dict(ckpt), strict=strict)
    return model
