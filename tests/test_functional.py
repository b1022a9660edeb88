import pytest
import torch

from orthoreg_tp.functional import (
    block_width,
    cumulative_schedule,
    filter_correlation,
    filter_matrix,
    filter_matrix_grad_to_params,
    filter_matrix_shape,
    gram,
    ortho_grad,
    ortho_penalty,
    ortho_penalty_grad,
    orthonormality_degree,
    paper_schedule,
    sqrt_width_weights,
)


def orthonormal_rows(rows, cols):
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), max(rows, cols), dtype=torch.float64))
    return q[:rows, :cols]


@pytest.mark.parametrize("shape", [(4, 9), (9, 9), (12, 5)], ids=["wide", "square", "tall"])
@pytest.mark.parametrize("norm", ["l1", "fro"])
def test_penalty_zero_for_orthonormal_and_positive_otherwise(shape, norm):
    m = orthonormal_rows(*shape)[None]
    assert float(ortho_penalty(m, norm)) < 1e-10
    assert float(ortho_penalty(m * 1.5, norm)) > 0.1
    assert float(ortho_penalty(torch.randn(1, *shape, dtype=torch.float64), norm)) > 0.1


def test_gram_is_the_smaller_one():
    assert gram(torch.randn(2, 3, 7)).shape == (2, 3, 3)
    assert gram(torch.randn(2, 7, 3)).shape == (2, 3, 3)


@pytest.mark.parametrize("shape", [(1, 4, 9), (3, 6, 6), (2, 10, 4)])
@pytest.mark.parametrize("norm", ["l1", "fro"])
def test_penalty_grad_matches_autograd(shape, norm):
    m = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(ortho_penalty(m, norm), m)
    torch.testing.assert_close(ortho_penalty_grad(m.detach(), norm), ref)


