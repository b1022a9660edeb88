"""orthoreg_tp.analyze.sensitivity: group-faithful, restores the model, agrees with the one pruning path."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from orthoreg_tp.adapters import prune, restore, snapshot
from torch import nn

from orthoreg_tp.analyze import SensitivityResult, measure, predicted_deltas, removal_indices, sensitivity
from orthoreg_tp.analyze.prefix_cache import PrefixCache, changed_modules
from orthoreg_tp.analyze.result import spearman
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.importance import OrthoRegImportance, default_loss
from orthoreg_tp.metrics import layer_widths


def _batches(n: int = 2, size: int = 8, side: int = 16, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, side, side, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def _fingerprint(model: nn.Module):
    return ([id(p) for p in model.parameters()], {k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def _assert_unharmed(model: nn.Module, before) -> None:
    ids, state, modes, flags = before
    assert [id(p) for p in model.parameters()] == ids
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags


class CatNet(nn.Module):
    """Two branches concatenated: pruning one branch changes the concat's offsets for the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(F.relu(self.c(y)).mean((2, 3)))


class ScaleNet(nn.Module):
    """A per-channel scale used functionally (an unwrapped parameter the graph replaces when it prunes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.conv(x)) * self.scale.view(1, -1, 1, 1)
        return self.fc(F.relu(self.conv2(h)).mean((2, 3)))


class FixedWidthNet(nn.Module):
    """Its forward refuses any width of ``conv1`` but 8: that group cannot be pruned alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        if h.shape[1] != 8:
            raise RuntimeError(f"width fixed at 8, got {h.shape[1]}")
        return self.fc(F.relu(self.conv2(h)).mean((2, 3)))


# ----------------------------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("level", [0.1, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("floor", [0, 3])
def test_removal_indices_are_the_lowest_scores_above_the_floor(level: float, floor: int) -> None:
    scores = torch.randn(20, generator=torch.Generator().manual_seed(1))
    idxs = removal_indices(scores, level, floor=floor)
    count = min(20 - int(20 * (1 - level)), 20 - floor)  # torch-pruning's count, capped by the floor
    expected = sorted(range(20), key=lambda i: float(scores[i]))[:count]
    assert idxs.tolist() == sorted(expected)


def test_removal_indices_channel_groups_and_round_to() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 4.0, 2.0, 6.0, 9.0])  # two channel groups of 4
    # per-position means over the groups: [4.5, 1.5, 4.5, 4.5] -> position 1 goes from both groups
    assert removal_indices(scores, 0.25, channel_groups=2).tolist() == [1, 5]
    # keep 8 - 3 = 5 rounded up to a multiple of 4 -> 8: nothing removed
    assert removal_indices(torch.arange(8.0), 0.375, round_to=4).numel() == 0
    assert removal_indices(torch.arange(8.0), 0.5, round_to=4).tolist() == [0, 1, 2, 3]
    protected = torch.tensor([1e30, 0.0, 1.0, 2.0])
    assert removal_indices(protected, 0.9).tolist() == [1, 2, 3]


def test_predicted_deltas_against_hand_sums() -> None:
    scores, signed = torch.tensor([9.0, 4.0, 1.0]), torch.tensor([3.0, -2.0, 1.0])
    d = predicted_deltas(scores, signed, torch.tensor([1, 2]))
    assert d == {"predicted_loss_delta": 2.5, "predicted_joint_loss_delta": 0.5, "first_order_loss_delta": 1.0}
    assert set(predicted_deltas(None, None, torch.tensor([0])).values()) == {None}


@pytest.mark.parametrize("levels, num_batches, match", [((0.0,), 1, "levels"), ((0.5, 1.0), 1, "levels"),
                                                         ((), 1, "levels"), ((0.5,), 0, "num_batches")])
def test_bad_options_raise_and_leave_the_model(levels, num_batches, match) -> None:
    model = build_model("tiny_cnn", num_classes=10)
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=match):
        sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), levels=levels, num_batches=num_batches)
    with pytest.raises(ValueError, match="no batches"):
        sensitivity(model, torch.randn(1, 3, 16, 16), [], progress=False)
    _assert_unharmed(model, before)


