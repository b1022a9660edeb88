"""torchvision adapters: ViT, Swin, ShuffleNet, frozen batch norm, and detection/segmentation heads.

- ``VisionTransformer`` reshapes patches with its cached ``hidden_dim``: synced after pruning; the stream is
  rounded to the head count because ``nn.MultiheadAttention`` needs ``embed_dim % num_heads == 0``.
- Swin's ``shifted_window_attention`` calls ``F.linear`` on the qkv/proj weights (torch-pruning never sees
  those layers) and reshapes with the *input* width (``C // num_heads``), so its heads and the stream they
  read are kept (``frozen``, with ``norm1`` pinning the stream); MLP hidden widths are pruned.
- ShuffleNet-V2 mixes channels with ``channel_shuffle`` (a view/transpose/view that torch-pruning cannot map):
  each branch's last 1x1 conv keeps its outputs, so the shuffled streams keep their order; the inner branch
  widths and the final ``conv5`` are pruned.
- RAFT splits the context encoder's output into the GRU's hidden state (a width fixed at construction) and the
  context features, and correlates the feature maps over their channels: both encoders' output convs keep their
  widths; the encoders' inner layers and the update block are pruned.
- ``FrozenBatchNorm2d`` keeps its affine parameters as buffers; a customized pruner slices them.
- Detection models: the RPN / box / mask / keypoint predictors and the FPN keep their widths (the choices of
  torch-pruning's torchvision example); the number of detections depends on the weights, so verification
  checks finiteness and structure, not shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torchvision.models import shufflenetv2, swin_transformer, vision_transformer
from torchvision.models.optical_flow import raft
from torchvision.ops import misc as misc_ops

from .._internal.generic import frozen_block
from ..registry import AdapterContext, ModelAdapter, register_model_adapter, register_module_adapter
from ..spec import Fixup, FixupContext, SpecPart

__all__ = ["FrozenBatchNormPruner", "is_torchvision_model"]


def is_torchvision_model(model: nn.Module) -> bool:
    """Whether ``model`` is defined in torchvision."""
    return type(model).__module__.startswith("torchvision.")


def _is_detection(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models.detection")


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


# Heads kept by torch-pruning's torchvision example (detection predictors, FPN, proposal heads).
_DETECTION_KEEP = (
    "rpn.head.cls_logits",
    "rpn.head.bbox_pred",
    "roi_heads",
    "backbone.fpn",
    "head.classification_head.cls_logits",
    "head.regression_head.bbox_reg",
    "head.regression_head.bbox_ctrness",
    "head",  # SSD / SSDlite: per-feature-map predictors
)


def _describe_model(model: nn.Module, ctx: AdapterContext) -> SpecPart:
    part = SpecPart()
    if _is_detection(model):
        kept = []
        for path in _DETECTION_KEEP:
            module = _get(model, path)
            if module is not None and not (path == "head" and _get(model, "head.classification_head.cls_logits")):
                kept.append(path)
                part.ignored_layers.append(module)
        part.notes.append("detection heads kept: " + ", ".join(kept))
    for path in ("fc", "classifier", "heads", "head"):
        module = _get(model, path)
        if module is None or _is_detection(model):
            continue
        layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if layers:
            part.ignored_layers.append(layers[-1])
            part.notes.append(f"classifier: {ctx.names.get(layers[-1], path)}")
    return part


register_model_adapter(
    ModelAdapter("torchvision", is_torchvision_model, _describe_model, lambda m: not _is_detection(m)),
    first=False,
)


@register_module_adapter(vision_transformer.VisionTransformer)
def _vit(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    heads = {m.num_heads for m in module.modules() if isinstance(m, nn.MultiheadAttention)}

    def sync_hidden(mod: nn.Module, _ctx: FixupContext) -> None:
        mod.hidden_dim = mod.conv_proj.out_channels

    return SpecPart(
        round_to=set(heads),
        fixups=[Fixup(name, "sync hidden_dim with conv_proj", sync_hidden)],
        notes=[f"VisionTransformer: stream rounded to multiples of {sorted(heads)} heads"],
    )  # not `handled`: its submodules (MHA, tokens) still go through the generic pass


@register_module_adapter(swin_transformer.SwinTransformerBlock)
def _swin_block(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # shifted_window_attention calls F.linear with qkv/proj weights (invisible to torch-pruning) and reshapes
    # with the input width: keep the attention and the stream it reads (norm1 sits on that stream).
    part = frozen_block(module.attn, "shifted_window_attention reshapes with the input width")
    part.ignored_layers.append(module.norm1)
    return part


@register_module_adapter(shufflenetv2.InvertedResidual)
def _shuffle_block(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    keep = []
    for branch in (module.branch1, module.branch2):
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            keep.append(convs[-1])
    return SpecPart(
        ignored_layers=keep,
        notes=["ShuffleNetV2: branch outputs kept (channel_shuffle order)"],
    )


@register_module_adapter(raft.RAFT)
def _raft(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # torch.split(context_out, [hidden_state_size, rest]) with hidden_state_size fixed at construction; the
    # correlation volume (a matmul over the feature maps' channels) has a fixed width that torch-pruning's trace
    # couples to the feature maps' channels.
    return SpecPart(
        ignored_layers=[module.context_encoder.conv, module.feature_encoder.conv],
        notes=["RAFT: context_encoder.conv kept (split into a fixed-size hidden state and the context); "
               "feature_encoder.conv kept (the correlation volume's width does not follow it)"],
    )  # not `handled`: the encoders and the update block still go through the generic pass


class FrozenBatchNormPruner(tp.pruner.function.BasePruningFunc):
    """Prunes ``torchvision.ops.FrozenBatchNorm2d`` (affine parameters and statistics are buffers)."""

    TARGET_MODULES = misc_ops.FrozenBatchNorm2d

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop channels ``idxs`` from every buffer."""
        keep = torch.tensor(sorted(set(range(layer.weight.shape[0])) - set(idxs)), dtype=torch.long)
        for key in ("weight", "bias", "running_mean", "running_var"):
            setattr(layer, key, getattr(layer, key)[keep.to(getattr(layer, key).device)].clone())
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        """Number of channels."""
        return int(layer.weight.shape[0])

    get_in_channels = get_out_channels


@register_module_adapter(misc_ops.FrozenBatchNorm2d)
def _frozen_bn(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    return SpecPart(customized_pruners={misc_ops.FrozenBatchNorm2d: FrozenBatchNormPruner()}, handled={id(module)})
