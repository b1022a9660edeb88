"""Unit tests of the library pieces the recipes are made of (fast; no full recipe runs)."""

import argparse
import json

import pytest
import torch
import torch_pruning as tp
from orthoreg_tp.adapters import replay
from torch import nn

from orthoreg_tp import layer_widths
from orthoreg_tp.engine.config import RecipeConfig
from orthoreg_tp.engine.earlybird import EarlyBirdDetector, mask_distance, pruning_mask
from orthoreg_tp.engine.methods import METHODS, FloorImportance, build_importance, feed_importance_, get_method
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.engine.pruning import (
    count_macs_params,
    load_pruned_model,
    prune_round_,
    round_config,
    save_pruned_model,
)
from orthoreg_tp.engine.records import RunRecord, atomic_torch_save, markdown_table, safe_torch_load
from orthoreg_tp.engine.training import LRSchedule, build_optimizer
from orthoreg_tp.floor import is_protected

X = torch.randn(1, 3, 16, 16)


@pytest.fixture(autouse=True)
def one_thread():  # tiny models: one thread is fastest, and avoids oversubscribing busy CPUs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


# --------------------------------------------------------------------------- schedules and optimizers
def test_lr_schedule_paper_base():
    s = LRSchedule.parse("0.1:80,0.01:40,0.001:40")
    assert s.total_epochs == 160
    assert [s.lr_at(e) for e in (0, 79, 80, 119, 120, 159, 500)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001]
    assert LRSchedule.from_dict(s.to_dict()) == s and str(s) == "0.1:80,0.01:40,0.001:40"


@pytest.mark.parametrize("text", ["0.1", "0.1:x", "0.1:5,0.01", "-0.1:5", "0.1:-1", ""])
def test_lr_schedule_rejects(text):
    with pytest.raises(ValueError):
        LRSchedule.parse(text)


def test_weight_decay_zero_when_regularized():
    net = nn.Linear(3, 2)
    assert build_optimizer(net, lr=0.1, weight_decay=1e-4).param_groups[0]["weight_decay"] == 1e-4
    opt = build_optimizer(net, lr=0.1, weight_decay=1e-4, regularized=True)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[0]["momentum"] == 0.9


# --------------------------------------------------------------------------- config
def test_paper_preset_is_the_paper():
    cfg = RecipeConfig(preset="paper", model="mobilenet_v1", dataset="cifar100").resolved()
    assert cfg.batch_size == 128 and cfg.momentum == 0.9 and cfg.importance_samples == 10_000
    assert cfg.coefficient == 1e-3  # MobileNet-V1; 1e-2 for the others
    assert str(cfg.schedule("ortho")) == "0.1:24,0.01:1"
    assert str(cfg.schedule("eb_retrain")) == "0.1:60,0.01:40,0.001:40"
    assert RecipeConfig(preset="paper", model="vgg13").resolved().coefficient == 1e-2


def test_overrides_win_over_preset_and_round_trip():
    cfg = RecipeConfig(phases={"base": "0.05:3"}, batch_size=32, coefficient=0.0).resolved()
    assert str(cfg.schedule("base")) == "0.05:3" and cfg.batch_size == 32 and cfg.coefficient == 0.0
    assert RecipeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_round_targets():
    assert RecipeConfig(prune_percent=75, rounds=3).round_targets() == pytest.approx([0.5, 2 / 3, 0.75])
    assert RecipeConfig(thresholds=[25, 50]).round_targets() == [0.25, 0.5]


@pytest.mark.parametrize("kwargs,match", [
    ({"prune_percent": 96}, "prune_percent"),
    ({"prune_percent": -1}, "prune_percent"),
    ({"method": "magic"}, "unknown method"),
    ({"rounds": 0}, "rounds"),
    ({"thresholds": [50, 25]}, "thresholds"),
    ({"target_macs": 1.5}, "target_macs"),
    ({"phases": {"warmup": "0.1:1"}}, "unknown phase"),
    ({"recipe": "early_bird", "rounds": 2}, "early_bird"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecipeConfig(**kwargs).validate()


# --------------------------------------------------------------------------- methods and the floor
def test_every_method_prunes_physically_under_the_floor():
    for name, method in sorted(METHODS.items()):
        model = build_model("tiny_cnn", num_classes=10)
        dense = layer_widths(model)
        imp = build_importance(method, dense, seed=0)
        feed_importance_(method, imp, model, batches(2), num_samples=32, progress=False)
        prune_round_(model, X, imp, ratio=0.6)
        imp = build_importance(method, dense, seed=0)  # a new object: the floor still uses the dense widths
        feed_importance_(method, imp, model, batches(2), num_samples=32, progress=False)
        with pytest.warns(UserWarning, match="per-layer floor"):
            report = prune_round_(model, X, imp, ratio=0.9)
        widths = layer_widths(model)
        for layer, w in dense.items():
            if layer != "classifier":
                assert widths[layer] >= int(0.05 * w) + 1, (name, layer)
        assert sum(widths.values()) < sum(dense.values()), name
        assert report.ratio < 0.9, name  # clamped to what the floor allows, instead of emptying layers
        assert model(X).shape == (1, 10)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        get_method("magic")


def test_floor_importance_protects_best_channels():
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 4, 3))
    imp = FloorImportance(tp.importance.MagnitudeImportance(p=1, normalizer=None), {"0": 40})
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, list(range(40)))
    raw, scores = imp.inner(group), imp(group)
    assert int(is_protected(scores).sum()) == 3  # int(0.05 * 40) + 1
    assert set(is_protected(scores).nonzero().view(-1).tolist()) == set(raw.topk(3).indices.tolist())
    assert torch.isfinite(scores).all()


