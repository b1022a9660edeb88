"""Starting from trained weights (--checkpoint), distillation, and the training options, through the recipes."""

import json

import pytest
import torch
from test_recipes import ITERATIVE, TINY
from torch.utils.data import DataLoader

from orthoreg_tp import layer_widths
from orthoreg_tp.engine.config import PRESETS, RecipeConfig
from orthoreg_tp.engine.data import build_datasets
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.engine.pruning import load_pruned_model
from orthoreg_tp.engine.records import safe_torch_load
from orthoreg_tp.engine.training import LRSchedule, build_optimizer, evaluate, scheduled_lr, train_one_epoch
from orthoreg_tp.engine.weights import model_from_state


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(*argv):
    return ITERATIVE.main(ITERATIVE.get_args_parser().parse_args([*TINY, *argv]))  # our --phase wins


def phases(out):
    return [json.loads(line)["phase"] for line in (out / "epochs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny_cnn trained on digits for two epochs, saved as a plain state dict, and its measured accuracy."""
    torch.manual_seed(0)
    train_set, test_set, _ = build_datasets("digits", image_size=16)
    model = build_model("tiny_cnn", num_classes=10)
    opt = build_optimizer(model, lr=0.05)
    for _ in range(2):
        train_one_epoch(model, DataLoader(train_set, batch_size=64, shuffle=True), opt, device=torch.device("cpu"),
                        progress=False)
    path = tmp_path_factory.mktemp("trained") / "my.pt"
    torch.save(model.state_dict(), path)
    acc = evaluate(model, DataLoader(test_set, batch_size=256), device=torch.device("cpu"))["acc"]
    assert acc > 60.0
    return path, acc


def test_checkpoint_start_measures_it_skips_base_and_prunes(tmp_path, trained):
    path, acc = trained
    out = tmp_path / "run"
    results = run("--checkpoint", str(path), "--method", "l1", "--prune-percent", "50", "--output-dir", str(out),
                  "--phase", "retrain=0.01:1")
    assert results["initial_test_acc"] == pytest.approx(acc, abs=1e-9)
    assert results["rows"][0]["test_acc"] == pytest.approx(acc, abs=1e-9)  # round 0 = the trained start, untouched
    assert phases(out) == ["retrain"]  # no base phase
    assert json.loads((out / "config.json").read_text())["checkpoint"] == str(path)
    # a pruned checkpoint of this project starts a second run from the pruned structure
    pruned = out / "model_round1.pt"
    again = run("--checkpoint", str(pruned), "--method", "l1", "--prune-percent", "30",
                "--output-dir", str(tmp_path / "again"), "--phase", "retrain=0.01:1")
    assert again["initial_test_acc"] == pytest.approx(results["rows"][1]["test_acc"], abs=1e-9)
    assert again["dense_params"] == results["rows"][1]["params"] > again["rows"][1]["params"]
    final = load_pruned_model(tmp_path / "again" / "model_round1.pt")  # the full history since the dense model
    assert sum(p.numel() for p in final.parameters()) == again["rows"][1]["params"]


def test_train_base_trains_from_the_checkpoint(tmp_path, trained):
    out = tmp_path / "run"
    results = run("--checkpoint", str(trained[0]), "--train-base", "--method", "l1", "--prune-percent", "30",
                  "--output-dir", str(out), "--phase", "base=0.01:1", "--phase", "retrain=0.01:1")
    assert phases(out) == ["base", "retrain"] and results["initial_test_acc"] == pytest.approx(trained[1])


def test_distill_teacher_is_the_model_before_the_first_prune(tmp_path):
    out = tmp_path / "kd"
    results = run("--method", "l1", "--prune-percent", "60", "--rounds", "2", "--distill", "--distill-alpha", "0.7",
                  "--output-dir", str(out), "--phase", "base=0.1:2", "--phase", "retrain=0.1:1")
    ckpt = safe_torch_load(out / "checkpoint.pt")
    before_prune = safe_torch_load(out / "model_round0.pt")["model"]  # l1: nothing trains between round 0 and prune
    assert ckpt["teacher"].keys() == before_prune.keys()
    assert all(torch.equal(ckpt["teacher"][k], v) for k, v in before_prune.items())  # bit-identical after the run
    teacher = model_from_state("tiny_cnn", 10, 3, torch.zeros(1, 3, 16, 16), [], ckpt["teacher"])  # strict load
    assert layer_widths(teacher) == layer_widths(build_model("tiny_cnn", num_classes=10))  # dense widths
    assert results["rows"][-1]["params"] < results["rows"][0]["params"]  # while the student was pruned
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [e["distilled"] for e in epochs] == [False, False, True, True]
    config = json.loads((out / "config.json").read_text())
    assert (config["distill"], config["distill_alpha"], config["distill_temperature"]) == (True, 0.7, 4.0)


def test_training_options_reach_the_epochs(tmp_path):
    out = tmp_path / "opts"
    run("--method", "l1", "--prune-percent", "30", "--optimizer", "adamw", "--lr-schedule", "cosine",
        "--warmup-epochs", "1", "--label-smoothing", "0.1", "--output-dir", str(out),
        "--phase", "base=0.003:3", "--phase", "retrain=0.001:2")
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    base, retrain = LRSchedule.parse("0.003:3"), LRSchedule.parse("0.001:2")
    expected = [scheduled_lr(base, e, shape="cosine", warmup_epochs=1) for e in range(3)] + \
        [scheduled_lr(retrain, e, shape="cosine", warmup_epochs=1) for e in range(2)]
    assert [e["lr"] for e in epochs] == pytest.approx(expected)
    assert expected[:3] == pytest.approx([0.0015, 0.003, 0.0015])
    config = json.loads((out / "config.json").read_text())
    assert (config["optimizer"], config["lr_schedule"], config["warmup_epochs"], config["label_smoothing"]) == \
        ("adamw", "cosine", 1, 0.1)
    assert epochs[-1]["test_acc"] > 30.0  # AdamW at 1e-3 learns digits too


def test_paper_preset_keeps_its_exact_schedule():
    cfg = RecipeConfig(preset="paper", model="vgg13", dataset="cifar100").resolved()
    assert (cfg.optimizer, cfg.lr_schedule, cfg.warmup_epochs, cfg.label_smoothing, cfg.distill) == \
        ("sgd", "step", 0, 0.0, False)
    for phase, text in PRESETS["paper"]["phases"].items():
        sched = LRSchedule.parse(text)
        lrs = [scheduled_lr(cfg.schedule(phase), e, shape=cfg.lr_schedule, warmup_epochs=cfg.warmup_epochs)
               for e in range(sched.total_epochs)]
        pieces = [lr for lr, n in zip(sched.lrs, sched.epochs) for _ in range(n)]
        assert lrs == pieces, phase
    opt = build_optimizer(torch.nn.Linear(2, 2), lr=0.1, optimizer=cfg.optimizer, momentum=cfg.momentum)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


def test_schedules_by_hand():
    s = LRSchedule.parse("0.1:2,0.01:2")
    assert [scheduled_lr(s, e) for e in range(4)] == [0.1, 0.1, 0.01, 0.01]
    assert [scheduled_lr(s, e, shape="cosine") for e in range(4)] == pytest.approx(
        [0.1, 0.05 * (1 + 2 ** -0.5), 0.05, 0.05 * (1 - 2 ** -0.5)])
    assert [scheduled_lr(s, e, warmup_epochs=2) for e in range(4)] == pytest.approx([0.1 / 3, 0.2 / 3, 0.01, 0.01])
    assert [scheduled_lr(s, e, shape="cosine", warmup_epochs=2) for e in range(4)] == pytest.approx(
        [0.1 / 3, 0.2 / 3, 0.1, 0.05])
    assert isinstance(build_optimizer(torch.nn.Linear(2, 2), lr=1e-3, optimizer="adamw"), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(torch.nn.Linear(2, 2), lr=1e-3, optimizer="lion")


def test_label_smoothing_is_the_training_loss():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = float(torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.2))
    opt = build_optimizer(model, lr=0.1)
    stats = train_one_epoch(model, [(x, y)], opt, device=torch.device("cpu"), progress=False, label_smoothing=0.2)
    assert stats["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"pretrained": True, "checkpoint": "a.pt", "model": "timm:resnet18"}, "at most one"),
    ({"pretrained": True}, "pretrained weights come from timm or torchvision"),
    ({"optimizer": "lion"}, "unknown optimizer"),
    ({"lr_schedule": "poly"}, "unknown lr_schedule"),
    ({"warmup_epochs": -1}, "warmup_epochs"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"distill_alpha": 1.5}, "distill_alpha"),
    ({"distill_temperature": 0.0}, "distill_temperature"),
])
def test_new_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecipeConfig(**kwargs).validate()


@pytest.mark.slow  # two processes under torchrun (gloo)
def test_distill_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys

    from test_recipes import REPO

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "recipes" / "iterative.py"), *TINY, "--method", "l1", "--prune-percent", "50", "--distill",
           "--phase", "base=0.1:2", "--phase", "retrain=0.1:2", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["rows"][1]["test_acc"] > 30.0
    teacher = safe_torch_load(out / "checkpoint.pt")["teacher"]
    before_prune = safe_torch_load(out / "model_round0.pt")["model"]
    assert all(torch.equal(teacher[k], v) for k, v in before_prune.items())
    assert [json.loads(line)["distilled"] for line in (out / "epochs.jsonl").read_text().splitlines()] == \
        [False, False, True, True]
