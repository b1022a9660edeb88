"""Read-only measurements of a model: orthonormality, filter correlation, pruning progress."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _compat
from .functional import filter_correlation, filter_matrix, orthonormality_degree
from .regularizer import REGULARIZABLE


def _layer_blocks(module: nn.Module, include_bias: bool) -> torch.Tensor:
    bias = module.bias if include_bias and getattr(module, "bias", None) is not None else None
    return filter_matrix(
        module.weight.detach(),
        None if bias is None else bias.detach(),
        groups=getattr(module, "groups", 1),
        transposed=bool(getattr(module, "transposed", False)),
    )


def _regularizable(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, REGULARIZABLE) and not isinstance(m.weight, nn.parameter.UninitializedParameter):
            yield name, m


@torch.no_grad()
def orthonormality(model: nn.Module, *, include_bias: bool = True) -> dict[str, float]:
    """The paper's degree of orthonormality ``||diag(G)||_1 / ||G||_1`` of every conv/linear layer.

    Args:
        model: Any model.
        include_bias: Append biases as a column, as the regularizer does.

    Returns:
        ``{layer name: degree}``, 1.0 meaning perfectly orthogonal filters.

    Example:
        >>> layer = nn.Linear(4, 4, bias=False)
        >>> _ = nn.init.orthogonal_(layer.weight)
        >>> round(orthonormality(nn.Sequential(layer))["0"], 4)
        1.0
    """
    return {n: float(orthonormality_degree(_layer_blocks(m, include_bias))) for n, m in _regularizable(model)}


@torch.no_grad()
def filter_correlations(model: nn.Module, *, include_bias: bool = True) -> dict[str, float]:
    """Mean absolute cosine similarity between distinct filters of every conv/linear layer.

    Example:
        >>> layer = nn.Linear(4, 4, bias=False)
        >>> _ = nn.init.orthogonal_(layer.weight)
        >>> filter_correlations(nn.Sequential(layer))["0"] < 1e-5
        True
    """
    out = {}
    for n, m in _regularizable(model):
        value = float(filter_correlation(_layer_blocks(m, include_bias)))
        if value == value:  # layers with a single filter have no correlation to report
            out[n] = value
    return out


def mean_orthonormality(model: nn.Module) -> float:
    """Average of :func:`orthonormality` over layers (a one-number summary for logs and tables)."""
    values = list(orthonormality(model).values())
    return sum(values) / len(values) if values else float("nan")


def prunable_channels(pruner: Any) -> int:
    """Prunable channels of a torch-pruning pruner's model, counted as its global ranking counts them.

    Example:
        >>> before = prunable_channels(pruner)  # doctest: +SKIP
        >>> pruner.step(); 1 - prunable_channels(pruner) / before  # achieved ratio  # doctest: +SKIP
    """
    return _compat.prunable_channel_count(pruner)


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer (for run records and reports)."""
    out = {}
    for n, m in _regularizable(model):
        out[n] = int(m.weight.shape[1] * m.groups) if getattr(m, "transposed", False) else int(m.weight.shape[0])
    return out
