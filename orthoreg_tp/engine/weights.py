"""Starting a run from trained weights: timm / torchvision pretrained weights, or a checkpoint file.

A checkpoint is loaded with ``weights_only=True`` (no pickled code runs) and may be

* a state dict (``{name: tensor}``), also under a ``"state_dict"``, ``"model"`` or ``"model_state_dict"`` key
  (timm's and torchvision's training scripts save those), with or without DDP's ``module.`` prefix;
* a pruned model of this project (``model_round*.pt``, from :func:`~orthoreg_tp.engine.pruning.save_pruned_model`):
  its pruning history is replayed first, so the run continues from the pruned structure;
* a run's ``checkpoint.pt``.

Keys must match the model exactly: missing, unexpected or differently shaped tensors raise
:class:`~orthoreg_tp.engine.records.CheckpointError` naming them.

Example:
    >>> from orthoreg_tp.engine.models import build_model
    >>> model = build_model("tiny_cnn", num_classes=10)
    >>> torch.save(model.state_dict(), "/tmp/tiny.pt")
    >>> load_start_checkpoint_(build_model("tiny_cnn", num_classes=10), torch.zeros(1, 3, 16, 16), "/tmp/tiny.pt",
    ...                        model_name="tiny_cnn")
    []
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

from ..adapters import replay
from .models import build_model
from .pruning import HistoryEntry
from .records import CheckpointError, safe_torch_load

logger = logging.getLogger(__name__)

_STATE_KEYS = ("state_dict", "model", "model_state_dict")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _listed(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def unpack_checkpoint(obj: Any, path: str | os.PathLike = "checkpoint") -> tuple[dict[str, Tensor],
                                                                                list[HistoryEntry], str | None]:
    """Split a loaded checkpoint into ``(state dict, pruning history, model name or None)``.

    Raises:
        CheckpointError: The object is none of the accepted kinds (the message lists its top-level keys).

    Example:
        >>> sd, history, name = unpack_checkpoint({"model": {"w": torch.zeros(1)}, "optimizer": {}})
        >>> list(sd), history, name
        (['w'], [], None)
    """
    where = str(path)
    if isinstance(obj, Mapping) and "pruning_history" in obj and _is_state_dict(obj.get("model")):
        meta = obj.get("meta") or {}
        return dict(obj["model"]), [list(e) for e in obj["pruning_history"]], meta.get("model")
    if (isinstance(obj, Mapping) and isinstance(obj.get("state"), Mapping) and isinstance(obj.get("config"), Mapping)
            and _is_state_dict(obj.get("model"))):  # a run's checkpoint.pt
        state = obj["state"]
        history = [list(e) for e in [*state.get("start_history", []), *state.get("history", [])]]
        return dict(obj["model"]), history, obj["config"].get("model")
    state_dict = obj if _is_state_dict(obj) else next(
        (obj[k] for k in _STATE_KEYS if isinstance(obj, Mapping) and _is_state_dict(obj.get(k))), None)
    if state_dict is None:
        found = (f"keys {_listed([str(k) for k in obj])}" if isinstance(obj, Mapping) else
                 f"a {type(obj).__name__}")
        raise CheckpointError(f"{where!r} is not a model checkpoint: expected a state dict of tensors (or one under "
                              f"'state_dict'/'model'), or a pruned model of orthoreg_tp; found {found}")
    state_dict = dict(state_dict)
    if all(k.startswith("module.") for k in state_dict):  # saved from a DDP wrapper
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict, [], None


def load_start_checkpoint_(model: nn.Module, example_inputs: Tensor, path: str | os.PathLike, *,
                           model_name: str) -> list[HistoryEntry]:
    """Load a checkpoint into a freshly built (dense) ``model`` in place; return the pruning history it replayed.

    Args:
        model: The dense model the run builds (``build_model(model_name, ...)``).
        example_inputs: Inputs for tracing when a pruning history is replayed.
        path: The checkpoint file (see the module docstring for the accepted kinds).
        model_name: The run's model name; a pruned checkpoint of another model is refused.

    Returns:
        The pruning history (empty for a dense state dict).

    Raises:
        CheckpointError: Unreadable file, wrong kind, another model, or missing / unexpected / misshapen keys.
    """
    state_dict, history, saved_name = unpack_checkpoint(safe_torch_load(path, map_location="cpu"), path)
    if saved_name is not None and saved_name != model_name:
        raise CheckpointError(f"{str(path)!r} holds a {saved_name!r} model, not {model_name!r}")
    if history:
        try:
            replay(model, example_inputs, history)
        except Exception as err:
            raise CheckpointError(f"cannot replay the pruning history of {str(path)!r} on {model_name!r} "
                                  f"({type(err).__name__}: {err})") from err
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshapen = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or misshapen:
        problems = [f"{label}: {_listed(names)}" for label, names in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches (checkpoint vs model)", misshapen)) if names]
        raise CheckpointError(f"{str(path)!r} does not fit {model_name!r} for this dataset: " + "; ".join(problems))
    model.load_state_dict(state_dict)
    logger.info("started from %s (%d tensors%s)", path, len(state_dict),
                f", {len(history)} pruning steps replayed" if history else "")
    return history


def build_pretrained_model(name: str, num_classes: int, *, in_chans: int = 3) -> nn.Module:
    """A timm or torchvision model with its pretrained weights (from the user's cache, else the network).

    timm adapts the classifier and the input channels itself. For torchvision, the default weights are loaded
    into a model with ``num_classes`` outputs: every tensor of matching shape is copied, the classifier of another
    class count keeps its fresh initialization (and is logged).

    Raises:
        ValueError: The name is not ``timm:``/``torchvision:``, or the weights could not be obtained.

    Example:
        >>> model = build_pretrained_model("timm:resnet18", num_classes=10)  # doctest: +SKIP
    """
    if name.startswith("timm:"):
        import timm

        arch = name.split(":", 1)[1]
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm model, got {arch!r}")
        try:
            return timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_chans)
        except Exception as err:  # no cache and no network, or no pretrained tag: say so in one line
            raise ValueError(f"could not load pretrained weights of {name!r} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); pass --checkpoint PATH") from err
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        model = build_model(name, num_classes=num_classes, in_chans=in_chans)
        try:
            source = torchvision.models.get_model(arch, weights="DEFAULT").state_dict()
        except Exception as err:
            raise ValueError(f"could not load pretrained weights of {name!r} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); pass --checkpoint PATH") from err
        own = model.state_dict()
        kept = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(own) - set(kept))
        model.load_state_dict({**own, **kept})
        if skipped:
            logger.info("pretrained %s: %d tensors loaded, freshly initialized: %s", name, len(kept),
                        _listed(skipped))
        return model
    raise ValueError(f"pretrained weights come from timm or torchvision, got model {name!r}")


def model_from_state(name: str, num_classes: int, in_chans: int, example_inputs: Tensor,
                     history: list[HistoryEntry], state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Rebuild a model: build ``name`` dense, replay ``history``, load ``state_dict`` (e.g. a teacher on resume).

    Example:
        >>> m = build_model("tiny_cnn", num_classes=10)
        >>> clone = model_from_state("tiny_cnn", 10, 3, torch.zeros(1, 3, 16, 16), [], m.state_dict())
    """
    model = build_model(name, num_classes=num_classes, in_chans=in_chans).to(example_inputs.device)
    if history:
        replay(model, example_inputs, history)
    model.load_state_dict(dict(state_dict))
    return model