# ----------------------------------------------------------------------------------------------- the analysis
def test_residual_convolutions_are_one_group_with_a_loss_change() -> None:
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=10)
    result = sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), progress=False)
    stream = [r for r in result.rows if "layers.0.0.conv2" in r["layers"]]
    assert {r["group"] for r in stream} == {stream[0]["group"]}  # one group holds the block's output conv
    assert {"stem.0", "layers.0.0.conv2"} <= set(stream[0]["layers"])  # ... coupled with the stem
    assert sum("stem.0" in r["layers"] for r in result.rows) == len(result.levels)  # and nowhere else
    assert [r["status"] for r in stream] == ["ok"] * 3
    assert all(abs(r["loss_delta"]) > 1e-5 for r in stream)
    assert [r["removed"] for r in stream] == [4, 8, 12]  # 16 channels at 25/50/75%


@pytest.mark.slow
def test_torchvision_resnet18_residual_stream_is_one_group() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    before = _fingerprint(model)
    result = sensitivity(model, torch.randn(1, 3, 32, 32), _batches(n=1, size=4, side=32), levels=(0.5,),
                         progress=False)
    layer1 = [r for r in result.rows if "layer1.0.conv2" in r["layers"]]
    assert len(layer1) == 1 and {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(layer1[0]["layers"])
    assert layer1[0]["status"] == "ok" and abs(layer1[0]["loss_delta"]) > 1e-5
    assert len({r["group"] for r in result.rows}) == 12  # 4 residual streams + 8 inner block convs
    _assert_unharmed(model, before)


@pytest.mark.parametrize("make", [lambda: build_model("tiny_resnet", num_classes=10), CatNet, ScaleNet],
                         ids=["tiny_resnet", "concat", "unwrapped_parameter"])
def test_rows_match_the_one_pruning_path_and_the_model_is_unharmed(make) -> None:
    """Each row's loss equals pruning that group alone through ``adapters.prune`` (a fresh graph each time)."""
    torch.manual_seed(0)
    model = make()
    model.train()
    x, batches = torch.randn(1, 3, 16, 16), _batches()
    before = _fingerprint(model)
    imp = OrthoRegImportance()
    imp.accumulate(model, batches, num_samples=16, progress=False)
    result = sensitivity(model, x, batches, importance=imp, progress=False)
    _assert_unharmed(model, before)
    ok = [r for r in result.rows if r["status"] == "ok"]
    assert len(ok) == len(result.rows) >= 6
    model.eval()
    for row in ok:
        snap = snapshot(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune(model, x, importance=imp, ratio=0.0, global_ranking=False,
                  pruning_ratio_dict={model.get_submodule(row["root"]): row["level"]})
        reference = measure(model, batches, default_loss).loss
        restore(snap)
        assert row["loss"] == pytest.approx(reference, abs=1e-5), row
    model.train()
    again = sensitivity(model, x, batches, importance=imp, progress=False)  # the same after the first analysis
    assert [r["loss"] for r in again.rows] == pytest.approx([r["loss"] for r in result.rows], abs=1e-6)


def test_predicted_loss_change_is_half_the_fisher_scores_of_the_removed_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    batches = _batches(size=16)
    result = sensitivity(model, torch.randn(1, 3, 16, 16), batches, levels=(0.5,), min_keep_ratio=None,
                         progress=False)
    # independent reference: the mean gradient by autograd, theta * g summed over everything channel c removes
    conv, fc = model[0], model[4]
    loss = sum(F.cross_entropy(model(x), y) for x, y in batches) / len(batches)
    gw, gb, gf = torch.autograd.grad(loss, [conv.weight, conv.bias, fc.weight])
    signed = ((conv.weight * gw).sum((1, 2, 3)) + conv.bias * gb + (fc.weight * gf).sum(0)).detach().double()
    removed = torch.argsort(signed.pow(2))[:4]
    (row,) = result.rows
    assert row["removed"] == 4 and result.importance == "orthoreg"
    assert row["predicted_loss_delta"] == pytest.approx(0.5 * float(signed[removed].pow(2).sum()), rel=1e-4)
    assert row["predicted_joint_loss_delta"] == pytest.approx(0.5 * float(signed[removed].sum()) ** 2, rel=1e-4)
    assert row["first_order_loss_delta"] == pytest.approx(-float(signed[removed].sum()), rel=1e-4)


def test_a_group_that_cannot_be_pruned_alone_gets_a_failed_row() -> None:
    torch.manual_seed(0)
    model = FixedWidthNet()
    before = _fingerprint(model)
    result = sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), levels=(0.25, 0.5), progress=False)
    by_root = {r["root"]: r for r in result.rows}
    assert by_root["conv1"]["status"] == "failed" and "width fixed at 8" in by_root["conv1"]["note"]
    assert by_root["conv2"]["status"] == "ok"
    assert "conv1 (failed" in result.summary()
    assert result.layer_ratios(max_loss_delta=1e9, by_name=True) == {"conv1": 0.0, "conv2": 0.5}
    _assert_unharmed(model, before)


