"""timm adapters: the classifier, cached model sizes, and attention blocks.

Attention strategy, per class (all decided here, none in the core):

- ``heads`` (``timm.layers.Attention``): head dimensions are pruned; ``num_heads`` is registered for the
  fused ``qkv`` so every head keeps the same width, and the fix-up resets ``num_heads``, ``head_dim``,
  ``attn_dim`` and ``scale`` (``head_dim ** -0.5``, what timm's fused kernel uses).
- ``opaque``: the head layout is kept (``qkv``/``q``/``k``/``v`` outputs frozen) while the residual stream
  around the block may shrink. Used for rotary attention (the rotary tables are sized by ``head_dim``), for
  ``qk_norm`` (normalised over ``head_dim``), and for any other attention-like class.
- ``frozen``: head layout and stream both kept, for classes whose forward reshapes the attention output back
  to the *input* width (``reshape(B, N, C)``). :func:`prune` falls back to it automatically, per class, when
  an ``opaque`` block fails its forward check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import timm
import timm.layers
import timm.layers.selective_kernel
import timm.models.cait
import timm.models.coat
import timm.models.convit
import timm.models.crossvit
import timm.models.cspnet
import timm.models.davit
import timm.models.dpn
import timm.models.efficientvim
import timm.models.efficientvit_mit
import timm.models.fasternet
import timm.models.focalnet
import timm.models.inception_next
import timm.models.mambaout
import timm.models.metaformer
import timm.models.mlp_mixer
import timm.models.pvt_v2
import timm.models.res2net
import timm.models.rexnet
import timm.models.shvit
import timm.models.swin_transformer
import timm.models.swin_transformer_v2
import timm.models.swin_transformer_v2_cr
import timm.models.tnt
import timm.models.vision_transformer_relpos
import torch
import torch.nn as nn
import torch_pruning as tp

from orthoreg_tp import along, register_param_slices

from .._internal.generic import frozen_block, opaque_attention
from .._internal.widthfree import switch_to_width_free, width_free_class
from ..registry import AdapterContext, ModelAdapter, register_model_adapter, register_module_adapter
from ..spec import Fixup, FixupContext, SpecPart

__all__ = [
    "PatchMergingPruner",
    "ScaledStdConvPruner",
    "SelectiveKernelAttnPruner",
    "fold_query_scale",
    "is_timm_model",
]

# Model attributes that cache the classifier's input width.
_MODEL_SIZE_ATTRS = ("num_features", "head_hidden_size", "embed_dim", "feature_dim")


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` is defined in timm."""
    return type(model).__module__.startswith("timm.")


def _as_modules(obj: object) -> list[nn.Module]:
    if isinstance(obj, nn.Module):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [m for o in obj for m in _as_modules(o)]
    return []


