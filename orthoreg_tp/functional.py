"""Pure tensor math of OrthoReg: filter matrices, Gram penalties, their analytic gradients.

Every function here is tensor-in / tensor-out and stateless, so tests can check each one against an
independent reference (autograd, a hand loop). The stateful classes (:class:`~orthoreg_tp.OrthoRegularizer`,
the importances) only call into this module.

A layer's weight is viewed as a batch of *blocks* ``M`` of shape ``[num_blocks, rows, cols]`` with one row per
output filter:

* conv ``[C_out, C_in/g, kh, kw]``: one block per group, ``C_out/g x (C_in/g*kh*kw)``;
* depthwise conv (one input channel per group): a single ``C_out x (kh*kw)`` block (docs/method.md, section 2);
* transposed conv ``[C_in, C_out/g, kh, kw]``: one block per group, ``C_out/g x (C_in/g*kh*kw)``;
* linear ``[out, in]``: one ``out x in`` block;
* an optional bias is appended as one more column.

The penalty of a block is ``||G - I||`` with ``G`` the *smaller* Gram matrix (``M M^T`` when rows <= cols,
else ``M^T M``), entrywise L1 (the paper) or squared Frobenius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Norm = Literal["l1", "fro"]
NORMS: tuple[str, ...] = ("l1", "fro")


def is_depthwise(weight: Tensor, groups: int, transposed: bool = False) -> bool:
    """Whether a conv weight is depthwise (one input channel per group, several groups).

    Args:
        weight: The conv weight tensor.
        groups: The conv's ``groups``.
        transposed: Whether the conv is a transposed conv.

    Returns:
        ``True`` for depthwise convs, whose filters form one ``C_out x (kh*kw)`` matrix.

    Example:
        >>> is_depthwise(torch.zeros(8, 1, 3, 3), groups=8)
        True
    """
    if groups <= 1 or weight.dim() < 3:
        return False
    in_per_group = weight.shape[0] // groups if transposed else weight.shape[1]
    return in_per_group == 1


def filter_matrix(weight: Tensor, bias: Tensor | None = None, *, groups: int = 1, transposed: bool = False) -> Tensor:
    """View a layer's parameters as blocks with one row per output filter.

    Differentiable (only reshapes, permutes and a concatenation), so autograd through it is the reference
    for :func:`filter_matrix_grad_to_params`.

    Args:
        weight: ``[out, in]`` (linear), ``[C_out, C_in/g, *k]`` (conv) or ``[C_in, C_out/g, *k]`` (transposed).
        bias: Optional ``[out]`` bias, appended as the last column of each filter row.
        groups: Number of conv groups.
        transposed: Whether ``weight`` is a transposed-conv weight.

    Returns:
        A ``[num_blocks, rows, cols]`` tensor.

    Example:
        >>> filter_matrix(torch.randn(16, 4, 3, 3), groups=2).shape  # 2 groups of 8 filters
        torch.Size([2, 8, 36])
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups!r}")
    if weight.dim() < 2:
        raise ValueError(f"filter_matrix needs a weight with >= 2 dims, got shape {tuple(weight.shape)}")
    if transposed:
        c_in, out_per_group = weight.shape[0], weight.shape[1]
        in_per_group = c_in // groups
        # [g, Cin/g, Cout/g, *k] -> [g, Cout/g, Cin/g, *k]
        w = weight.reshape(groups, in_per_group, out_per_group, -1).transpose(1, 2)
        blocks = w.reshape(groups, out_per_group, -1)
    elif is_depthwise(weight, groups):
        blocks = weight.reshape(1, weight.shape[0], -1)
    else:
        out = weight.shape[0]
        blocks = weight.reshape(groups, out // groups, -1)
    if bias is not None:
        blocks = torch.cat([blocks, bias.reshape(blocks.shape[0], blocks.shape[1], 1)], dim=2)
    return blocks


def filter_matrix_grad_to_params(
    grad_blocks: Tensor,
    weight_shape: Sequence[int],
    *,
    has_bias: bool,
    groups: int = 1,
    transposed: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Map a gradient w.r.t. :func:`filter_matrix`'s blocks back to the weight (and bias) shapes.

    Args:
        grad_blocks: ``[num_blocks, rows, cols]`` gradient.
        weight_shape: Shape of the layer's weight.
        has_bias: Whether the blocks carry a bias column.
        groups: Number of conv groups.
        transposed: Whether the weight is a transposed-conv weight.

    Returns:
        ``(grad_weight, grad_bias)``; ``grad_bias`` is ``None`` when ``has_bias`` is false.

    Example:
        >>> w = torch.randn(4, 3)
        >>> gw, gb = filter_matrix_grad_to_params(filter_matrix(w), w.shape, has_bias=False)
        >>> torch.equal(gw, w)
        True
    """
    grad_bias = None
    if has_bias:
        grad_bias = grad_blocks[:, :, -1].reshape(-1)
        grad_blocks = grad_blocks[:, :, :-1]
    weight_shape = tuple(weight_shape)
    if transposed:
        c_in, out_per_group = weight_shape[0], weight_shape[1]
        g = grad_blocks.reshape(groups, out_per_group, c_in // groups, -1).transpose(1, 2)
        grad_weight = g.reshape(weight_shape)
    else:
        grad_weight = grad_blocks.reshape(weight_shape)
    return grad_weight, grad_bias


def _small_gram(blocks: Tensor) -> tuple[Tensor, bool]:
    rows, cols = blocks.shape[-2], blocks.shape[-1]
    if rows <= cols:
        return blocks @ blocks.transpose(-1, -2), True
    return blocks.transpose(-1, -2) @ blocks, False


def gram(blocks: Tensor) -> Tensor:
    """The smaller Gram matrix of each block: ``M M^T`` if rows <= cols, else ``M^T M``.

    Args:
        blocks: ``[num_blocks, rows, cols]`` (or ``[rows, cols]``).

    Returns:
        ``[num_blocks, d, d]`` with ``d = min(rows, cols)``.

    Example:
        >>> gram(torch.eye(3)[None]).squeeze(0).equal(torch.eye(3))
        True
    """
    return _small_gram(blocks)[0]


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def ortho_penalty(blocks: Tensor, norm: Norm = "l1") -> Tensor:
    """``sum_blocks ||G - I||``: entrywise L1 (``"l1"``, the paper) or squared Frobenius (``"fro"``).

    Args:
        blocks: ``[num_blocks, rows, cols]`` filter matrices (see :func:`filter_matrix`).
        norm: ``"l1"`` or ``"fro"``.

    Returns:
        A scalar tensor, differentiable w.r.t. ``blocks``; zero iff every block has orthonormal rows
        (rows <= cols) or orthonormal columns (rows > cols).

    Example:
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8))
        >>> float(ortho_penalty(q[None])) < 1e-4
        True
    """
    _check_norm(norm)
    g = gram(blocks)
    diff = g - torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return diff.abs().sum() if norm == "l1" else diff.pow(2).sum()


def ortho_penalty_grad(blocks: Tensor, norm: Norm = "l1") -> Tensor:
    """Analytic gradient of :func:`ortho_penalty` w.r.t. ``blocks`` (no autograd graph).

    With ``S = sign(G - I)`` (the L1 subgradient, symmetric) the gradient is ``2 S M`` when ``G = M M^T`` and
    ``2 M S`` when ``G = M^T M``; for the squared Frobenius norm replace ``S`` by ``2 (G - I)``.

    Args:
        blocks: ``[num_blocks, rows, cols]``.
        norm: ``"l1"`` or ``"fro"``.

    Returns:
        A tensor shaped like ``blocks``.

    Example:
        >>> m = torch.randn(1, 3, 5, requires_grad=True)
        >>> ref, = torch.autograd.grad(ortho_penalty(m), m)
        >>> torch.allclose(ortho_penalty_grad(m.detach()), ref)
        True
    """
    _check_norm(norm)
    g, rows_gram = _small_gram(blocks)
    diff = g - torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    s = torch.sign(diff) if norm == "l1" else 2.0 * diff
    return 2.0 * (s @ blocks) if rows_gram else 2.0 * (blocks @ s)


# Grams of at least twice this side are computed in panels of this many rows, each symmetric pair of panels once
# (5/8 of the products at side 512, 3/4 at 256); measured 12-25% faster than one product on CPU (MKL, 1 thread).
_PANEL = 128


def filter_matrix_shape(
    weight_shape: Sequence[int], *, has_bias: bool = False, groups: int = 1, transposed: bool = False
) -> tuple[int, int, int]:
    """The shape ``[num_blocks, rows, cols]`` of :func:`filter_matrix`, from the layer's shapes alone (no tensor work).

    Args:
        weight_shape: Shape of the layer's weight.
        has_bias: Whether a bias column is appended.
        groups: Number of conv groups.
        transposed: Whether the weight is a transposed-conv weight.

    Returns:
        ``(num_blocks, rows, cols)``.

    Example:
        >>> filter_matrix_shape((16, 4, 3, 3), has_bias=True, groups=2)
        (2, 8, 37)
    """
    shape = tuple(int(s) for s in weight_shape)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups!r}")
    if len(shape) < 2:
        raise ValueError(f"filter_matrix needs a weight with >= 2 dims, got shape {shape}")
    kernel = math.prod(shape[2:])
    if transposed:
        blocks, rows, cols = groups, shape[1], shape[0] // groups * kernel
    elif groups > 1 and len(shape) >= 3 and shape[1] == 1:  # depthwise (is_depthwise)
        blocks, rows, cols = 1, shape[0], kernel
    else:
        blocks, rows, cols = groups, shape[0] // groups, shape[1] * kernel
    return blocks, rows, cols + int(has_bias)


def ortho_grad(
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int = 1,
    transposed: bool = False,
    norm: Norm = "l1",
    scale: float = 1.0,
    add_to: tuple[Tensor | None, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``scale`` times the gradient of ``ortho_penalty(filter_matrix(weight, bias, ...), norm)`` w.r.t. the parameters.

    The result of :func:`filter_matrix`, :func:`ortho_penalty_grad` and :func:`filter_matrix_grad_to_params` in a
    row, for less: the weight is read through a view (never copied; a bias enters the rows' Gram as the rank-1
    term ``b b^T``, not as a concatenated column), ``scale`` is folded into the small sign matrix, the gradient
    product is accumulated straight into ``add_to`` (e.g. the parameters' ``.grad``), and large Grams are computed
    one symmetric pair of panels at a time on CPU (5/8 to 3/4 of the products). Transposed convs and weights no view
    fits (channels-last) take the reference path.

    Args:
        weight: The layer's weight (as for :func:`filter_matrix`; detach it first).
        bias: Optional bias, one more column of each filter row.
        groups: Number of conv groups.
        transposed: Whether ``weight`` is a transposed-conv weight.
        norm: ``"l1"`` or ``"fro"``.
        scale: Factor on the gradient (the regularizer's ``lambda * alpha_l``).
        add_to: ``(grad_weight, grad_bias)`` shaped like ``weight`` and ``bias`` to add the result into, in place;
            ``None`` entries (or ``add_to=None``) get new tensors.

    Returns:
        ``(grad_weight, grad_bias)``: the tensors holding the result (those of ``add_to`` where given);
        ``grad_bias`` is ``None`` without a bias.

    Example:
        >>> w = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
        >>> ref, = torch.autograd.grad(ortho_penalty(filter_matrix(w)), w)
        >>> torch.allclose(ortho_grad(w.detach())[0], ref)
        True
    """
    _check_norm(norm)
    n, rows, cols = filter_matrix_shape(weight.shape, has_bias=bias is not None, groups=groups, transposed=transposed)
    out_w, out_b = add_to if add_to is not None else (None, None)
    m = None if transposed or not weight.is_contiguous() else weight.view(n, rows, -1)
    if m is None:
        return _reference_grad(weight, bias, groups, transposed, norm, scale, out_w, out_b)
    b = None if bias is None else bias.reshape(n, rows, 1)
    if rows > cols and b is not None:
        return _tall_grad_with_bias(m, b, weight, bias, norm, scale, out_w, out_b)
    if rows > cols:  # G = M^T M, gradient 2 M S
        s = _sign_scaled_(_sym_gram(m.transpose(1, 2)), norm, scale)
        return _product_into(out_w, weight, m, s), None
    g = _sym_gram(m)
    if b is not None:
        g.baddbmm_(b, b.transpose(1, 2))
    s = _sign_scaled_(g, norm, scale)  # G = M M^T (+ b b^T), gradient 2 S [M | b]
    return _product_into(out_w, weight, s, m), (None if b is None else _product_into(out_b, bias, s, b))


