import math

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from orthoreg_tp import (
    FisherImportance,
    GraSPImportance,
    OrthoRegImportance,
    RDTImportance,
    TFOImportance,
    find_classifier,
    prunable_channels,
)


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def reference_mean_grad(model, x, y):
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


@pytest.fixture
def net_and_data(tiny_cnn):
    torch.manual_seed(0)
    model = tiny_cnn(3, (4, 6), 3).double()
    for bn in (model[1], model[4]):  # non-trivial affine parameters
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias)
    x, y = torch.randn(10, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    return model, x, y


def conv1_group(model):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 6, 6, dtype=torch.float64))
    return dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(4)))


@pytest.mark.parametrize("scope", ["group", "filter"])
def test_equals_hand_written_loop(net_and_data, scope):
    model, x, y = net_and_data
    imp = OrthoRegImportance(scope=scope, min_keep_ratio=None)
    imp.accumulate(model, batches(x, y, 3), num_samples=10, progress=False)  # uneven batches: 3+3+3+1
    g = reference_mean_grad(model, x, y)
    p = dict(model.named_parameters())
    expected = []
    for c in range(4):
        s = (p["0.weight"][c] * g["0.weight"][c]).sum() + p["0.bias"][c] * g["0.bias"][c]
        if scope == "group":
            s = s + p["1.weight"][c] * g["1.weight"][c] + p["1.bias"][c] * g["1.bias"][c]
            s = s + (p["3.weight"][:, c] * g["3.weight"][:, c]).sum()
        expected.append(float(s.detach()) ** 2)
    scores = imp(conv1_group(model))
    assert scores.shape == (4,)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-12)


def test_accumulate_grad_matches_accumulate_and_is_invariant_to_repetition(net_and_data):
    model, x, y = net_and_data
    a = OrthoRegImportance(min_keep_ratio=None)
    a.accumulate(model, batches(x, y, 4), num_samples=10, progress=False)
    b = OrthoRegImportance(min_keep_ratio=None)
    model.eval()
    for _ in range(3):  # three passes over the same data average to the same gradient
        for xb, yb in batches(x, y, 5):
            model.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            b.accumulate_grad(model, num_samples=len(yb))
    group = conv1_group(model)
    torch.testing.assert_close(a(group), b(group), rtol=1e-4, atol=1e-12)
    assert torch.equal(torch.argsort(a(group)), torch.argsort(b(group)))


def test_num_samples_truncates(net_and_data):
    model, x, y = net_and_data
    imp = OrthoRegImportance()
    assert imp.accumulate(model, batches(x, y, 4), num_samples=6, progress=False) == 6
    assert imp.num_samples == 6


def test_pruning_before_accumulation_raises(net_and_data):
    model, _, _ = net_and_data
    with pytest.raises(RuntimeError, match="no accumulated gradients.*accumulate"):
        OrthoRegImportance()(conv1_group(model))


def test_stale_accumulation_after_pruning_raises(net_and_data):
    model, x, y = net_and_data
    imp = OrthoRegImportance()
    imp.accumulate(model, [(x, y)], num_samples=10, progress=False)
    group = conv1_group(model)
    group._DG.get_pruning_group(model[3], tp.prune_conv_out_channels, idxs=[0]).prune()
    with pytest.raises(RuntimeError, match="pruned since the last accumulation"):
        imp(group._DG.get_pruning_group(model[3], tp.prune_conv_out_channels, idxs=list(range(5))))
    imp.reset()
    imp.accumulate(model, [(x, y)], num_samples=10, progress=False)
    assert imp(group._DG.get_pruning_group(model[3], tp.prune_conv_out_channels, idxs=list(range(5)))).shape == (5,)


def test_nan_gradients_raise(net_and_data):
    model, x, y = net_and_data
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        OrthoRegImportance().accumulate(model, [(x, y)], num_samples=10, progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"scope": "layer"}, "scope must be"), ({"min_keep_ratio": 1.5}, "min_keep_ratio must be")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthoRegImportance(**kwargs)


def test_bad_num_samples(net_and_data):
    model, x, y = net_and_data
    with pytest.raises(ValueError, match="num_samples must be positive"):
        OrthoRegImportance().accumulate(model, [(x, y)], num_samples=0)


def vgg_with_bias(num_classes=10):
    layers, c = [], 3
    for w in (16, 16, "M", 32, 32, "M", 64):
        if w == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=True), nn.ReLU(), nn.BatchNorm2d(w)]
            c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "vgg-bias": vgg_with_bias,
}


def prune_globally(model, imp, ratio, x, **kwargs):
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=imp,
        global_pruning=True,
        pruning_ratio=ratio,
        max_pruning_ratio=0.95,
        ignored_layers=[find_classifier(model)],
        **kwargs,
    )
    before = prunable_channels(pruner)
    widths0 = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruner.step()
    return pruner, 1 - prunable_channels(pruner) / before, widths0


@pytest.mark.parametrize("name", list(MODELS))
def test_metapruner_global_pruning_hits_ratio_and_floor(name):
    model = MODELS[name]()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    imp = OrthoRegImportance()
    imp.accumulate(model, [(x, y)], num_samples=8, progress=False)
    params0 = sum(p.numel() for p in model.parameters())
    ratio = 0.5
    pruner, achieved, widths0 = prune_globally(model, imp, ratio, x[:1])
    assert achieved == pytest.approx(ratio, abs=0.01)
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            assert m.out_channels >= int(0.05 * widths0[n]) + 1, n
    out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) < 0.6 * params0


