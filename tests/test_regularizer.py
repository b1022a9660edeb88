import pytest
import torch
from torch import nn

from orthoreg_tp import OrthoRegularizer, find_classifier, orthonormality

LAYERS = {
    "conv": lambda b: nn.Conv2d(3, 8, 3, bias=b),
    "conv-tall": lambda b: nn.Conv2d(2, 32, 2, bias=b),  # 32 filters of 8 (+1) entries: G = W^T W
    "grouped": lambda b: nn.Conv2d(4, 8, 3, groups=2, bias=b),
    "depthwise": lambda b: nn.Conv2d(6, 6, 3, groups=6, bias=b),
    "transposed": lambda b: nn.ConvTranspose2d(4, 6, 3, bias=b),
    "grouped-transposed": lambda b: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=b),
    "linear": lambda b: nn.Linear(7, 5, bias=b),
    "linear-tall": lambda b: nn.Linear(3, 9, bias=b),
}


def regularizer_for(layer, **kwargs):
    model = nn.Sequential(layer).double()
    return model, OrthoRegularizer(model, coefficient=0.3, ignore_classifier=False, **kwargs)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("norm", ["l1", "fro"])
def test_regularize_equals_autograd_of_penalty(kind, bias, norm):
    model, reg = regularizer_for(LAYERS[kind](bias), norm=norm)
    params = list(model.parameters())
    autograd = torch.autograd.grad(reg.penalty(), params)
    model.zero_grad(set_to_none=True)
    reg.regularize(model)
    for p, ref in zip(params, autograd):
        torch.testing.assert_close(p.grad, ref)


def test_regularize_adds_to_existing_grad_and_matches_multi_layer_penalty():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.Linear(6, 2),
    ).double()
    reg = OrthoRegularizer(model, coefficient=0.1)
    assert [n for n, _ in reg.layers] == ["0", "2", "4"]  # the classifier (last Linear) is skipped
    assert sum(reg.weights().values()) == pytest.approx(1.0)
    params = [p for _, m in reg.layers for p in m.parameters()]
    ref = torch.autograd.grad(reg.penalty(), params)
    for p in params:
        p.grad = torch.ones_like(p)
    reg.regularize(model)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r + 1)


def test_penalty_zero_for_orthonormal_layers():
    layer = nn.Linear(8, 4, bias=False)
    nn.init.orthogonal_(layer.weight)
    model = nn.Sequential(layer, nn.Linear(4, 2))
    reg = OrthoRegularizer(model, coefficient=1.0)
    assert float(reg.penalty().detach()) < 1e-5
    assert orthonormality(model)["0"] == pytest.approx(1.0, abs=1e-5)
    nn.init.normal_(layer.weight)
    assert float(reg.penalty().detach()) > 0.1


def test_sgd_with_regularizer_lowers_penalty_and_raises_orthonormality():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    reg = OrthoRegularizer(model, coefficient=1e-2)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        p0 = float(reg.penalty())
    o0 = sum(v for k, v in orthonormality(model).items() if k != "8")
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        reg.regularize(model)
        opt.step()
    with torch.no_grad():
        p1 = float(reg.penalty())
    o1 = sum(v for k, v in orthonormality(model).items() if k != "8")
    assert p1 < 0.5 * p0
    assert o1 > o0


def test_follows_pruned_shapes():
    import torch_pruning as tp

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    reg = OrthoRegularizer(model)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[0, 1, 2]).prune()
    assert model[0].weight.shape[0] == 5
    params = [p for _, m in reg.layers for p in m.parameters()]
    ref = torch.autograd.grad(reg.penalty(), params)
    model.zero_grad(set_to_none=True)
    reg.regularize(model)
    for p, r in zip(params, ref):
        assert p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, r)


def _assert_regularize_equals_autograd(model, reg):
    params = [p for _, m in reg.layers for p in (m.weight, m.bias if reg.include_bias else None) if p is not None]
    ref = torch.autograd.grad(reg.penalty(), params)
    model.zero_grad(set_to_none=True)
    reg.regularize(model)
    for p, r in zip(params, ref):
        assert p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, r)


def test_update_after_torch_pruning_replaces_parameters():
    import torch_pruning as tp

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 300, 3),  # 300 filters: the row Gram is computed in panels
        nn.BatchNorm2d(300),
        nn.ReLU(),
        nn.Conv2d(300, 16, 1, bias=True),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.Linear(12, 2),
    ).double()
    reg = OrthoRegularizer(model, coefficient=0.2)
    _assert_regularize_equals_autograd(model, reg)
    old = {id(p) for p in model.parameters()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8, dtype=torch.float64))
    dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(0, 300, 3))).prune()
    dg.get_pruning_group(model[5], tp.prune_conv_out_channels, idxs=[0, 5, 10, 15]).prune()
    assert model[0].weight.shape[0] == 200 and model[5].weight.shape[0] == 12
    assert id(model[0].weight) not in old  # torch-pruning swapped in new parameter objects
    reg.update()
    assert [m for _, m in reg.layers] == [model[0], model[3], model[5], model[8]]
    assert all(id(m.weight) not in old for _, m in reg.layers)  # every regularized layer was touched by the prune
    _assert_regularize_equals_autograd(model, reg)


@pytest.mark.parametrize("include_bias", [True, False])
def test_regularize_channels_last_model_equals_autograd(include_bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3, groups=2), nn.Flatten(), nn.Linear(6, 2)).double()
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    reg = OrthoRegularizer(model, coefficient=0.5, include_bias=include_bias, norm="fro")
    _assert_regularize_equals_autograd(model, reg)


def test_ignored_layers_filter_fn_and_custom_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert [n for n, _ in OrthoRegularizer(model, ignored_layers=[model[1]]).layers] == ["0"]
    assert [n for n, _ in OrthoRegularizer(model, filter_fn=lambda m, n: n != "0").layers] == ["1"]
    reg = OrthoRegularizer(model, layer_weights={"0": 1.0})
    assert reg.weights() == {"0": 1.0, "1": 0.0}


def test_find_classifier_prefers_get_classifier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.proj = nn.Linear(2, 2)

        def get_classifier(self):
            return self.head

    net = Net()
    assert find_classifier(net) is net.head


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"coefficient": -1.0}, "coefficient must be a non-negative"),
        ({"norm": "l2"}, "norm must be one of"),
        ({"layer_weights": "cubic"}, "layer_weights must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthoRegularizer(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), **kwargs)


def test_model_without_conv_or_linear():
    with pytest.raises(ValueError, match="no conv/linear layer"):
        OrthoRegularizer(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))


def test_lazy_regularization_applies_every_kth_call_scaled():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).double()
    eager = OrthoRegularizer(model, coefficient=0.1)
    lazy = OrthoRegularizer(model, coefficient=0.1, every=3)
    eager.regularize(model)
    reference = model[0].weight.grad.clone()
    grads = []
    for _ in range(6):
        model.zero_grad(set_to_none=True)
        lazy.regularize(model)
        grads.append(None if model[0].weight.grad is None else model[0].weight.grad.clone())
    assert [g is not None for g in grads] == [True, False, False, True, False, False]
    torch.testing.assert_close(grads[0], 3 * reference)
    (autograd,) = torch.autograd.grad(eager.penalty(), model[0].weight)
    torch.testing.assert_close(grads[3], 3 * autograd)
    with pytest.raises(ValueError, match="every must be a positive integer"):
        OrthoRegularizer(model, every=0)
