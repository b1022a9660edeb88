"""The one pruning path: never report success without doing the work (issue 9, items 1 and 3)."""

from __future__ import annotations

import warnings

import orthoreg_tp.adapters.api as api
import pytest
import torch
import torch_pruning as tp
from orthoreg_tp.adapters import PruneConfig, PruningError, count_macs_params, prune, replay
from torch import nn

from orthoreg_tp import FloorImportance, OrthoRegImportance, OrthoRegPruner, keep_floor, layer_widths
from orthoreg_tp.engine import pruning as engine_pruning
from orthoreg_tp.floor import PROTECTED_SCORE, is_protected

X = torch.randn(2, 3, 8, 8)
WIDTHS = {"0": 16, "3": 32, "6": 8}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cnn() -> nn.Sequential:
    """Three convs of different widths (16, 32, 8) and a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


def raw_l1() -> tp.importance.Importance:
    return tp.importance.MagnitudeImportance(p=1, normalizer=None)  # not comparable across layers: floors matter


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor], params: list[int]) -> bool:
    now = model.state_dict()
    return (now.keys() == before.keys() and all(torch.equal(before[k], now[k]) for k in before)
            and [id(p) for p in model.parameters()] == params)


# ------------------------------------------------------------------------------------------------ errors surface
def test_unaccumulated_importance_raises_its_error_and_restores_the_model():
    model = cnn()
    before, params = state(model), [id(p) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="OrthoRegImportance has no accumulated gradients"):
        prune(model, X, importance=OrthoRegImportance(), ratio=0.5)
    assert unchanged(model, before, params)


def test_importance_failing_on_one_layer_is_not_repaired_away():
    class Picky(tp.importance.Importance):
        def __call__(self, group):
            if group[0].dep.target.module.out_channels == 32:
                raise ValueError("cannot score a layer of 32")
            return raw_l1()(group)

    model = cnn()
    before, params = state(model), [id(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="cannot score a layer of 32"):
        prune(model, X, importance=Picky(), ratio=0.5)
    assert unchanged(model, before, params)


def test_positive_ratio_removing_nothing_raises_why():
    one_layer = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()  # its only layer is the output layer
    with pytest.raises(PruningError, match="nothing prunable"):
        prune(one_layer, X, importance=raw_l1(), ratio=0.5)
    assert one_layer[0].out_channels == 8
    model = cnn()
    with pytest.raises(PruningError, match="per-layer floor is reached: all 56 ranked channels are protected"):
        prune(model, X, importance=raw_l1(), ratio=0.5, min_keep_ratio=0.99)
    with pytest.raises(PruningError, match="ratio 1e-18 of 56 ranked channels rounds to zero channels"):
        prune(model, X, importance=raw_l1(), ratio=1e-18)
    assert layer_widths(model) == {**WIDTHS, "11": 4}


def test_frozen_blocks_are_warned_about():
    class HardCoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)).view(-1, 16))

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), HardCoded()).eval()
    with pytest.warns(UserWarning, match=r"kept 1 block\(s\) unpruned after failed attempts: 4 \("):
        report = prune(model, torch.randn(2, 3, 12, 12), importance=raw_l1(), ratio=0.5)
    assert report.frozen and model[4].conv.out_channels == 16


# ------------------------------------------------------------------------------------------------ ratio grid
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.94, 0.97, 0.99]


@pytest.mark.parametrize("global_ranking", [True, False])
def test_removed_channels_grow_with_the_ratio_and_every_layer_keeps_its_floor(global_ranking):
    removed = []
    for ratio in RATIOS:
        model = cnn()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ratios beyond the floor are capped with a warning
            report = prune(model, X, importance=raw_l1(), ratio=ratio, global_ranking=global_ranking)
        widths = layer_widths(model)
        for name, width in WIDTHS.items():
            assert widths[name] >= keep_floor(width, 0.05), (ratio, name, widths)
        removed.append(sum(WIDTHS.values()) - sum(widths[n] for n in WIDTHS))
        assert report.channels_removed > 0 and model(X).shape == (2, 4)
    assert removed == sorted(removed), removed
    assert removed[-1] == sum(WIDTHS.values()) - sum(keep_floor(w, 0.05) for w in WIDTHS.values())


def test_default_is_global_ranking_per_layer_is_an_option():
    model = cnn()
    report = prune(model, X, importance=raw_l1(), ratio=0.5)
    assert report.config["global_ranking"] is True
    local = cnn()
    prune(local, X, importance=raw_l1(), ratio=0.5, global_ranking=False)
    assert [local[i].out_channels for i in (0, 3, 6)] == [8, 16, 4]  # every layer loses half


def test_ratio_beyond_the_floor_is_capped_with_a_warning():
    model = cnn()
    with pytest.warns(UserWarning, match="ratio 0.99 would cut into the per-layer floor"):
        report = prune(model, X, importance=raw_l1(), ratio=0.99)
    assert report.requested_ratio == 0.99 and report.ratio < 0.99
    assert [model[i].out_channels for i in (0, 3, 6)] == [keep_floor(w, 0.05) for w in WIDTHS.values()]


# ------------------------------------------------------------------------------------------------ one path
def test_budget_search_prepares_once_and_builds_one_pruner_per_trial(monkeypatch):
    specs, built = [], []
    real = api.build_spec
    monkeypatch.setattr(api, "build_spec", lambda *a, **k: specs.append(1) or real(*a, **k))

    class Counting(tp.pruner.MetaPruner):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["pruning_ratio"])
            super().__init__(*args, **kwargs)

    model = cnn()
    macs0, _ = count_macs_params(model, X)
    report = prune(model, X, importance=raw_l1(), target=("macs", 0.3), tolerance=0.1, pruner_class=Counting)
    assert len(specs) == 1 and len(report.trials) >= 2
    assert built == [0.0] + [r for r, _ in report.trials]  # the ranking probe, then one pruner per trial
    assert 0.9 * 0.3 <= report.macs_fraction <= 0.3
    assert report.macs_before == macs0 and report.macs_after == count_macs_params(model, X)[0]


def test_one_macs_counter_for_reports_and_recipes():
    assert engine_pruning.count_macs_params is count_macs_params
    model = cnn()
    report = engine_pruning.prune_round_(model, X[:1], FloorImportance(raw_l1(), layer_widths(model)), ratio=0.5)
    assert (report.macs_after, report.params_after) == count_macs_params(model, X[:1])


def test_dry_run_leaves_the_model_and_replay_rebuilds_the_report():
    model = cnn().train()
    before, params = state(model), [id(p) for p in model.parameters()]
    report = prune(model, X, importance=raw_l1(), ratio=0.5, dry_run=True)
    assert unchanged(model, before, params) and model.training and model[1].training
    assert report.dry_run and report.history and report.channels_removed == pytest.approx(0.5, abs=0.02)
    pruned = replay(cnn(), X, report.history)
    assert {k: v[1] for k, v in report.widths.items()} == layer_widths(pruned)
    assert count_macs_params(pruned, X) == (report.macs_after, report.params_after)


def test_seeded_random_importance_is_repeatable_and_leaves_the_rng_alone():
    model = cnn()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a = prune(model, X, importance=tp.importance.RandomImportance(), ratio=0.5, seed=7, dry_run=True)
    b = prune(model, X, importance=tp.importance.RandomImportance(), ratio=0.5, seed=7, dry_run=True)
    assert a.history == b.history
    assert torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------------------------------------ config
def test_prune_config_round_trip_and_validation():
    cfg = PruneConfig(target=["params", 0.4], global_ranking=False, round_to=4, seed=3)
    assert cfg.target == ("params", 0.4) and PruneConfig.from_dict(cfg.to_dict()) == cfg
    for kwargs, match in [
        (dict(ratio=0.5, min_keep_ratio=1.0), r"min_keep_ratio must be in \[0, 1\) or None, got 1.0"),
        (dict(ratio=0.5, round_to=0), "round_to must be a positive integer, .auto. or None, got 0"),
        (dict(ratio=0.5, tolerance=0.0), r"tolerance must be in \(0, 1\), got 0.0"),
        (dict(ratio=0.5, max_repairs=-1), "max_repairs must be a non-negative int, got -1"),
        (dict(ratio=0.5, global_ranking="yes"), "global_ranking must be True or False, got 'yes'"),
        (dict(ratio=0.5, seed=1.5), "seed must be an int or None, got 1.5"),
        (dict(target=("macs", 0.0)), r"target fraction must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            PruneConfig(**kwargs)
    with pytest.raises(ValueError, match=r"unknown PruneConfig keys, got \['speed'\]"):
        PruneConfig.from_dict({"ratio": 0.5, "speed": 1})
    with pytest.raises(ValueError, match="give either config= or the options"):
        prune(cnn(), X, importance=raw_l1(), config=PruneConfig(ratio=0.5), ratio=0.3)


def test_config_and_keywords_prune_alike():
    a, b = cnn(), cnn()
    prune(a, X, importance=raw_l1(), config=PruneConfig(ratio=0.6, round_to=2))
    prune(b, X, importance=raw_l1(), ratio=0.6, round_to=2)
    assert layer_widths(a) == layer_widths(b)
    assert all(w % 2 == 0 for n, w in layer_widths(a).items() if n in WIDTHS)


# ------------------------------------------------------------------------------------------------ toolbox
def test_orthoreg_pruner_prunes_after_an_early_failed_step():
    model = cnn()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    pruner = OrthoRegPruner(model, x[:1], pruning_ratio=0.5, ignored_layers=[model[11]])
    with pytest.raises(RuntimeError, match="accumulate"):
        pruner.step()
    assert pruner.current_step == 0
    pruner.importance.accumulate(model, [(x, y)], num_samples=8, progress=False)
    pruner.step()
    assert pruner.achieved_ratio == pytest.approx(0.5, abs=0.02)


def two_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def regularized_grads(importance) -> list[torch.Tensor]:
    model = two_convs()
    pruner = tp.pruner.GroupNormPruner(model, X, importance=importance, pruning_ratio=0.5,
                                       ignored_layers=[model[6]])
    nn.functional.cross_entropy(model(X), torch.tensor([0, 1])).backward()
    pruner.regularize(model)
    return [p.grad for p in model.parameters()]


def test_floor_scores_stay_finite_for_other_torch_pruning_components():
    class InfiniteFloor(tp.importance.Importance):  # the old floor: protected channels scored +inf
        def __call__(self, group):
            scores = raw_l1()(group).clone()
            scores[scores.argmax()] = float("inf")
            return scores

    assert any(not torch.isfinite(g).all() for g in regularized_grads(InfiniteFloor()))  # the defect
    floor = FloorImportance(raw_l1(), min_keep_ratio=0.05)
    assert all(torch.isfinite(g).all() for g in regularized_grads(floor))


def test_global_ranking_still_protects_floor_channels():
    model = two_convs()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # plain global L1 ranking would empty the second conv
    imp = FloorImportance(raw_l1(), layer_widths(model))
    graph = tp.DependencyGraph().build_dependency(model, X)
    group = graph.get_pruning_group(model[2], tp.prune_conv_out_channels, list(range(16)))
    scores = imp(group)
    assert int(is_protected(scores).sum()) == keep_floor(16, 0.05) and scores.max() == PROTECTED_SCORE
    prune(model, X, importance=imp, ratio=0.6)
    assert model[2].out_channels == keep_floor(16, 0.05)




@pytest.mark.parametrize("entry", ["prune", "build_pruner"])
def test_an_importance_name_instead_of_an_object_is_refused_and_the_model_untouched(entry):
    from orthoreg_tp.adapters import build_pruner, prune

    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), torch.randn(1, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="importance must be a torch-pruning importance object.*got str: 'magnitude'"):
        if entry == "prune":
            prune(model, x, ratio=0.5, importance="magnitude")
        else:
            build_pruner(model, x, importance="magnitude", pruning_ratio=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
