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

Blocks with a per-head relative-position bias table (Swin) are pruned in head dimensions too: the table is
handed to torch-pruning as an ignored parameter (its head columns stay; torch-pruning would otherwise couple
them with the head dimensions). Whole-head pruning (``prune_num_heads=True``) is refused for them (a clear
error, model restored): the table would have to lose the same heads.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import transformers

from ..registry import AdapterContext, ModelAdapter, register_model_adapter, register_module_adapter
from ..spec import Fixup, FixupContext, SpecPart

__all__ = ["is_transformers_model"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` model.

    Example:
        >>> import torch.nn as nn
        >>> is_transformers_model(nn.Linear(2, 2))
        False
    """
    return isinstance(model, transformers.PreTrainedModel)


def _describe_model(model: nn.Module, ctx: AdapterContext) -> SpecPart:
    return SpecPart(notes=["transformers: model config keeps the unpruned sizes"])


register_model_adapter(ModelAdapter("transformers", is_transformers_model, _describe_model), first=False)


def _per_head_tables(module: nn.Module) -> list[nn.Parameter]:
    """Relative-position bias tables (positions x heads) inside an attention block."""
    return [p for name, p in module.named_parameters() if "relative_position" in name]


def _attention_fixup(name: str, heads: int, tables: bool) -> Fixup:
    def fix(mod: nn.Module, ctx: FixupContext) -> None:
        n = ctx.heads(mod.q_proj, heads)
        if tables and n != heads:
            raise ValueError(f"{heads - n} whole heads removed, but the per-head relative-position bias table cannot "
                             "follow; prune head dimensions only (prune_num_heads=False)")
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
    tables = _per_head_tables(module)
    part = SpecPart(
        # a bias table (positions x heads) is added to the logits: torch-pruning would couple its head columns
        # with the head dimensions; listed as ignored parameters, it keeps every column (heads are not removed)
        ignored_layers=list(tables),
        num_heads={m: heads for m in layers[:3]},
        fixups=[_attention_fixup(name, heads, bool(tables))],
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