@pytest.mark.parametrize(
    "weight_shape,groups,transposed",
    [
        ((8, 3, 3, 3), 1, False),
        ((8, 2, 3, 3), 2, False),
        ((6, 1, 3, 3), 6, False),
        ((4, 6, 3, 3), 1, True),
        ((4, 3, 2, 2), 2, True),
        ((5, 7), 1, False),
        ((8, 4, 3), 2, False),
    ],
    ids=["conv", "grouped", "depthwise", "transposed", "grouped-transposed", "linear", "conv1d-grouped"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_filter_matrix_roundtrip_and_rows_are_filters(weight_shape, groups, transposed, bias):
    w = torch.randn(weight_shape)
    out_channels = weight_shape[1] * groups if transposed else weight_shape[0]
    b = torch.randn(out_channels) if bias else None
    blocks = filter_matrix(w, b, groups=groups, transposed=transposed)
    assert blocks.shape[0] * blocks.shape[1] == out_channels  # one row per output filter
    gw, gb = filter_matrix_grad_to_params(blocks, w.shape, has_bias=bias, groups=groups, transposed=transposed)
    torch.testing.assert_close(gw, w)
    if bias:
        torch.testing.assert_close(gb, b)


LAYER_SHAPES = {  # id -> (weight shape, groups, transposed)
    "conv": ((8, 3, 3, 3), 1, False),
    "conv-tall": ((32, 2, 2, 2), 1, False),
    "grouped": ((8, 2, 3, 3), 2, False),
    "depthwise": ((6, 1, 3, 3), 6, False),
    "transposed": ((4, 6, 3, 3), 1, True),
    "grouped-transposed": ((4, 3, 2, 2), 2, True),
    "linear": ((5, 7), 1, False),
    "linear-tall": ((9, 3), 1, False),
    "conv1d-grouped": ((8, 4, 3), 2, False),
    "wide-panels": ((300, 40, 3, 3), 1, False),  # a 300 x 300 row Gram: computed in symmetric panels on CPU
    "tall-panels": ((600, 290), 1, False),  # a 290 x 290 column Gram: the same
    "grouped-panels": ((520, 130, 1, 3), 2, False),  # two 260 x 390 blocks: batched panels
}


@pytest.mark.parametrize("kind", list(LAYER_SHAPES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_filter_matrix_shape_matches_filter_matrix(kind, bias):
    shape, groups, transposed = LAYER_SHAPES[kind]
    out_channels = shape[1] * groups if transposed else shape[0]
    blocks = filter_matrix(torch.zeros(shape), torch.zeros(out_channels) if bias else None, groups=groups,
                           transposed=transposed)
    assert filter_matrix_shape(shape, has_bias=bias, groups=groups, transposed=transposed) == tuple(blocks.shape)


def _layer(kind, bias, seed=0):
    shape, groups, transposed = LAYER_SHAPES[kind]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, dtype=torch.float64, generator=gen) / shape[1] ** 0.5
    b = torch.randn(shape[1] * groups if transposed else shape[0], dtype=torch.float64, generator=gen) if bias else None
    return w, b, groups, transposed


@pytest.mark.parametrize("kind", list(LAYER_SHAPES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("norm", ["l1", "fro"])
def test_ortho_grad_matches_autograd_of_the_penalty(kind, bias, norm):
    w, b, groups, transposed = _layer(kind, bias)
    params = [w.requires_grad_()] + ([b.requires_grad_()] if bias else [])
    penalty = 0.7 * ortho_penalty(filter_matrix(w, b, groups=groups, transposed=transposed), norm)
    ref = torch.autograd.grad(penalty, params)
    gw, gb = ortho_grad(w.detach(), None if b is None else b.detach(), groups=groups, transposed=transposed,
                        norm=norm, scale=0.7)
    torch.testing.assert_close(gw, ref[0])
    assert gw.shape == w.shape and gw.is_contiguous()
    if bias:
        torch.testing.assert_close(gb, ref[1])
    else:
        assert gb is None
    # accumulating into existing gradients adds in place and returns those tensors
    into_w, into_b = torch.ones_like(w), torch.ones_like(b) if bias else None
    aw, ab = ortho_grad(w.detach(), None if b is None else b.detach(), groups=groups, transposed=transposed,
                        norm=norm, scale=0.7, add_to=(into_w, into_b))
    assert aw is into_w and ab is into_b
    torch.testing.assert_close(aw, ref[0] + 1)
    if bias:
        torch.testing.assert_close(ab, ref[1] + 1)


@pytest.mark.parametrize("kind", ["conv", "wide-panels", "depthwise"])
def test_ortho_grad_with_channels_last_and_other_dtype_targets(kind):
    w, b, groups, transposed = _layer(kind, True)
    ref_w, ref_b = ortho_grad(w, b, groups=groups, transposed=transposed)
    w_cl = w.to(memory_format=torch.channels_last)  # no row view of this weight: the reference path
    gw, gb = ortho_grad(w_cl, b, groups=groups, transposed=transposed)
    torch.testing.assert_close(gw, ref_w)
    torch.testing.assert_close(gb, ref_b)
    target = torch.zeros_like(w).to(memory_format=torch.channels_last)
    ortho_grad(w, b, groups=groups, transposed=transposed, add_to=(target, None))
    torch.testing.assert_close(target, ref_w)
    low = torch.zeros_like(w, dtype=torch.float32)  # a target of another dtype is added to after a cast
    ortho_grad(w, b, groups=groups, transposed=transposed, add_to=(low, None))
    torch.testing.assert_close(low, ref_w.float())


def test_ortho_grad_rejects_bad_input():
    with pytest.raises(ValueError, match="norm must be one of"):
        ortho_grad(torch.randn(4, 3), norm="l2")
    with pytest.raises(ValueError, match="groups must be >= 1"):
        ortho_grad(torch.randn(4, 3, 3, 3), groups=0)
    with pytest.raises(ValueError, match=">= 2 dims"):
        filter_matrix_shape((4,))


def test_depthwise_is_one_block_of_kernel_columns():
    blocks = filter_matrix(torch.randn(32, 1, 3, 3), groups=32)
    assert blocks.shape == (1, 32, 9)
    assert gram(blocks).shape == (1, 9, 9)
    assert block_width(blocks.shape) == 9


def test_orthonormality_and_correlation_of_orthogonal_filters():
    m = orthonormal_rows(5, 8)[None] * 3.0  # orthogonal, not normalized: degree is still 1
    assert float(orthonormality_degree(m)) == pytest.approx(1.0)
    assert float(filter_correlation(m)) == pytest.approx(0.0, abs=1e-6)
    correlated = torch.ones(1, 4, 6)
    assert float(orthonormality_degree(correlated)) == pytest.approx(0.25)
    assert float(filter_correlation(correlated)) == pytest.approx(1.0)


def test_layer_weights_sum_to_one():
    w = sqrt_width_weights([16, 64, 256])
    assert sum(w) == pytest.approx(1.0)
    assert w[0] < w[1] < w[2]


def test_paper_schedule():
    assert paper_schedule(0.75, 3) == pytest.approx([0.5, 1 / 3, 1 / 4])
    remaining = 1.0
    for r in paper_schedule(0.6, 4):
        remaining *= 1 - r
    assert remaining == pytest.approx(0.4)
    assert cumulative_schedule(0.75, 3)[-1] == pytest.approx(0.75)
    assert paper_schedule(0.5, 1) == pytest.approx([0.5])


@pytest.mark.parametrize("ratio,rounds", [(1.0, 3), (-0.1, 2), (0.5, 0), (0.5, 1.5)])
def test_schedule_rejects_bad_input(ratio, rounds):
    with pytest.raises(ValueError, match="total_ratio|rounds"):
        paper_schedule(ratio, rounds)


def test_bad_norm_named():
    with pytest.raises(ValueError, match="norm must be one of"):
        ortho_penalty(torch.randn(1, 2, 3), "l2")