def _describe_model(model: nn.Module, ctx: AdapterContext) -> SpecPart:
    part = SpecPart()
    classifiers = []
    if hasattr(model, "get_classifier"):
        try:
            classifiers = [m for m in _as_modules(model.get_classifier()) if any(True for _ in m.parameters())]
        except Exception as exc:  # some heads raise when reset; say so and rely on output-layer detection
            part.notes.append(f"get_classifier() failed ({type(exc).__name__}); classifier found from outputs")
    part.ignored_layers.extend(classifiers)
    if classifiers:
        part.notes.append("classifier: " + ", ".join(ctx.names.get(m, "?") for m in classifiers))
    linear = next((m for c in classifiers for m in c.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if linear is not None:
        width = linear.in_features if isinstance(linear, nn.Linear) else linear.in_channels
        attrs = [a for a in _MODEL_SIZE_ATTRS if getattr(model, a, None) == width]
        if attrs:

            def sync(m: nn.Module, _ctx: FixupContext, layer: nn.Module = linear, attrs: list = attrs) -> None:
                new = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
                for a in attrs:
                    setattr(m, a, new)

            part.fixups.append(Fixup("", f"sync model {', '.join(attrs)} with the classifier input", sync))
    return part


register_model_adapter(ModelAdapter("timm", is_timm_model, _describe_model), first=False)


# ----------------------------------------------------------------------------------------------- attention
def fold_query_scale(query: nn.Linear, rows: int, scale_before: float, head_dim_after: int) -> None:
    """Keep attention logits unchanged after head-dimension pruning by rescaling the first ``rows`` query rows.

    Pruning head dimensions removes terms from each ``q . k`` dot product; the kept terms are unchanged only if
    the softmax scale stays ``scale_before`` (the original ``head_dim ** -0.5``). Fused kernels
    (``F.scaled_dot_product_attention`` with no ``scale``) use ``head_dim_after ** -0.5``, so the factor
    ``scale_before * sqrt(head_dim_after)`` is folded into the query weights (and bias) and the caller sets the
    module's ``scale`` to ``head_dim_after ** -0.5``: fused and explicit paths then both compute
    ``scale_before * q . k`` over the kept dimensions, which is what the unpruned model computes with the
    removed dimensions zeroed.

    Args:
        query: The layer producing the queries (a fused ``qkv`` or a separate ``q``).
        rows: Number of leading output rows that are queries.
        scale_before: The softmax scale before pruning.
        head_dim_after: Head width after pruning.

    Example:
        >>> import torch.nn as nn
        >>> q = nn.Linear(4, 6)
        >>> _ = nn.init.ones_(q.weight)
        >>> fold_query_scale(q, rows=2, scale_before=4**-0.5, head_dim_after=1)
        >>> q.weight[:, 0].tolist()
        [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    """
    factor = scale_before * head_dim_after**0.5
    if abs(factor - 1.0) < 1e-12:
        return
    with torch.no_grad():
        query.weight[:rows].mul_(factor)
        if query.bias is not None:
            query.bias[:rows].mul_(factor)


def _heads_fixup(name: str, qkv: nn.Linear, heads: int, parts: int, head_dim: int) -> Fixup:
    def fix(mod: nn.Module, ctx: FixupContext) -> None:
        n = ctx.heads(mod.qkv, heads)
        new_dim = mod.qkv.out_features // (parts * n)
        if new_dim * parts * n != mod.qkv.out_features:
            raise ValueError(f"qkv width {mod.qkv.out_features} is not {parts} x {n} heads")
        mod.num_heads = n
        if hasattr(mod, "head_dim"):
            mod.head_dim = new_dim
        if hasattr(mod, "attn_dim"):
            mod.attn_dim = n * new_dim
        if isinstance(getattr(mod, "scale", None), float) and new_dim != head_dim:
            fold_query_scale(mod.qkv, n * new_dim, mod.scale, new_dim)
            mod.scale = new_dim**-0.5

    return Fixup(name, "reset num_heads/head_dim/attn_dim/scale from the pruned qkv (scale folded into q)", fix)


def _unfused_trace(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """Trace with timm's explicit attention products (torch-pruning does not follow the fused kernel)."""
    return [(module, "fused_attn", False)] if isinstance(getattr(module, "fused_attn", None), bool) else []


def _fused_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int) or qkv.out_features % (3 * heads):
        return None
    if not isinstance(getattr(module, "q_norm", nn.Identity()), nn.Identity):
        return opaque_attention(module, "qk_norm normalises over head_dim")
    if getattr(module, "gate", None) is not None or not hasattr(module, "attn_dim"):
        return opaque_attention(module, "gated or older layout")
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        return opaque_attention(module, "scale_norm over attn_dim")
    if not isinstance(getattr(module, "scale", None), float) or abs(module.scale - module.head_dim**-0.5) > 1e-9:
        return opaque_attention(module, "custom softmax scale")
    return SpecPart(
        num_heads={qkv: heads},
        fixups=[_heads_fixup(name, qkv, heads, 3, qkv.out_features // (3 * heads))],
        handled={id(m) for m in module.modules()},
        trace_attrs=_unfused_trace(module),
    )


register_module_adapter(timm.layers.Attention)(_fused_attention)


@register_module_adapter(timm.layers.AttentionRope)
def _rope_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    return opaque_attention(module, "rotary embeddings are sized by head_dim")


# ----------------------------------------------------------------------------------------------- layers
class ScaledStdConvPruner(tp.pruner.function.ConvPruner):
    """``ConvPruner`` that also slices the per-filter ``gain`` of timm's ``ScaledStdConv2d`` (NFNets)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Prune filters and their gains."""
        keep = sorted(set(range(layer.out_channels)) - set(idxs))
        super().prune_out_channels(layer, idxs)
        layer.gain = self._prune_parameter_and_grad(layer.gain, keep, 0)
        return layer

    def min_in_channels(self, layer: nn.Module) -> int:
        """Input channels the layer needs: each filter is standardized over its fan-in, which needs two values."""
        fan_in_per_channel = math.prod(layer.kernel_size)
        return layer.groups * math.ceil(2 / fan_in_per_channel)


@register_module_adapter(timm.layers.ScaledStdConv2d, timm.layers.ScaledStdConv2dSame)
def _scaled_std_conv(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    return SpecPart(customized_pruners={type(module): ScaledStdConvPruner()}, handled={id(module)})


class PatchMergingPruner(tp.pruner.function.BasePruningFunc):
    """Swin patch merging: ``C`` input channels appear 4 times (2x2 neighbours) in the ``4C`` reduction input.

    Input channel ``c`` is columns ``c, C + c, 2C + c, 3C + c`` of ``reduction`` (and entries of a pre-norm);
    output channels are ``reduction`` rows (and a post-norm). Works for timm's Swin, SwinV2 and SwinV2-CR.
    """

    TARGET_MODULES = nn.Module

    @staticmethod
    def _pre_norm(layer: nn.Module) -> bool:
        norm = getattr(layer, "norm", None)
        return isinstance(norm, nn.LayerNorm) and norm.normalized_shape[0] == layer.reduction.in_features

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Prune input channels (four reduction columns each)."""
        c = layer.reduction.in_features // 4
        expanded = [j * c + i for j in range(4) for i in idxs]
        if self._pre_norm(layer):
            tp.prune_layernorm_out_channels(layer.norm, expanded)
        tp.prune_linear_in_channels(layer.reduction, expanded)
        if isinstance(getattr(layer, "dim", None), int):
            layer.dim = c - len(idxs)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Prune output channels (reduction rows and a post-norm)."""
        tp.prune_linear_out_channels(layer.reduction, idxs)
        norm = getattr(layer, "norm", None)
        if isinstance(norm, nn.LayerNorm) and not self._pre_norm(layer):
            tp.prune_layernorm_out_channels(norm, idxs)
        if isinstance(getattr(layer, "out_dim", None), int):
            layer.out_dim = layer.reduction.out_features
        return layer

    def get_in_channels(self, layer: nn.Module) -> int:
        """``C``."""
        return layer.reduction.in_features // 4

    def get_out_channels(self, layer: nn.Module) -> int:
        """Reduction width."""
        return layer.reduction.out_features


def _patch_merging_slices(layer: nn.Module, is_out: bool) -> list:
    red = layer.reduction
    norm = getattr(layer, "norm", None)
    pre = PatchMergingPruner._pre_norm(layer)
    if is_out:
        out = [(red.weight, along(0))] + ([(red.bias, along(0))] if red.bias is not None else [])
        if isinstance(norm, nn.LayerNorm) and not pre and norm.weight is not None:
            out += [(p, along(0)) for p in (norm.weight, norm.bias) if p is not None]
        return out
    c = red.in_features // 4
    out = [(red.weight, lambda t: t.reshape(t.shape[0], 4, c).sum((0, 1)))]
    if pre and norm.weight is not None:
        out += [(p, lambda t: t.reshape(4, c).sum(0)) for p in (norm.weight, norm.bias) if p is not None]
    return out


register_param_slices(PatchMergingPruner, _patch_merging_slices)

_PATCH_MERGING = tuple(
    cls
    for cls in (
        getattr(timm.models.swin_transformer, "PatchMerging", None),
        getattr(timm.models.swin_transformer_v2, "PatchMerging", None),
        getattr(timm.models.swin_transformer_v2_cr, "PatchMerging", None),
    )
    if cls is not None
)


@register_module_adapter(*_PATCH_MERGING)
def _patch_merging(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    if not isinstance(getattr(module, "reduction", None), nn.Linear) or module.reduction.in_features % 4:
        return None
    return SpecPart(customized_pruners={type(module): PatchMergingPruner()}, handled={id(m) for m in module.modules()})


@register_module_adapter(timm.layers.BlurPool2d)
def _blur_pool(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # The blur kernel is the same for every channel; with channels=None timm expands one copy to the input.
    def fix(mod: nn.Module, _ctx: FixupContext) -> None:
        if mod.channels is not None:
            mod.filt = mod.filt[:1].clone()
            mod.channels = None

    return SpecPart(fixups=[Fixup(name, "blur pool: per-input channel count", fix)], handled={id(module)})


@register_module_adapter(timm.models.res2net.Bottle2neck)
def _res2net(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # torch.split(x, self.width) with a width fixed at construction: keep the split input.
    return SpecPart(ignored_layers=[module.conv1], notes=["Res2Net: conv1 (split by a fixed width) kept"])


class SelectiveKernelAttnPruner(tp.pruner.function.BasePruningFunc):
    """timm's ``SelectiveKernelAttn``: per-channel path weights, ``fc_select`` rows ``p * C + c`` for path ``p``.

    Its input (the stacked paths, ``(B, P, C, H, W)``) and output (the weights, same layout) both index the
    kernel's ``C`` output channels: input channel ``c`` is ``fc_reduce``'s column ``c`` (after the sum over
    paths), output channel ``c`` is ``fc_select``'s rows ``c, C + c, ...`` (one per path; the softmax runs over
    paths, channel by channel). torch-pruning traces the paths themselves: ``torch.stack`` on a new dim and the
    sum over it are element-wise on channels, so each path's conv and norm are coupled channel by channel.
    """

    TARGET_MODULES = timm.layers.selective_kernel.SelectiveKernelAttn

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Prune ``fc_reduce`` input columns."""
        tp.prune_conv_in_channels(layer.fc_reduce, idxs)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Prune ``fc_select`` rows of every path."""
        c = self.get_out_channels(layer)
        tp.prune_conv_out_channels(layer.fc_select, [p * c + i for p in range(layer.num_paths) for i in idxs])
        return layer

    def get_in_channels(self, layer: nn.Module) -> int:
        """``C`` (``fc_reduce`` input)."""
        return layer.fc_reduce.in_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        """``C`` (``fc_select`` rows per path)."""
        return layer.fc_select.out_channels // layer.num_paths


def _sk_attn_slices(layer: nn.Module, is_out: bool) -> list:
    if not is_out:
        return [(layer.fc_reduce.weight, along(1))]
    paths = layer.num_paths
    return [(layer.fc_select.weight, lambda t: t.reshape(paths, t.shape[0] // paths, -1).sum((0, 2)))]


register_param_slices(SelectiveKernelAttnPruner, _sk_attn_slices)


def _sync_selective_kernel(kernel: nn.Module) -> None:
    convs = [path.conv for path in kernel.paths]
    widths_in, widths_out = {c.in_channels for c in convs}, {c.out_channels for c in convs}
    if len(widths_in) != 1 or len(widths_out) != 1:
        raise ValueError(f"paths differ: inputs {sorted(widths_in)}, outputs {sorted(widths_out)}")
    width_in, width_out = widths_in.pop(), widths_out.pop()
    kernel.in_channels = width_in * kernel.num_paths if kernel.split_input else width_in
    kernel.out_channels = width_out


@register_module_adapter(timm.layers.SelectiveKernel)
def _selective_kernel(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    paths = getattr(module, "paths", None)
    if not isinstance(paths, nn.ModuleList) or not all(isinstance(getattr(p, "conv", None), nn.Conv2d) for p in paths):
        return None
    if module.split_input and any(p.conv.groups > 1 for p in paths):
        # torch-pruning would override the per-path chunking with the conv groups: keep the input (no timm model)
        return frozen_block(module, "split input into grouped path convs", keep_input=True)
    part = SpecPart(
        customized_pruners={type(module.attn): SelectiveKernelAttnPruner()},
        fixups=[_split_fixup(name, "SelectiveKernel: in/out_channels from the pruned paths", _sync_selective_kernel)],
        handled={id(m) for m in module.attn.modules()},
    )
    if module.split_input:
        # torch.split(x, self.in_channels // num_paths): every path must keep the same input width, so the
        # groups reaching the input prune the same positions in each path's chunk.
        part.in_channel_groups.update({p.conv: module.num_paths for p in paths})
    return part


@register_module_adapter(timm.models.mlp_mixer.SpatialGatingUnit)
def _spatial_gating(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # proj mixes tokens (it runs on x.transpose(-1, -2)) and the halves of the input gate each other:
    # keep the unit and the channels it reads.
    return frozen_block(module, "token-mixing projection between the two halves of its input", keep_input=True)


@register_module_adapter(timm.models.focalnet.FocalModulation)
def _focal_modulation(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # torch.split(self.f(x), self.input_split) with sizes fixed at construction: keep f's outputs.
    return SpecPart(ignored_layers=[module.f], notes=["FocalModulation: f kept (split by fixed sizes)"])


@register_module_adapter(timm.models.cspnet.CrossStage, timm.models.cspnet.CrossStage3)
def _cross_stage(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    if not isinstance(getattr(module, "conv_exp", None), nn.Module):
        return None
    # x.split(self.expand_chs // 2) with a width fixed at construction: keep the expanded width.
    return SpecPart(ignored_layers=[module.conv_exp], notes=[f"{type(module).__name__}: conv_exp kept (split)"])


# ----------------------------------------------------------------------------------------------- split sizes
# Blocks that ``torch.split`` a tensor by sizes stored at construction. torch-pruning prunes every chunk
# consistently (the host fix maps each chunk to its consumers) but cannot know the Python attributes: the
# fix-ups recompute them from the pruned layers that read or write each chunk.
def _split_fixup(name: str, description: str, fn: Callable[[nn.Module], None]) -> Fixup:
    def fix(mod: nn.Module, _ctx: FixupContext) -> None:
        fn(mod)

    return Fixup(name, description, fix)


def _sync_partial_conv(block: nn.Module) -> None:
    mixer, conv = block.spatial_mixing, block.spatial_mixing.partial_conv3
    width = block.mlp[-1].out_channels  # the residual stream: the mixer's input width
    untouched = width - conv.in_channels
    if untouched < 0 or conv.out_channels + untouched != block.mlp[0].in_channels:
        raise ValueError(f"partial conv {conv.in_channels}->{conv.out_channels} does not fit stream {width}")
    mixer.dim_conv3, mixer.dim_untouched = conv.in_channels, untouched


@register_module_adapter(timm.models.fasternet.MLPBlock)
def _fasternet_block(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    mixer = module.spatial_mixing
    if getattr(mixer.forward, "__func__", None) is not type(mixer).forward_split_cat:
        return None  # the in-place 'slicing' forward needs equal in/out widths: the repair loop handles it
    fix = _split_fixup(name, "FasterNet partial conv: dim_conv3/dim_untouched from pruned layers", _sync_partial_conv)
    return SpecPart(fixups=[fix])


def _sync_inception_dw(block: nn.Module) -> None:
    mixer = block.token_mixer
    convs = (mixer.dwconv_hw, mixer.dwconv_w, mixer.dwconv_h)
    identity = block.norm.num_features - sum(c.out_channels for c in convs)  # norm reads the mixer's output
    if identity < 0:
        raise ValueError(f"branches are wider ({sum(c.out_channels for c in convs)}) than the block")
    mixer.split_indexes = (identity, *(c.in_channels for c in convs))


@register_module_adapter(timm.models.inception_next.MetaNeXtBlock)
def _inception_next_block(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    mixer, norm = module.token_mixer, getattr(module, "norm", None)
    if not isinstance(mixer, timm.models.inception_next.InceptionDWConv2d) or not hasattr(norm, "num_features"):
        return None
    fix = _split_fixup(name, "InceptionNeXt: split_indexes from the pruned branches", _sync_inception_dw)
    return SpecPart(fixups=[fix])


def _sync_gated_conv(block: nn.Module) -> None:
    hidden, conv = block.fc2.in_features, block.conv.out_channels
    if block.fc1.out_features != 2 * hidden or conv > hidden:
        raise ValueError(f"fc1 width {block.fc1.out_features} is not 2 x {hidden} (conv {conv})")
    block.split_indices = (hidden, hidden - conv, conv)


@register_module_adapter(timm.models.mambaout.GatedConvBlock)
def _gated_conv_block(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # fc1 -> (gate, identity, conv) chunks; gate x cat(identity, conv) couples the halves channel by channel.
    # torch-pruning roots the group at the depthwise conv when it meets it first and then never visits fc1's
    # (gate, identity) pairs: those stay unpruned (a host limitation: one group per layer).
    fix = _split_fixup(name, "MambaOut gated conv: split_indices from fc2/conv", _sync_gated_conv)
    return SpecPart(fixups=[fix])


def _sync_hsm_ssd(mixer: nn.Module) -> None:
    inner = mixer.out_proj.conv.in_channels
    if mixer.hz_proj.conv.out_channels != 2 * inner:
        raise ValueError(f"hz_proj width {mixer.hz_proj.conv.out_channels} is not 2 x {inner}")
    mixer.d_inner = inner


@register_module_adapter(timm.models.efficientvim.HSMSSD)
def _hsm_ssd(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # The B, C and dt chunks of BCdt_proj (and A) index the same states, but C meets them only through a
    # matmul torch-pruning does not couple: the state dimension is kept. d_inner (hz_proj halves) is pruned.
    return SpecPart(
        ignored_layers=[module.BCdt_proj.conv],
        out_channel_groups={module.hz_proj.conv: 2},  # h * act(z): the two halves index the same channels
        fixups=[_split_fixup(name, "EfficientViM HSM-SSD: d_inner from out_proj", _sync_hsm_ssd)],
        notes=["HSMSSD: state_dim kept (B/C/dt chunks meet through a matmul)"],
    )


@register_module_adapter(timm.models.shvit.SHSA)
def _single_head_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # forward splits its input by self.pdim and reshapes the attention values with the same self.pdim, so the
    # partial input width must equal the value width, and q/k meet in a matmul torch-pruning does not couple.
    # One attribute for two independently pruned widths: keep the block and the stream it reads.
    return frozen_block(module, "input split and value reshape share pdim", keep_input=True)


@register_module_adapter(timm.models.efficientvit_mit.LiteMLA)
def _lite_mla(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    # forward reshapes the concatenated multi-scale q/k/v to (B, -1, 3 * self.dim, H * W): each head's q, k and v
    # are self.dim channels, fixed at construction. The grouped 1x1 conv of each scale (groups = 3 * heads) makes
    # torch-pruning prune the same positions of every q/k/v chunk, so the pruned chunk width is the new dim.
    convs = [op[-1] for op in module.aggreg if isinstance(op, nn.Sequential) and isinstance(op[-1], nn.Conv2d)]
    if not convs or len(convs) != len(module.aggreg) or convs[0].groups % 3:
        return None
    chunks = convs[0].groups  # 3 * heads

    def fix(mod: nn.Module, _ctx: FixupContext) -> None:
        width = mod.aggreg[0][-1].out_channels
        if width % chunks:
            raise ValueError(f"q/k/v width {width} is not a multiple of {chunks} chunks")
        mod.dim = width // chunks

    return SpecPart(fixups=[Fixup(name, "LiteMLA: q/k/v chunk width (dim) from the pruned convs", fix)])


@register_module_adapter(timm.models.tnt.PixelEmbed)
def _tnt_pixel_embed(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    # The inner (pixel) stream is reshaped with the cached in_dim here and flattened channels-last into each block's
    # proj ((B * N, P, C) -> (B, N, P * C): feature p * C + c), a coupling torch-pruning maps as identity (the
    # proj would lose k features where the stream loses k * P). The stream keeps its width; the pixel blocks'
    # attention and MLP hidden widths and the outer (patch) stream stay prunable.
    proj = getattr(module, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        return None
    return SpecPart(ignored_layers=[proj], handled={id(module), id(proj)},
                    notes=[f"{name}: TNT pixel stream width kept (flattened channels-last into each block's proj)"])


@register_module_adapter(timm.models.metaformer.Scale)
def _metaformer_scale(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # forward reshapes the scale to self.shape, (dim, 1, 1) or (dim,), cached at construction.
    def fix(mod: nn.Module, _ctx: FixupContext) -> None:
        mod.shape = (mod.scale.numel(), *mod.shape[1:])

    return SpecPart(fixups=[Fixup(name, "MetaFormer scale: shape from the pruned scale", fix)], handled={id(module)})


# ----------------------------------------------------------------------------------------------- partial residuals
def _sync_linear_bottleneck(block: nn.Module) -> None:
    first = block.conv_exp if block.conv_exp is not None else block.conv_dw
    width_in, width_out = first.conv.in_channels, block.conv_pwl.conv.out_channels
    if block.use_shortcut and width_in > width_out:
        raise ValueError(f"shortcut width {width_in} exceeds the block output {width_out}")
    block.in_channels, block.out_channels = width_in, width_out


@register_module_adapter(timm.models.rexnet.LinearBottleneck)
def _linear_bottleneck(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # cat([x[:, :in_channels] + shortcut, x[:, in_channels:]]): output channel c is conv_pwl channel c, and the
    # first in_channels of them also carry the shortcut. The host fix sizes the concat inputs (slice, add), so
    # torch-pruning keeps the pairs together; the kept shortcut channels stay first (pruning keeps order).
    fix = _split_fixup(name, "RexNet partial residual: in/out_channels from the pruned convs", _sync_linear_bottleneck)
    return SpecPart(fixups=[fix])


def _input_width(module: nn.Module) -> int:
    """Input width of a DPN stage entry: its first BatchNorm (DPN blocks normalise before every conv)."""
    norm = next((m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if norm is None:
        raise ValueError(f"{type(module).__name__} has no BatchNorm to read its input width from")
    return int(norm.num_features)


def _sync_dual_path(block: nn.Module, width_out: int) -> None:
    proj = block.c1x1_w_s1 if block.c1x1_w_s1 is not None else block.c1x1_w_s2
    width_s = proj.conv.out_channels if proj is not None else _input_width(block)  # [residual | dense] read
    inc = width_out - width_s  # the new dense channels (out2)
    if block.c1x1_c1 is not None:
        residual = block.c1x1_c1.out_channels
        if block.c1x1_c2.out_channels != inc:
            raise ValueError(f"dense output {block.c1x1_c2.out_channels} != block growth {inc}")
    else:
        residual = block.c1x1_c.conv.out_channels - inc  # c1x1_c outputs [residual | dense]
    if inc < 0 or not 0 < residual <= width_s:
        raise ValueError(f"residual {residual} / growth {inc} do not fit the shortcut width {width_s}")
    block.num_1x1_c, block.inc = residual, inc


def _sync_dpn(model: nn.Module, _ctx: FixupContext) -> None:
    entries = list(model.features)
    for block, successor in zip(entries, entries[1:]):
        if isinstance(block, timm.models.dpn.DualPathBlock):
            _sync_dual_path(block, _input_width(successor))


@register_module_adapter(timm.models.dpn.DPN)
def _dpn(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    # DualPathBlock: x_s = [residual | dense], output cat([x_s[:, :num_1x1_c] + out1, x_s[:, num_1x1_c:], out2]).
    # The host fix sizes the concat inputs (slice + add, slice, conv), so residual and dense channels are pruned
    # consistently; num_1x1_c (and inc) are then read back from the pruned widths. Without c1x1_c1 the residual
    # width is c1x1_c's output minus the block's growth (its output width, read from the next entry, minus x_s).
    blocks = list(getattr(module, "features", ()))
    if not blocks or isinstance(blocks[-1], timm.models.dpn.DualPathBlock):
        return None  # the last block's output width is not read by a later entry
    return SpecPart(fixups=[Fixup(name, "DPN dual path: num_1x1_c/inc from the pruned widths", _sync_dpn)])


@register_module_adapter(timm.models.coat.FactorAttnConvRelPosEnc)
def _factor_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # forward reshapes the attention output to the input width (reshape(B, N, C)) and the ConvRelPosEnc it
    # holds is shared by every block of a stage, its depthwise convs split by head_chs fixed at construction:
    # keep the block, its shared encoding and the stream it reads. Registered here so that every block is
    # pinned up front (the generic detection skips blocks whose shared encoding an earlier block claimed).
    return frozen_block(module, "reshapes to its input width; shared ConvRelPosEnc split by head_chs", keep_input=True)


@register_module_adapter(timm.models.vision_transformer_relpos.RelPosAttention)
def _relpos_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    # forward reshapes qkv with self.num_heads/self.head_dim but the output back to the input width
    # (reshape(B, N, C)), and the relative-position MLP emits one bias per head: the attention width must stay
    # the stream width, a coupling torch-pruning does not see. Keep the block and the stream it reads.
    return frozen_block(module, "reshapes to its input width; per-head relative-position bias", keep_input=True)


def _sync_mixed_conv(mixed: nn.Module) -> None:
    convs = list(mixed.values())
    mixed.splits = [c.in_channels for c in convs]
    mixed.in_channels = sum(mixed.splits)
    mixed.out_channels = sum(c.out_channels for c in convs)


@register_module_adapter(timm.layers.MixedConv2d)
def _mixed_conv(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    # torch.split(x, self.splits) into convs of several kernel sizes, then torch.cat: torch-pruning prunes each
    # chunk with its conv (the host fix maps the chunks); the split sizes are read back from the pruned convs.
    if not all(isinstance(c, nn.Conv2d) for c in module.values()):
        return None
    fix = _split_fixup(name, "MixedConv2d: splits/in/out_channels from the pruned convs", _sync_mixed_conv)
    return SpecPart(fixups=[fix])


@register_module_adapter(timm.layers.GluMlp)
def _glu_mlp(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    # fc1 -> chunk(2) -> act(x1) * x2 (SwiGLU packed): the two halves index the same hidden channels.
    fc1, dim = getattr(module, "fc1", None), getattr(module, "chunk_dim", -1)
    packed = (isinstance(fc1, nn.Linear) and dim in (-1, 2)) or (isinstance(fc1, nn.Conv2d) and dim == 1)
    if not packed or fc1.weight.shape[0] % 2:
        return None
    return SpecPart(out_channel_groups={fc1: 2})


# ----------------------------------------------------------------------------------------------- width-free attention
# Attention classes whose forward reshapes with the input width C (``reshape(B, N, C)``, ``C // num_heads``): their
# head dimensions are pruned like timm's Attention and the fix-up switches each pruned block to its width-free
# subclass (widthfree.py: those reshapes get -1, exact on the unpruned block). {class: (query layer, its parts,
# projections producing heads)}; ``sr`` (spatial reduction before k/v, reshaped with C) keeps its output and
# the stream the block reads.
def _width_free_fixup(
    name: str, query: str, parts: int, heads: int, head_dim: int, projections: tuple, rewrite: bool, tables: bool
) -> Fixup:
    def fix(mod: nn.Module, ctx: FixupContext) -> None:
        q = getattr(mod, query)
        n = ctx.heads(q, heads)
        if tables and n != heads:
            raise ValueError(f"{heads - n} whole heads removed, but the per-head relative-position bias table cannot "
                             "follow; prune head dimensions only (prune_num_heads=False)")
        new_dim = q.out_features // (parts * n)
        for proj in projections:
            width = getattr(mod, proj).out_features
            if width % n or (proj == query and new_dim * parts * n != width):
                raise ValueError(f"{proj} width {width} is not a multiple of {n} heads")
        mod.num_heads = n
        if isinstance(getattr(mod, "head_dim", None), int):
            mod.head_dim = new_dim
        if new_dim != head_dim and isinstance(getattr(mod, "scale", None), float):
            fold_query_scale(q, n * new_dim, mod.scale, new_dim)
            mod.scale = new_dim**-0.5
        if hasattr(mod, "attn_dim") and isinstance(mod.attn_dim, int):
            mod.attn_dim = n * new_dim
        # the original forward reshapes with the input width: needed once heads or the stream it reads changed
        if rewrite and (new_dim != head_dim or n != heads or q.in_features != n * new_dim):
            switch_to_width_free(mod)

    return Fixup(name, "num_heads/head_dim/scale from the pruned projections; width-free forward", fix)


_WIDTH_FREE: dict[type, tuple[str, int, tuple[str, ...], bool]] = {  # (query, parts, projections, rewrite)
    timm.models.pvt_v2.Attention: ("q", 1, ("q", "kv"), True),
    timm.models.crossvit.CrossAttention: ("wq", 1, ("wq", "wk", "wv"), True),
    timm.models.cait.ClassAttn: ("q", 1, ("q", "k", "v"), True),
    timm.models.convit.MHSA: ("qkv", 3, ("qkv",), True),
    timm.models.davit.WindowAttention: ("qkv", 3, ("qkv",), True),
    # already width-agnostic; a per-head relative-position bias table (kept whole: an ignored parameter)
    timm.models.swin_transformer.WindowAttention: ("qkv", 3, ("qkv",), False),
}


@register_module_adapter(*_WIDTH_FREE)
def _width_free_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    query, parts, projections, rewrite = _WIDTH_FREE[type(module)]
    layers = [getattr(module, p, None) for p in projections]
    heads = getattr(module, "num_heads", None)
    if not all(isinstance(m, nn.Linear) for m in layers) or not isinstance(heads, int):
        return None
    if (rewrite and width_free_class(type(module)) is None) or layers[0].out_features % (parts * heads):
        return None
    head_dim = layers[0].out_features // (parts * heads)
    # a bias table (positions x heads) added to the logits: torch-pruning would couple its head columns with the
    # head dimensions; as an ignored parameter it keeps every column (whole heads are then refused)
    tables = [p for n, p in module.named_parameters() if "relative_position_bias_table" in n]
    part = SpecPart(
        ignored_layers=list(tables),
        num_heads={m: heads for m in layers},
        fixups=[_width_free_fixup(name, query, parts, heads, head_dim, projections, rewrite, bool(tables))],
        handled={id(m) for m in module.modules()},
        trace_attrs=_unfused_trace(module),
    )
    sr = getattr(module, "sr", None)
    if isinstance(sr, nn.Conv2d):
        # self.sr(x).reshape(B, C, -1): the reduced map must keep the width of the stream the block reads
        part.ignored_layers.append(sr)
        part.pinned_inputs.append(module)
        part.notes.append(f"{type(module).__name__}: spatial reduction and the stream it reads kept")
    return part


# ----------------------------------------------------------------------------------------------- attention kept whole
# Attention classes that keep their heads and the stream they read, with the reason (reported in the spec notes).
# The generic detection would freeze them the same way; naming the reason tells the user why the family stays
# shallow. Each also reshapes its output to its input width.
_KEPT_WHOLE: dict[str, str] = {
    "beit.Attention": "qkv runs as F.linear with separate q/v biases (invisible to torch-pruning); per-head table",
    "eva.EvaAttention": "rotary tables sized by head_dim; qkv may run as F.linear with separate q/v biases",
    "cait.TalkingHeadAttn": "proj_l/proj_w mix heads on the logits (coupled with head dims by torch-pruning)",
    "convit.GPSA": "positional gating per head on the logits (coupled with head dims by torch-pruning)",
    "nest.Attention": "6-D qkv layout: torch-pruning maps pruned dims to the wrong q/k/v chunk",
    "twins.LocallyGroupedAttn": "6-D qkv layout: torch-pruning maps pruned dims to the wrong q/k/v chunk",
    "twins.GlobalSubSampleAttn": "k/v head width C // num_heads next to another -1: no exact width-free rewrite",
    "xcit.XCA": "channel (cross-covariance) attention: removing a dimension is not zeroing it",
    "davit.ChannelAttention": "channel attention: removing a dimension is not zeroing it",
    "edgenext.CrossCovarianceAttn": "channel (cross-covariance) attention: removing a dimension is not zeroing it",
    "swin_transformer_v2.WindowAttention": "cpb_mlp emits per-head biases; per-head logit scale; F.linear q/v biases",
    "gcvit.WindowAttentionGlobal": "per-head relative-position bias and a global query from another branch",
}


def _kept_whole_classes() -> dict[type, str]:
    import importlib

    out = {}
    for path, why in _KEPT_WHOLE.items():
        module, _, cls = path.rpartition(".")
        try:
            out[getattr(importlib.import_module(f"timm.models.{module}"), cls)] = why
        except (ImportError, AttributeError):
            continue
    return out


_KEPT = _kept_whole_classes()


@register_module_adapter(*_KEPT)
def _kept_whole(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    return frozen_block(module, f"attention kept whole: {_KEPT[type(module)]}", keep_input=True)