def test_floor_holds_where_torch_pruning_alone_undershoots():
    """A layer with tiny scores: without the floor torch-pruning drops it whole and undershoots the target."""
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))

    def run(min_keep_ratio):
        torch.manual_seed(0)
        model = vgg_with_bias()
        with torch.no_grad():
            model[3].weight.mul_(1e-4)  # the second conv's filters barely matter
            model[3].bias.zero_()
        imp = OrthoRegImportance(min_keep_ratio=min_keep_ratio)
        imp.accumulate(model, [(x, y)], num_samples=16, progress=False)
        _, achieved, widths0 = prune_globally(model, imp, 0.6, x[:1])
        return model, achieved

    model, achieved = run(0.05)
    assert achieved == pytest.approx(0.6, abs=0.01)
    assert model[3].out_channels == int(0.05 * 16) + 1
    _, achieved_without = run(None)
    assert achieved_without < 0.55


def test_depthwise_convs_are_scored():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    imp = OrthoRegImportance(min_keep_ratio=None)
    imp.accumulate(model, [(x, y)], num_samples=4, progress=False)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    dw = model.features[2].conv[1][0]
    assert dw.groups == dw.out_channels
    group = dg.get_pruning_group(dw, tp.prune_depthwise_conv_out_channels, idxs=list(range(dw.out_channels)))
    full = imp(group)
    with torch.no_grad():
        dw.weight.zero_()  # removing the depthwise filters' contribution changes the score
    assert not torch.allclose(full, imp(group), rtol=1e-3, atol=0.0)


def test_baselines_score_and_prune():
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for imp_cls in (FisherImportance, TFOImportance, GraSPImportance, RDTImportance):
        torch.manual_seed(0)
        model = vgg_with_bias()
        imp = imp_cls()
        imp.accumulate(model, batches(x, y, 4), num_samples=8, progress=False)
        _, achieved, _ = prune_globally(model, imp, 0.4, x[:1])
        assert achieved == pytest.approx(0.4, abs=0.02), imp_cls.__name__
        assert torch.isfinite(model(x)).all()


def test_grasp_matches_double_backprop_reference(tiny_cnn):
    torch.manual_seed(0)
    model = tiny_cnn(3, (4, 6), 3).double()
    x, y = torch.randn(6, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    imp = GraSPImportance(temperature=2.0, min_keep_ratio=None)
    imp.accumulate(model, [(x, y)], num_samples=6, progress=False)
    model.eval()
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x) / 2.0, y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    hg = torch.autograd.grad(sum((gi * gi.detach()).sum() for gi in g), params)
    w, b = params[0], params[1]
    expected = (w * hg[0]).flatten(1).sum(1) + b * hg[1]
    expected = expected + params[2] * hg[2] + params[3] * hg[3] + (params[4] * hg[4]).sum((0, 2, 3))
    torch.testing.assert_close(imp(conv1_group(model)).double(), expected.detach(), rtol=1e-4, atol=1e-10)


def test_rdt_matches_per_sample_loop(tiny_cnn):
    torch.manual_seed(0)
    model = tiny_cnn(3, (4, 6), 3).double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    imp = RDTImportance(scope="filter", min_keep_ratio=None, seed=3)
    imp.accumulate(model, [(x, torch.zeros(5, dtype=torch.long))], num_samples=5, progress=False)
    gen = torch.Generator().manual_seed(3)
    model.eval()
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(model(x).float(), 1), 1, generator=gen).squeeze(1)
    fw, fb = torch.zeros_like(model[0].weight), torch.zeros_like(model[0].bias)
    for i in range(5):
        gw, gb = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), sampled[i : i + 1]),
            [model[0].weight, model[0].bias],
        )
        fw += gw**2
        fb += gb**2
    expected = (fw.flatten(1).sum(1) + fb) / 5
    torch.testing.assert_close(imp(conv1_group(model)).double(), expected, rtol=1e-4, atol=1e-12)


def test_accumulate_restores_train_mode(net_and_data):
    model, x, y = net_and_data
    model.train()
    OrthoRegImportance().accumulate(model, [(x, y)], num_samples=10, progress=False)
    assert model.training
    assert math.isfinite(float(model(x).sum().detach()))


def test_float32_accumulation_owns_batch_tensors_but_never_user_gradients(tiny_cnn):
    from orthoreg_tp.accumulate import ParamStatistics

    p, t = nn.Parameter(torch.zeros(3)), torch.ones(3)
    stats = ParamStatistics()
    stats.add(p, t, num_samples=4, owned=True)  # a temporary: becomes the running sum, no copy
    assert torch.equal(t, torch.full((3,), 4.0)) and torch.equal(stats.mean(p), torch.ones(3))
    torch.manual_seed(0)
    model = tiny_cnn(3, (4, 6), 3)  # float32: the owned path
    x, y = torch.randn(10, 3, 6, 6), torch.randint(0, 3, (10,))
    for sizes in (10, 4):  # one batch (sums taken over in place), then several (added in place)
        imp = OrthoRegImportance(min_keep_ratio=None)
        imp.accumulate(model, batches(x, y, sizes), num_samples=10, progress=False)
        ref = reference_mean_grad(model, x, y)
        for name, param in model.named_parameters():
            torch.testing.assert_close(imp.stats.mean(param), ref[name], rtol=1e-4, atol=1e-6)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    imp = OrthoRegImportance(min_keep_ratio=None)
    imp.accumulate_grad(model, num_samples=10)
    imp.accumulate_grad(model, num_samples=10)
    for n, q in model.named_parameters():
        assert torch.equal(q.grad, grads[n])  # the user's .grad is read, never modified
    consumed = OrthoRegImportance(min_keep_ratio=None)
    consumed.accumulate_grad(model, num_samples=10, consume=True)  # takes the .grad tensors over
    for n, q in model.named_parameters():
        assert q.grad is None
        torch.testing.assert_close(consumed.stats.mean(q), grads[n])
