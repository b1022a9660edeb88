import copy
import json
import math

import pytest
import torch
import torch_pruning as tp
from torch import nn

from orthoreg_tp import OrthoRegImportance, filter_correlations, find_classifier, orthonormality
from orthoreg_tp.diagnostics import (
    AdditivityResult,
    additivity,
    correlation_report,
    mask_channels,
    mean_loss,
    rankdata,
    relative_error,
    sample_groups,
    spearman,
)
from orthoreg_tp.engine.models import build_model


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.2)
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.fixture
def net_and_batches(tiny_cnn):
    model = tiny_cnn()
    randomize_bn(model)
    x, y = torch.randn(24, 3, 6, 6), torch.randint(0, 3, (24,))
    return model, [(x[:10], y[:10]), (x[10:], y[10:])]


def full_group(model, layer, example):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    pruner = dg.get_pruner_of_module(layer)
    return dg.get_pruning_group(layer, pruner.prune_out_channels, list(range(pruner.get_out_channels(layer))))


# ------------------------------------------------------------------------------------------------ pure math
@pytest.mark.parametrize(
    "values",
    [[3.0, 1.0, 2.0], [1.0, 1.0, 2.0, 0.5, 2.0, 2.0], [5.0], [0.0, 0.0]],
    ids=["distinct", "ties", "single", "constant"],
)
def test_rankdata_matches_scipy(values):
    stats = pytest.importorskip("scipy.stats")
    expected = torch.as_tensor(stats.rankdata(values), dtype=torch.float64)
    torch.testing.assert_close(rankdata(torch.tensor(values)), expected)


def test_spearman_matches_scipy_and_is_bounded():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(1)
    for n in (3, 7, 40):
        x = torch.randn(n, generator=gen)
        y = x + torch.randn(n, generator=gen)
        y[0] = y[1]  # a tie
        rho = float(spearman(x, y))
        assert -1.0 <= rho <= 1.0
        assert rho == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_spearman_extremes_and_undefined():
    x = torch.arange(6.0)
    assert float(spearman(x, x.exp())) == pytest.approx(1.0)  # monotone, not linear
    assert float(spearman(x, -x)) == pytest.approx(-1.0)
    assert math.isnan(float(spearman(x, torch.ones(6))))
    assert math.isnan(float(spearman(x[:1], x[:1])))
    with pytest.raises(ValueError, match="equal length"):
        spearman(x, x[:3])


def test_relative_error():
    p = torch.tensor([1.0, 2.0, 3.0])
    assert float(relative_error(p, 5 * p, fit_scale=True)) == pytest.approx(0.0, abs=1e-12)
    assert float(relative_error(p, 2 * p)) == pytest.approx(0.5)  # no scale fit: ||p - 2p|| / ||2p||
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # with the least-squares scale the error is in [0, 1]
        err = float(relative_error(torch.randn(10, generator=gen), torch.randn(10, generator=gen), fit_scale=True))
        assert 0.0 <= err <= 1.0 + 1e-12
    assert math.isnan(float(relative_error(p, torch.zeros(3))))
    with pytest.raises(ValueError, match="equal length"):
        relative_error(p, p[:2])


def test_sample_groups_are_distinct_sorted_and_reproducible():
    draws = sample_groups(10, 4, 6, generator=torch.Generator().manual_seed(3))
    assert len(draws) == 6
    for g in draws:
        assert len(g) == 4 and len(set(g)) == 4 and g == sorted(g) and all(0 <= c < 10 for c in g)
    assert draws == sample_groups(10, 4, 6, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="group_size"):
        sample_groups(10, 11, 2, generator=torch.Generator())
    with pytest.raises(ValueError, match="num_groups"):
        sample_groups(10, 2, 0, generator=torch.Generator())


# ------------------------------------------------------------------------------------------------ masking
@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_resnet", "mobilenet_v1"])
def test_masking_equals_physical_pruning(name):
    model = build_model(name, num_classes=5).eval()
    randomize_bn(model)
    x = torch.randn(6, 3, 8, 8)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    groups = list(dg.get_all_groups(ignored_layers=[find_classifier(model)]))
    for group in groups[:6]:
        width = len(group[0].idxs)
        channels = sorted(torch.randperm(width)[: max(1, width // 3)].tolist())
        with mask_channels(group, channels):
            masked = model(x)
        pruned = copy.deepcopy(model)
        dg2 = tp.DependencyGraph().build_dependency(pruned, example_inputs=x[:1])
        root = dict(pruned.named_modules())[dg._module2name[group[0].dep.target.module]]
        dg2.get_pruning_group(root, dg2.get_pruner_of_module(root).prune_out_channels, channels).prune()
        torch.testing.assert_close(masked, pruned.eval()(x), rtol=1e-4, atol=1e-5)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_empty_mask_gives_base_loss(net_and_batches):
    model, batches = net_and_batches
    model.eval()
    group = full_group(model, model[0], batches[0][0][:1])
    base = mean_loss(model, batches)
    with mask_channels(group, []):
        assert mean_loss(model, batches) == base
    with mask_channels(group, [0, 2]):
        assert mean_loss(model, batches) != base


def test_mean_loss_averages_over_samples(net_and_batches):
    model, batches = net_and_batches
    model.eval()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), y))
    assert mean_loss(model, batches) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no samples"):
        mean_loss(model, [])


def test_mask_rejects_layers_that_mix_channels():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    group = full_group(model, model[0], torch.randn(1, 4))
    with pytest.raises(ValueError, match="mixes channels"), mask_channels(group, [1]):
        pass