def test_without_a_data_gradient_the_ranking_falls_back_to_magnitude() -> None:
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=10).requires_grad_(False)
    before = _fingerprint(model)
    with pytest.warns(UserWarning, match="no data gradient"):
        result = sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), levels=(0.5,), progress=False)
    assert result.importance == "magnitude"
    assert all(r["predicted_loss_delta"] is None and r["status"] == "ok" for r in result.rows)
    _assert_unharmed(model, before)


def test_frozen_parameters_stay_frozen_and_unscored() -> None:
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=10)
    model.get_submodule("stem.0").weight.requires_grad_(False)
    before = _fingerprint(model)
    result = sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), levels=(0.5,), progress=False)
    assert all(r["status"] == "ok" for r in result.rows)
    _assert_unharmed(model, before)


def test_a_given_non_fisher_importance_ranks_without_prediction() -> None:
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=10)
    result = sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), levels=(0.5,), progress=False,
                         importance=tp.importance.GroupMagnitudeImportance())
    assert result.importance == "GroupMagnitudeImportance"
    assert all(r["predicted_loss_delta"] is None for r in result.rows)
    before = _fingerprint(model)
    with pytest.raises(RuntimeError, match="no accumulated"):
        sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), importance=OrthoRegImportance(), progress=False)
    _assert_unharmed(model, before)


class _Stop(BaseException):
    pass


def test_an_interruption_during_a_trial_leaves_the_model_unharmed() -> None:
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=10)
    before = _fingerprint(model)
    calls = []

    def loss_fn(output, target):
        calls.append(1)
        if len(calls) == 7:  # 2 baseline batches, then the trials' batches: stops inside the third trial
            raise _Stop
        return default_loss(output, target)

    with pytest.raises(_Stop):
        sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), loss_fn=loss_fn, progress=False,
                    importance=tp.importance.GroupMagnitudeImportance())
    _assert_unharmed(model, before)


