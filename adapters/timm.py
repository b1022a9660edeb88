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

import timm
import timm.layers
import torch.nn as nn

from .generic import opaque_attention
from .registry import AdapterContext, ModelAdapter, register_model_adapter, register_module_adapter
from .spec import Fixup, FixupContext, SpecPart

__all__ = ["is_timm_model"]

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
def _heads_fixup(name: str, qkv: nn.Linear, heads: int, parts: int) -> Fixup:
    def fix(mod: nn.Module, ctx: FixupContext) -> None:
        n = ctx.heads(mod.qkv, heads)
        head_dim = mod.qkv.out_features // (parts * n)
        if head_dim * parts * n != mod.qkv.out_features:
            raise ValueError(f"qkv width {mod.qkv.out_features} is not {parts} x {n} heads")
        mod.num_heads = n
        if hasattr(mod, "head_dim"):
            mod.head_dim = head_dim
        if hasattr(mod, "attn_dim"):
            mod.attn_dim = n * head_dim
        if isinstance(getattr(mod, "scale", None), float):
            mod.scale = head_dim**-0.5

    return Fixup(name, "reset num_heads/head_dim/attn_dim/scale from the pruned qkv", fix)


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
    return SpecPart(
        num_heads={qkv: heads},
        fixups=[_heads_fixup(name, qkv, heads, 3)],
        handled={id(m) for m in module.modules()},
    )


register_module_adapter(timm.layers.Attention)(_fused_attention)


@register_module_adapter(timm.layers.AttentionRope)
def _rope_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart:
    return opaque_attention(module, "rotary embeddings are sized by head_dim")