# ------------------------------------------------------------------------------------------------ additivity
def test_additivity_structure_and_model_unchanged(net_and_batches):
    model, batches = net_and_batches
    model.train()
    state = copy.deepcopy(model.state_dict())
    x = batches[0][0]
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    result = additivity(model, batches, None, group_size=2, num_groups=5, seed=1)
    assert isinstance(result, AdditivityResult)
    assert [entry.name for entry in result.layers] == ["0", "3"]
    assert result.num_samples == 24 and result.base_loss > 0
    for entry in result.layers:
        assert len(entry.groups) == len(entry.predicted) == len(entry.measured) == len(entry.singles) == 5
        assert all(len(g) == 2 for g in entry.groups)
        assert all(p >= 0 for p in entry.predicted)  # squared Fisher scores
        for rho in (entry.stats.spearman, entry.stats.additive_spearman):
            assert math.isnan(rho) or -1.0 <= rho <= 1.0
    assert result.overall.num_groups == 10
    assert -1.0 <= result.overall.spearman <= 1.0
    assert 0.0 <= result.overall.relative_error <= 1.0
    json.dumps(result.to_dict())  # serializable
    assert result["3"] is result.layers[1]
    # the model is unharmed: mode, parameters, buffers, outputs, hooks
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), before, rtol=0, atol=0)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_additivity_is_exact_for_a_loss_linear_in_the_channels():
    # conv -> global pool -> linear with no nonlinearity and a loss linear in the output: removing channels
    # changes the loss by exactly the sum of the single-channel changes.
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x, y = torch.randn(12, 3, 5, 5), torch.zeros(12, dtype=torch.long)
    result = additivity(model, [(x, y)], model[0], group_size=3, num_groups=8, loss_fn=lambda out, _: out.sum(1).mean())
    stats = result.layers[0].stats
    assert stats.additive_relative_error < 1e-5
    assert stats.additive_spearman == pytest.approx(1.0)
    assert stats.additive_ratio == pytest.approx(1.0, rel=1e-5)


def test_additivity_accepts_names_groups_and_lists(net_and_batches):
    model, batches = net_and_batches
    group = full_group(model, model[3], batches[0][0][:1])
    kwargs = dict(group_size=0.5, num_groups=3, measure_singles=False)
    by_name = additivity(model, batches, "3", **kwargs)
    by_group = additivity(model, batches, group, **kwargs)
    by_list = additivity(model, batches, [model[0], "3"], **kwargs)
    assert by_name.layers[0].measured == by_group.layers[0].measured == by_list.layers[1].measured
    assert by_name.layers[0].singles is None and by_name.overall.additive_spearman is None
    assert all(len(g) == 4 for g in by_name.layers[0].groups)  # half of 8 channels


def test_additivity_uses_a_given_importance(net_and_batches):
    model, batches = net_and_batches
    result = additivity(model, batches, model[0], group_size=1, num_groups=6, measure_singles=False,
                        importance=tp.importance.MagnitudeImportance(p=1, group_reduction="sum", normalizer=None))
    l1 = model[0].weight.detach().abs().sum((1, 2, 3)) + model[1].weight.detach().abs() + model[3].weight.detach(
    ).abs().sum((0, 2, 3))
    for g, p in zip(result.layers[0].groups, result.layers[0].predicted):
        assert p == pytest.approx(float(l1[g].sum()), rel=1e-5)


def test_additivity_restores_the_model_on_errors(net_and_batches):
    model, batches = net_and_batches
    model.train()
    calls = {"n": 0}

    def failing_loss(out, target):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, target)

    imp = OrthoRegImportance(min_keep_ratio=None)
    imp.accumulate(model, batches, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        additivity(model, batches, model[0], group_size=2, num_groups=4, importance=imp, loss_fn=failing_loss)
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(layer_or_groups="0", group_size=0), "group_size"),
        (dict(layer_or_groups="0", group_size=1.5), "group_size"),
        (dict(layer_or_groups="0", group_size=7), "group_size"),
        (dict(layer_or_groups="0", group_size="2"), "group_size"),
        (dict(layer_or_groups="0", num_groups=0), "num_groups"),
        (dict(layer_or_groups="nope"), "no layer named 'nope'"),
        (dict(layer_or_groups="1"), "conv/linear"),
        (dict(layer_or_groups=[]), "at least one"),
        (dict(layer_or_groups="0", importance=OrthoRegImportance()), "min_keep_ratio=None"),
    ],
    ids=["size-zero", "size-fraction", "size-too-big", "size-type", "groups", "unknown", "batchnorm", "empty-list",
         "floored-importance"],
)
def test_additivity_bad_arguments(net_and_batches, kwargs, match):
    model, batches = net_and_batches
    kwargs = {"group_size": 2, "num_groups": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        additivity(model, batches, kwargs.pop("layer_or_groups"), **kwargs)


def test_additivity_rejects_empty_data(net_and_batches):
    model, _ = net_and_batches
    with pytest.raises(ValueError, match="no samples"):
        additivity(model, [], "0", group_size=2, num_groups=2)


# ------------------------------------------------------------------------------------------------ report
def test_correlation_report_agrees_with_metrics(tiny_cnn):
    model = tiny_cnn()
    nn.init.orthogonal_(model[3].weight)
    nn.init.zeros_(model[3].bias)
    report = correlation_report(model)
    assert [r.name for r in report] == ["0", "3", "8"]
    assert [r.width for r in report] == [6, 8, 3]
    by_name = {r.name: r for r in report}
    assert by_name["3"].correlation < 1e-5 and by_name["3"].orthonormality == pytest.approx(1.0, abs=1e-5)
    assert by_name["0"].correlation == pytest.approx(filter_correlations(model)["0"])
    assert by_name["0"].orthonormality == pytest.approx(orthonormality(model)["0"])
    json.dumps([r.to_dict() for r in report])