# --------------------------------------------------------------------------- pruning history and checkpoints
def test_replayed_history_and_saved_model_reload(tmp_path):
    model = build_model("tiny_resnet", num_classes=10).eval()
    imp = build_importance(get_method("l2"), layer_widths(model))
    history = [*prune_round_(model, X, imp, ratio=0.4).history, *prune_round_(model, X, imp, ratio=0.3).history]
    save_pruned_model(tmp_path / "m.pt", model, history,
                      {"model": "tiny_resnet", "num_classes": 10, "in_chans": 3, "image_size": 16})
    loaded = load_pruned_model(tmp_path / "m.pt").eval()
    assert layer_widths(loaded) == layer_widths(model)
    assert torch.allclose(loaded(X), model(X), atol=1e-6)
    dense = replay(build_model("tiny_resnet", num_classes=10), X, history)
    assert layer_widths(dense) == layer_widths(model)


def test_target_macs_search():
    model = build_model("tiny_cnn", num_classes=10)
    macs0, _ = count_macs_params(model, X)
    imp = build_importance(get_method("l1"), layer_widths(model))
    report = prune_round_(model, X, imp, target_macs=0.5 * macs0)
    macs, _ = count_macs_params(model, X)
    assert 0.95 * 0.5 * macs0 <= macs <= 0.5 * macs0 and 0 < report.ratio < 1
    assert report.macs_after == macs and report.macs_before == macs0  # one MACs counter


def test_prune_round_arguments():
    model = build_model("tiny_cnn", num_classes=10)
    imp = build_importance(get_method("l1"), layer_widths(model))
    with pytest.raises(ValueError, match="exactly one"):
        prune_round_(model, X, imp)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\), got 1.0"):
        prune_round_(model, X, imp, ratio=1.0)
    with pytest.raises(ValueError, match="needs the current MACs"):
        round_config(target_macs=10)


def test_atomic_checkpoint_is_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save({"w": torch.ones(2), "history": [["conv", True, [1, 2]]], "meta": {"a": None}}, path)
    state = safe_torch_load(path)
    assert state["history"] == [["conv", True, [1, 2]]] and torch.equal(state["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind

    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "unsafe.pt")  # an arbitrary pickled object
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        safe_torch_load(tmp_path / "unsafe.pt")


def test_run_record_epochs_truncate(tmp_path):
    record = RunRecord(tmp_path / "run")
    for i in range(4):
        record.log_epoch({"global_epoch": i, "train_loss": float(i)})
    record.truncate_epochs(2)
    assert [r["global_epoch"] for r in record.epochs()] == [0, 1]
    assert (tmp_path / "run" / "epochs.csv").read_text().count("\n") == 3  # header + 2 rows
    silent = RunRecord(tmp_path / "rank1", enabled=False)
    silent.log_epoch({"global_epoch": 0})
    silent.write_results({"rows": []})
    assert not (tmp_path / "rank1").exists()


def test_markdown_table():
    text = markdown_table([{"method": "l1", "acc": 91.234, "x": None}])
    assert text.splitlines() == ["| method | acc | x |", "|---|---|---|", "| l1 | 91.23 | - |"]


# --------------------------------------------------------------------------- early bird
def test_mask_distance_and_detector():
    a = {"c1": torch.tensor([1, 1, 0, 0]), "c2": torch.tensor([1, 0])}
    b = {"c1": torch.tensor([1, 0, 0, 0]), "c2": torch.tensor([1, 0])}
    assert mask_distance(a, b) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="share no layer"):
        mask_distance(a, {"other": torch.tensor([1])})
    detector = EarlyBirdDetector(threshold=0.1, patience=3)
    flips = [a, b, a, a, a, a, b]
    fired = [detector.update(m, epoch=i) for i, m in enumerate(flips)]
    # distances: 1/6, 1/6, 0, 0, 0 -> three small ones in a row at epoch 5
    assert fired == [False] * 5 + [True, True] and detector.fired_epoch == 5
    clone = EarlyBirdDetector()
    clone.load_state_dict(detector.state_dict())
    assert clone.distances == detector.distances and clone.fired_epoch == 5


def test_pruning_mask_is_a_dry_run():
    model = build_model("tiny_cnn", num_classes=10).train()
    imp = build_importance(get_method("l1"), layer_widths(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = pruning_mask(model, X, imp, ratio=0.5)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(int(m.numel()) for m in mask.values()) == 16 + 32 + 64
    assert sum(int((~m).sum()) for m in mask.values()) == 56
    assert mask_distance(mask, pruning_mask(model, X, imp, ratio=0.5)) == 0.0


def test_prune_round_of_a_timm_model_needing_graph_fixes():
    # FasterNet's partial conv needs orthoreg_tp.adapters' host fixes in the graph build, step and replay.
    import timm

    def fasternet():
        torch.manual_seed(0)
        return timm.create_model("fasternet_t0", pretrained=False, num_classes=10, embed_dim=16,
                                 depths=(1, 1, 1, 1), feature_dim=64).eval()

    model, x = fasternet(), torch.randn(1, 3, 32, 32)
    imp = build_importance(get_method("l1"), layer_widths(model))
    report = prune_round_(model, x, imp, ratio=0.4)
    assert 0.35 < report.channels_removed < 0.45 and model(x).shape == (1, 10)
    replayed = replay(fasternet(), x, report.history)
    assert layer_widths(replayed) == layer_widths(model)
    assert torch.allclose(replayed(x), model(x), atol=1e-5)
