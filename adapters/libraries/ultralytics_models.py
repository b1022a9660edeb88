"""Ultralytics YOLO adapter: detection, segmentation, pose and classification models pruned as they are.

Imported (and registered) only when the ``ultralytics`` package imports (``pip install "orthoreg-tp[yolo]"``).
Prune the ``nn.Module`` inside the ``YOLO`` wrapper, ``yolo.model`` (a ``DetectionModel``, ``SegmentationModel``,
``PoseModel``, ``ClassificationModel``...); nothing of ultralytics is edited and no module is swapped:

- C2f / C3k2 blocks split their first convolution with ``chunk(2)`` and feed both halves to a concat, one of them
  through the bottlenecks too. The robust dependency graph (:mod:`.graph`) couples the two halves channel by
  channel, so they stay equal and ``chunk`` keeps splitting them where the pruned convolutions expect.
- The head's output convolutions (box regression, per-class scores, mask coefficients, keypoints, the mask
  prototypes) and the DFL convolution keep their widths: every prediction keeps its shape.
- The position-sensitive attention of YOLO11 (``C2PSA``: ultralytics' ``Attention``) is kept whole, with the
  stream it reads: its qkv convolution interleaves each head's query, key and value, and the block splits its
  input by a width fixed at construction. Its feed-forward layers are pruned.
- In eval mode a head also returns the feature maps it was given (``"feats"``, for the loss); those are not
  predictions, so the neck layers producing them may be pruned (the loss reads only their spatial sizes).

After pruning, ``yolo.predict(...)`` runs the pruned model; to fine-tune it with ultralytics' trainer, hand the
pruned module to a trainer before ``train()`` (``trainer.model = yolo.model``), see the ``yolo`` page of the docs.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from ultralytics.nn.tasks import BaseModel

from .._internal.generic import frozen_block
from ..registry import AdapterContext, ModelAdapter, register_model_adapter, register_module_adapter
from ..spec import Fixup, SpecPart

__all__ = ["is_ultralytics_model", "yolo_predictions"]

# sub-heads whose last convolution writes predictions (per anchor: box bins, classes, masks, keypoints, angles)
_PREDICTION_HEADS = ("cv2", "cv3", "cv4", "cv5", "one2one_cv2", "one2one_cv3", "one2one_cv4", "one2one_cv5")


def is_ultralytics_model(model: nn.Module) -> bool:
    """Whether ``model`` is an ultralytics task model (``YOLO(...).model``).

    Example:
        >>> import torch.nn as nn
        >>> is_ultralytics_model(nn.Linear(2, 2))
        False
    """
    return isinstance(model, BaseModel)


def yolo_predictions(output: Any) -> Any:
    """The predictions in a YOLO model's output: everything but the ``"feats"`` feature maps a head hands back.

    Example:
        >>> import torch
        >>> y, f = torch.zeros(1, 84, 8), torch.zeros(1, 64, 2, 2)
        >>> yolo_predictions((y, {"boxes": y, "feats": [f]}))
        (tensor(...), {'boxes': tensor(...)})
    """
    if isinstance(output, dict):
        return {k: yolo_predictions(v) for k, v in output.items() if k != "feats"}
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return tuple(yolo_predictions(v) for v in output)
    if isinstance(output, list):
        return [yolo_predictions(v) for v in output]
    return output


def _last_conv(module: nn.Module) -> nn.Module | None:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def sync_split_width(module: nn.Module, _ctx: Any = None) -> bool:
    """Set a split block's half width ``c`` from its first convolution, in place (``True`` when it changed).

    Ultralytics' C2f family (C2f, C3k2, C2fPSA, C2fCIB, C2fAttn) and RepNCSPELAN4 halve ``cv1``'s output with
    ``chunk(2)`` in training and inference, but with ``split((c, c))`` (``forward_split``, a width fixed at
    construction) when exporting: after pruning, ``c`` must follow ``cv1``'s width or the export fails.

    Example:
        >>> sync_split_width(nn.Conv2d(3, 4, 1))
        False
    """
    conv = getattr(getattr(module, "cv1", None), "conv", None)
    if not (callable(getattr(module, "forward_split", None)) and isinstance(getattr(module, "c", None), int)
            and isinstance(conv, nn.Conv2d)):
        return False
    if conv.out_channels % 2 or 2 * module.c == conv.out_channels:
        return False
    module.c = conv.out_channels // 2
    return True


def _split_width_fixups(model: nn.Module, names: dict[nn.Module, str]) -> list[Fixup]:
    return [Fixup(names.get(m, ""), "split width c follows cv1 (export splits by it)", sync_split_width)
            for m in model.modules() if callable(getattr(m, "forward_split", None)) and hasattr(m, "c")]


def _describe(model: nn.Module, ctx: AdapterContext) -> SpecPart:
    kept: list[nn.Module] = []
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    if head is not None:
        for attr in _PREDICTION_HEADS:
            branches = getattr(head, attr, None)
            if isinstance(branches, nn.ModuleList):
                kept.extend(conv for conv in map(_last_conv, branches) if conv is not None)
        for attr in ("dfl", "proto"):
            sub = getattr(head, attr, None)
            if isinstance(sub, nn.Module) and (conv := _last_conv(sub)) is not None:
                kept.append(conv)
    names = ctx.names
    notes = []
    if kept:
        notes.append("ultralytics: eval-mode 'feats' are not predictions (the layers producing them are pruned)")
        notes.append("ultralytics: head output convolutions kept: " + ", ".join(names.get(m, "?") for m in kept))
    part = SpecPart(ignored_layers=kept, notes=notes, fixups=_split_width_fixups(model, names))
    _trace_training_branches(head, part, names)
    return part


def _trace_training_branches(head: nn.Module | None, part: SpecPart, names: dict[nn.Module, str]) -> None:
    """Trace the prototype module of YOLO26 segmentation in training mode: its semantic branch runs only then.

    ``Proto26.semseg`` reads the fused features the prototypes are made from; traced in eval mode, it would keep
    its input width while those features shrink (training and the ultralytics trainer would then fail). Its
    last convolution writes the per-class semantic logits and keeps its width.
    """
    proto = getattr(head, "proto", None)
    semseg = getattr(proto, "semseg", None)
    if not isinstance(semseg, nn.Module) or (conv := _last_conv(semseg)) is None:
        return
    part.trace_attrs.append((proto, "training", True))
    part.ignored_layers.append(conv)
    part.notes.append(f"ultralytics: {names.get(proto, 'proto')} traced in training mode (semantic branch), "
                      f"{names.get(conv, '?')} kept")


register_model_adapter(ModelAdapter("ultralytics", is_ultralytics_model, _describe, outputs=yolo_predictions))


def _is_yolo_wrapper(model: nn.Module) -> bool:
    from ultralytics.engine.model import Model

    return isinstance(model, Model)


def _refuse_wrapper(model: nn.Module, ctx: AdapterContext) -> SpecPart:
    raise TypeError(
        f"got the {type(model).__name__} wrapper, whose forward runs ultralytics' predictor; prune the network "
        "inside it instead: prune(yolo.model, example_inputs, ...)"
    )


register_model_adapter(ModelAdapter("ultralytics", _is_yolo_wrapper, _refuse_wrapper))


def _psa_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    why = "attention kept whole: qkv interleaves each head's query, key and value; C2PSA splits by a fixed width"
    return frozen_block(module, why, keep_input=True)


try:
    from ultralytics.nn.modules.block import Attention as _Attention
except ImportError:  # pragma: no cover - older ultralytics releases
    _Attention = None
if _Attention is not None:
    register_module_adapter(_Attention)(_psa_attention)


# ------------------------------------------------------------------------------------------------- RT-DETR
# RT-DETR (``RTDETR("rtdetr-l.yaml").model``): the CNN backbone and the hybrid encoder's convolutions are pruned;
# the intra-scale attention and the decoder keep their widths (notes in the report's spec).
def _aifi(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    why = "2D sin-cos position embedding built for the width it reads (divisible by 4), kept with that stream"
    return frozen_block(module, why, keep_input=True)


def _rtdetr_decoder(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    why = ("RT-DETR decoder kept whole: deformable attention reshapes its values by a head width fixed at "
           "construction and queries are gathered by encoder scores; its input projections' inputs still shrink")
    return frozen_block(module, why)


try:
    from ultralytics.nn.modules.head import RTDETRDecoder as _RTDETRDecoder
    from ultralytics.nn.modules.transformer import AIFI as _AIFI
except ImportError:  # pragma: no cover - older ultralytics releases
    _AIFI = _RTDETRDecoder = None
if _AIFI is not None:
    register_module_adapter(_AIFI)(_aifi)
    register_module_adapter(_RTDETRDecoder)(_rtdetr_decoder)
