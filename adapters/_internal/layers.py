"""Module types the adapters reason about: the layers that produce channels and those torch-pruning prunes itself."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["KNOWN_TYPES", "LAYER_TYPES"]

#: Layers that produce channels (the roots of torch-pruning groups).
LAYER_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.LSTM,
)
#: Module types torch-pruning prunes by itself (parameters and size attributes).
KNOWN_TYPES: tuple[type, ...] = LAYER_TYPES + (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
)
# Size attributes that a custom module may cache; synced from its first 1-D parameter after pruning.