# ----------------------------------------------------------------------------------------------- results
def test_layer_ratios_are_accepted_by_prune_and_prune_those_layers() -> None:
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=10)
    x, batches = torch.randn(1, 3, 16, 16), _batches()
    result = sensitivity(model, x, batches, progress=False)
    deltas = sorted(r["loss_delta"] for r in result.rows)
    ratios = result.layer_ratios(max_loss_delta=deltas[len(deltas) // 2])
    named = result.layer_ratios(max_loss_delta=deltas[len(deltas) // 2], by_name=True)
    assert len(set(named.values())) > 1  # non-uniform
    widths = layer_widths(model)
    imp = OrthoRegImportance()
    imp.accumulate(model, batches, num_samples=16, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(model, x, importance=imp, ratio=0.0, global_ranking=False, pruning_ratio_dict=ratios)
    after = layer_widths(model)
    for name, ratio in named.items():
        assert 1 - after[name] / widths[name] == pytest.approx(ratio, abs=1.0 / widths[name]), name


def test_layer_ratios_keep_the_largest_level_within_the_budget() -> None:
    rows = [{"group": 0, "root": "a", "layers": ["a"], "level": lv, "loss_delta": d, "status": "ok"}
            for lv, d in ((0.25, 0.01), (0.5, 0.2), (0.75, 0.05))]
    rows += [{"group": 1, "root": "b", "layers": ["b"], "level": 0.25, "loss_delta": 0.5, "status": "ok"}]
    result = SensitivityResult(rows=rows, baseline_loss=1.0)
    assert result.layer_ratios(max_loss_delta=0.1, by_name=True) == {"a": 0.25, "b": 0.0}
    assert result.layer_ratios(max_loss_delta=1.0, by_name=True) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match="by_name=True"):
        result.layer_ratios(max_loss_delta=0.1)
    with pytest.raises(ValueError, match="max_loss_delta"):
        result.layer_ratios(max_loss_delta=float("nan"), by_name=True)


def test_files_summary_and_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=10)
    result = sensitivity(model, torch.randn(1, 3, 16, 16), _batches(), levels=(0.5,), progress=False)
    csv_text = result.to_csv(tmp_path / "s.csv").read_text().splitlines()
    assert csv_text[0].startswith("group,root,layers,level") and len(csv_text) == 1 + len(result.rows)
    doc = json.loads(result.to_json(tmp_path / "s.json").read_text())
    assert doc["rows"][0]["layers"] == result.rows[0]["layers"] and doc["importance"] == "orthoreg"
    loaded = SensitivityResult.from_json(tmp_path / "s.json")
    assert loaded.layer_ratios(max_loss_delta=0.1, by_name=True) == result.layer_ratios(max_loss_delta=0.1,
                                                                                        by_name=True)
    assert result.plot(tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = result.summary()
    top = result.groups()[0]["root"]
    assert "most sensitive" in summary and f"1. {top}" in summary


@pytest.mark.slow
@pytest.mark.parametrize("name, side", [("timm:test_vit", 160), ("mobilenet_v1", 16), ("torchvision:mobilenet_v2", 32),
                                        ("timm:convnext_atto", 32)])
def test_every_group_of_library_and_project_models_is_measured(name: str, side: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    before = _fingerprint(model)
    batches = [(torch.randn(2, 3, side, side), torch.randint(0, 10, (2,)))]
    result = sensitivity(model, batches[0][0][:1], batches, levels=(0.5,), progress=False)
    assert len(result.rows) >= 5 and {r["status"] for r in result.rows} == {"ok"}
    assert all(r["removed"] > 0 and r["params_removed"] > 0 for r in result.rows)
    _assert_unharmed(model, before)


def test_spearman_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, generator=g).tolist(), torch.randn(30, generator=g).tolist()
    b[:5] = [1.0] * 5  # ties get their average rank
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1.0, 2.0], [3.0, 3.0]) is None


# ----------------------------------------------------------------------------------------------- prefix cache
def test_prefix_cache_reuses_only_unchanged_blocks_with_equal_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 3)
    cache = PrefixCache(model)
    with cache.recording():
        y = model(x)
    with cache.reusing(unchanged=list(model.children())):
        model(x).add_(1.0)  # a caller editing the output in place does not touch the record
    with cache.reusing(unchanged=list(model.children())):
        assert torch.equal(model(x), y) and cache.hits == 3
    with cache.reusing(unchanged=list(model.children())):
        model(x + 1.0)  # other inputs: every block runs
        assert cache.hits == 0
    assert all("forward" not in vars(m) for m in model.children())
    snap = snapshot(model)
    model[2].bias = nn.Parameter(torch.zeros(2))
    assert changed_modules(snap.modules) == {model[2]}


@pytest.mark.parametrize("make", [lambda: build_model("tiny_resnet", num_classes=10), CatNet],
                         ids=["tiny_resnet", "concat"])
def test_prefix_cache_gives_the_same_rows(make) -> None:
    torch.manual_seed(0)
    model, x, batches = make(), torch.randn(1, 3, 16, 16), _batches()
    cached = sensitivity(model, x, batches, progress=False)
    plain = sensitivity(model, x, batches, progress=False, prefix_cache=False)
    assert [r["loss"] for r in cached.rows] == [r["loss"] for r in plain.rows]
