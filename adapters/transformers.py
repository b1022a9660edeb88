"""Hugging Face ``transformers`` adapters: vision transformers pruned in depth (head dimensions included).

Imported (and registered) only when the ``transformers`` package imports. Attention blocks laid out as
``q_proj``/``k_proj``/``v_proj``/``o_proj`` with ``num_attention_heads`` and ``head_dim`` attributes (ViT, DeiT,
Swin, DINOv2 in transformers 5) are pruned like timm's: ``num_heads`` is registered for each projection so every
head keeps the same width, queries and keys lose the same dimensions, and the fix-up resets
``num_attention_heads`` and ``head_dim``. ``scaling`` is passed explicitly to every attention kernel, so it is
left at its original ``head_dim ** -0.5``: the pruned block computes what the unpruned one computes with the
removed dimensions zeroed. The model's ``config`` still describes the model as built (it is shared by every
layer and is not rewritten); save pruned models with ``torch.save`` or a state dict plus the pruned shapes, not
``save_pretrained`` + ``from_pretrained``.

While torch-pruning traces the model, ``config._attn_implementation`` is set to ``"eager"`` (and restored):
torch-pruning follows the explicit ``q @ k.T`` and ``attn @ v`` products, not the fused SDPA kernel.

Blocks with a per-head relative-position bias table (Swin) keep their head layout (their input and output
widths still shrink): torch-pruning couples the table's head columns with the value dimensions it adds to.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import transformers

from .generic import opaque_attention
from .registry import AdapterContext, ModelAdapter, register_model_adapter, register_module_adapter
from .spec import Fixup, FixupContext, SpecPart

__all__ = ["is_transformers_model"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` model."""
    return isinstance(model, transformers.PreTrainedModel)


def _describe_model(model: nn.Module, ctx: AdapterContext) -> SpecPart:
    return SpecPart(notes=["transformers: model config keeps the unpruned sizes"])


register_model_adapter(ModelAdapter("transformers", is_transformers_model, _describe_model), first=False)


def _per_head_tables(module: nn.Module) -> bool:
    return any("relative_position" in name for name, _ in module.named_modules()) or any(
        "relative_position" in name for name, _ in module.named_parameters()
    )


def _attention_fixup(name: str, heads: int) -> Fixup:
    def fix(mod: nn.Module, ctx: FixupContext) -> None:
        n = ctx.heads(mod.q_proj, heads)
        widths = {p: getattr(mod, p).out_features for p in _PROJECTIONS}
        if len(set(widths.values())) != 1 or widths["q_proj"] % n:
            raise ValueError(f"projection widths {widths} are not {n} equal heads")
        mod.num_attention_heads = n
        mod.head_dim = widths["q_proj"] // n

    return Fixup(name, "reset num_attention_heads/head_dim from the pruned projections (scaling kept)", fix)


def _qkvo_attention(module: nn.Module, name: str, ctx: AdapterContext) -> SpecPart | None:
    layers = [getattr(module, p, None) for p in (*_PROJECTIONS, "o_proj")]
    heads, head_dim = getattr(module, "num_attention_heads", None), getattr(module, "head_dim", None)
    if not all(isinstance(m, nn.Linear) for m in layers) or not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    if any(m.out_features != heads * head_dim for m in layers[:3]) or not hasattr(module, "scaling"):
        return None
    if _per_head_tables(module):
        # the bias table (positions x heads) is added to the logits: torch-pruning couples its head columns
        # with the head dimensions of the values and removes columns from it. Keep the head layout.
        return opaque_attention(module, "per-head relative-position bias table")
    part = SpecPart(
        num_heads={m: heads for m in layers[:3]},
        fixups=[_attention_fixup(name, heads)],
        handled={id(m) for m in layers} | {id(module)},
    )
    config: Any = getattr(module, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) not in (None, "eager"):
        part.trace_attrs.append((config, "_attn_implementation", "eager"))
    return part


def _attention_classes() -> list[type]:
    import importlib

    found = []
    for mod, cls in (
        ("transformers.models.vit.modeling_vit", "ViTAttention"),
        ("transformers.models.deit.modeling_deit", "DeiTAttention"),
        ("transformers.models.swin.modeling_swin", "SwinAttention"),
        ("transformers.models.dinov2.modeling_dinov2", "Dinov2Attention"),
        ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers", "Dinov2WithRegistersAttention"),
    ):
        try:
            found.append(getattr(importlib.import_module(mod), cls))
        except (ImportError, AttributeError):
            continue
    return found


if _attention_classes():
    register_module_adapter(*_attention_classes())(_qkvo_attention)