def _tall_grad_with_bias(
    m: Tensor, b: Tensor, weight: Tensor, bias: Tensor, norm: str, scale: float,
    out_w: Tensor | None, out_b: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Tall blocks ``[M | b]``: the column Gram bordered by ``M^T b`` and ``b^T b``; gradient ``2 [M | b] S``."""
    c = m.shape[2]
    g = m.new_empty(m.shape[0], c + 1, c + 1)
    g[:, :c, :c] = _sym_gram(m.transpose(1, 2))
    g[:, :c, c:] = _mm(m.transpose(1, 2), b)
    g[:, c:, :c] = g[:, :c, c:].transpose(1, 2)
    g[:, c:, c:] = _mm(b.transpose(1, 2), b)
    s = _sign_scaled_(g, norm, scale)
    gw = _product_into(_product_into(out_w, weight, m, s[:, :c, :c]), weight, b, s[:, c:, :c])
    gb = _product_into(_product_into(out_b, bias, m, s[:, :c, c:]), bias, b, s[:, c:, c:])
    return gw, gb


def _sym_gram(a: Tensor) -> Tensor:
    """``a @ a^T`` of a ``[n, d, k]`` batch (a view is fine); on CPU each symmetric pair of panels computed once."""
    n, d = a.shape[0], a.shape[1]
    if d < 2 * _PANEL or a.device.type != "cpu":  # GPUs: one launch beats several smaller ones
        return _mm(a, a.transpose(1, 2))
    g = a.new_empty(n, d, d)
    for start in range(0, d, _PANEL):
        stop = min(start + _PANEL, d)
        panel = _mm(a[:, start:stop], a[:, start:].transpose(1, 2))  # rows start:stop, columns start:
        g[:, start:stop, start:] = panel
        g[:, stop:, start:stop] = panel[:, :, stop - start :].transpose(1, 2)
    return g


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """Batched product; a single block goes through ``mm`` (faster than ``bmm`` on CPU)."""
    return torch.mm(a[0], b[0]).unsqueeze(0) if a.shape[0] == 1 else torch.bmm(a, b)


def _sign_scaled_(g: Tensor, norm: str, scale: float) -> Tensor:
    """In place: ``G -> 2 scale sign(G - I)`` (L1) or ``4 scale (G - I)`` (Frobenius), the gradient's left factor."""
    g.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return g.sign_().mul_(2.0 * scale) if norm == "l1" else g.mul_(4.0 * scale)


def _product_into(out: Tensor | None, like: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out += a @ b`` (batched) viewed as ``out``'s shape, in place when ``out`` allows; else a new tensor."""
    n, rows = a.shape[0], a.shape[1]
    if out is None:
        return _mm(a, b).reshape(like.shape)
    if out.is_contiguous() and out.dtype == a.dtype and out.device == a.device:
        view = out.view(n, rows, -1)
        if n == 1:
            view[0].addmm_(a[0], b[0])
        else:
            view.baddbmm_(a, b)
    else:
        out.add_(_mm(a, b).reshape(out.shape).to(out.dtype))
    return out


def _reference_grad(
    weight: Tensor, bias: Tensor | None, groups: int, transposed: bool, norm: str, scale: float,
    out_w: Tensor | None, out_b: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    blocks = filter_matrix(weight, bias, groups=groups, transposed=transposed)
    grad_blocks = ortho_penalty_grad(blocks, norm).mul_(scale)
    gw, gb = filter_matrix_grad_to_params(grad_blocks, weight.shape, has_bias=bias is not None, groups=groups,
                                          transposed=transposed)
    return _add_into(out_w, gw), (None if gb is None else _add_into(out_b, gb))


def _add_into(out: Tensor | None, value: Tensor) -> Tensor:
    if out is None:
        return value.clone(memory_format=torch.contiguous_format)  # value may be a view of a larger tensor
    return out.add_(value.to(out.dtype))


def orthonormality_degree(blocks: Tensor) -> Tensor:
    """The paper's degree of orthonormality ``||diag(G)||_1 / ||G||_1`` (1.0 = perfectly orthogonal).

    Args:
        blocks: ``[num_blocks, rows, cols]``; diagonals and totals are summed over blocks.

    Returns:
        A scalar tensor in ``[0, 1]``.

    Example:
        >>> float(orthonormality_degree(torch.eye(4)[None]))
        1.0
    """
    g = gram(blocks)
    total = g.abs().sum()
    if total == 0:
        return torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.diagonal(g, dim1=-2, dim2=-1).abs().sum() / total


def filter_correlation(blocks: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean absolute cosine similarity between distinct filters (rows) of the same block.

    Args:
        blocks: ``[num_blocks, rows, cols]``.
        eps: Guards the normalization of zero filters.

    Returns:
        A scalar tensor in ``[0, 1]``; 0 for orthogonal filters, ``nan`` if no block has two filters.

    Example:
        >>> float(filter_correlation(torch.eye(3)[None]))
        0.0
    """
    rows = blocks.shape[-2]
    if rows < 2:
        return torch.full((), float("nan"), dtype=blocks.dtype, device=blocks.device)
    unit = blocks / blocks.norm(dim=-1, keepdim=True).clamp_min(eps)
    cos = (unit @ unit.transpose(-1, -2)).abs()
    off = cos.sum(dim=(-1, -2)) - torch.diagonal(cos, dim1=-2, dim2=-1).sum(-1)
    return off.sum() / (blocks.shape[0] * rows * (rows - 1))


def block_width(blocks_shape: Sequence[int]) -> int:
    """The width ``d`` a layer contributes to the layer weights: ``num_blocks * min(rows, cols)``.

    Args:
        blocks_shape: Shape ``[num_blocks, rows, cols]`` of a layer's filter matrix.

    Returns:
        The width (the side of the Gram matrices, summed over blocks).

    Example:
        >>> block_width((2, 8, 36))
        16
    """
    n, r, c = blocks_shape
    return int(n) * min(int(r), int(c))


def sqrt_width_weights(widths: Sequence[int]) -> list[float]:
    """The paper's layer weights ``alpha_l = sqrt(d_l) / sum_m sqrt(d_m)`` (they sum to 1).

    Args:
        widths: ``d_l`` for each layer.

    Returns:
        One weight per layer.

    Example:
        >>> sqrt_width_weights([4, 16])
        [0.3333333333333333, 0.6666666666666666]
    """
    roots = [math.sqrt(w) for w in widths]
    total = sum(roots)
    if total == 0:
        raise ValueError(f"layer widths must not all be zero, got {list(widths)!r}")
    return [r / total for r in roots]


def paper_schedule(total_ratio: float, rounds: int) -> list[float]:
    """Per-round pruning fractions of the *current* filters: ``r_k = p / (k p + n (1 - p))``.

    After ``rounds`` rounds exactly ``total_ratio`` of the original filters are gone (docs/method.md, section 4).

    Args:
        total_ratio: Final fraction ``p`` of filters removed, in ``[0, 1)``.
        rounds: Number of rounds ``n >= 1``.

    Returns:
        ``[r_1, ..., r_n]``.

    Example:
        >>> [round(r, 4) for r in paper_schedule(0.75, 3)]
        [0.5, 0.3333, 0.25]
    """
    _check_schedule_args(total_ratio, rounds)
    p, n = float(total_ratio), int(rounds)
    return [p / (k * p + n * (1.0 - p)) for k in range(1, n + 1)]


def cumulative_schedule(total_ratio: float, rounds: int) -> list[float]:
    """The same schedule as cumulative fractions of the *original* filters, as torch-pruning expects.

    Pass ``lambda ratio, steps: [0.0] + cumulative_schedule(ratio, steps)`` as torch-pruning's
    ``iterative_pruning_ratio_scheduler`` to follow the paper's rounds with ``iterative_steps=rounds``.

    Args:
        total_ratio: Final fraction removed, in ``[0, 1)``.
        rounds: Number of rounds.

    Returns:
        ``[c_1, ..., c_n]`` with ``c_n == total_ratio``.

    Example:
        >>> [round(c, 4) for c in cumulative_schedule(0.75, 3)]
        [0.5, 0.6667, 0.75]
    """
    remaining, out = 1.0, []
    for r in paper_schedule(total_ratio, rounds):
        remaining *= 1.0 - r
        out.append(1.0 - remaining)
    return out


def _check_schedule_args(total_ratio: float, rounds: int) -> None:
    if not 0.0 <= float(total_ratio) < 1.0:
        raise ValueError(f"total_ratio must be in [0, 1), got {total_ratio!r}")
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
