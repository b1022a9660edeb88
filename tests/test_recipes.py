"""End-to-end recipe runs on digits (tiny phases), resume, torchrun/gloo, and argument errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import orthoreg_tp.engine.experiment as experiment
from orthoreg_tp.engine.pruning import load_pruned_model

REPO = Path(__file__).resolve().parents[1]
# Tiny schedules: a recipe in a few seconds, still far above chance (10%) on digits.
TINY = ["--phase", "base=0.1:3,0.01:1", "--phase", "ortho=0.1:2", "--phase", "retrain=0.1:2,0.01:1",
        "--phase", "ortho_retrain=0.1:2,0.01:1", "--phase", "ortho_finetune=0.1:1",
        "--phase", "eb_train=0.1:4", "--phase", "eb_retrain=0.1:3,0.01:1",
        "--importance-samples", "256", "--no-progress", "--threads", "1", "--device", "cpu"]


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ITERATIVE, EARLY_BIRD = load_recipe("iterative"), load_recipe("early_bird")


@pytest.fixture(autouse=True)
def restore_threads():  # the recipes run with --threads 1 (fastest for tiny models on busy CPUs)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(recipe, *argv):
    return recipe.main(recipe.get_args_parser().parse_args([*argv, *TINY]))


def check_run(out, results, *, rounds):
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["complete"] and results["dataset"] == "digits"
    rows = results["rows"]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for key in ("pruned_pct", "params", "macs", "test_acc", "acc_after_prune", "widths", "target_pct"):
        assert all(key in r for r in rows), key
    params = [r["params"] for r in rows]
    assert all(a > b for a, b in zip(params, params[1:])), params
    assert all(r["test_acc"] > 60.0 for r in rows), [r["test_acc"] for r in rows]  # chance is 10%
    assert (out / "results.png").stat().st_size > 10_000
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == results["method"] and config["dense_params"] == params[0]
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [e["global_epoch"] for e in epochs] == list(range(len(epochs))) == list(range(rows[-1]["epochs"]))
    assert (out / "epochs.csv").read_text().count("\n") == len(epochs) + 1
    model = load_pruned_model(out / f"model_round{rounds}.pt")
    assert sum(p.numel() for p in model.parameters()) == params[-1]
    return rows


@pytest.mark.parametrize("method", ["orthoreg", pytest.param("l1", marks=pytest.mark.slow),
                                    pytest.param("bn", marks=pytest.mark.slow)])
def test_iterative_on_digits(tmp_path, method):
    results = run(ITERATIVE, "--method", method, "--prune-percent", "75", "--rounds", "2",
                  "--output-dir", str(tmp_path / method))
    rows = check_run(tmp_path / method, results, rounds=2)
    assert [r["target_pct"] for r in rows] == pytest.approx([0.0, 60.0, 75.0])
    assert rows[-1]["pruned_pct"] == pytest.approx(75.0, abs=1.0)
    epochs = [json.loads(line) for line in (tmp_path / method / "epochs.jsonl").read_text().splitlines()]
    phases = [e["phase"] for e in epochs]
    if method == "orthoreg":  # base, ortho, retrain, regularized fine-tune, retrain (the last round: no fine-tune)
        assert phases == ["base"] * 4 + ["ortho"] * 2 + ["ortho_retrain"] * 3 + ["ortho_finetune"] + \
            ["ortho_retrain"] * 3
        assert all(e["penalty"] is not None for e in epochs if e["regularized"])
    else:
        assert phases == ["base"] * 4 + ["retrain"] * 6 and not any(e["regularized"] for e in epochs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["orthoreg", "l1", "bn"])
def test_early_bird_on_digits(tmp_path, method):
    out = tmp_path / method
    results = run(EARLY_BIRD, "--method", method, "--prune-percent", "50", "--eb-detect",
                  "--eb-patience", "2", "--eb-threshold", "0.2", "--output-dir", str(out))
    rows = check_run(out, results, rounds=1)
    eb = results["early_bird"]
    trained = sum(1 for line in (out / "epochs.jsonl").read_text().splitlines()
                  if json.loads(line)["phase"] == "eb_train")
    assert len(eb["distances"]) == trained - 1 and all(0.0 <= d <= 1.0 for d in eb["distances"])
    if eb["fired_epoch"] is not None:  # stopped the moment it fired
        assert eb["fired_epoch"] == trained < 4 and max(eb["distances"][-2:]) < 0.2
    assert rows[1]["eb_epoch"] == eb["fired_epoch"]
    if method in ("l1", "bn"):  # weight-magnitude masks settle within a few epochs on digits
        assert eb["fired_epoch"] is not None


@pytest.mark.slow
def test_library_model_through_the_adapters(tmp_path):
    out = tmp_path / "vit"
    results = run(ITERATIVE, "--model", "timm:test_vit", "--image-size", "32", "--method", "l1",
                  "--prune-percent", "30", "--output-dir", str(out),
                  "--phase", "base=0.1:1", "--phase", "retrain=0.1:1")
    rows = results["rows"]
    assert rows[1]["pruned_pct"] == pytest.approx(30.0, abs=1.0) and rows[1]["params"] < rows[0]["params"]
    model = load_pruned_model(out / "model_round1.pt").eval()  # replayed history + the adapter's fix-ups
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == rows[1]["params"]


def interrupt_after(monkeypatch, epochs):
    calls = {"n": 0}
    original = experiment.train_one_epoch

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > epochs:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(experiment, "train_one_epoch", flaky)


@pytest.mark.slow
def test_resume_gives_identical_rows(tmp_path, monkeypatch):
    argv = ["--method", "orthoreg", "--prune-percent", "60", "--rounds", "2"]
    reference = run(ITERATIVE, *argv, "--output-dir", str(tmp_path / "ref"))
    out = str(tmp_path / "resumed")
    interrupt_after(monkeypatch, 5)  # inside the ortho phase
    with pytest.raises(KeyboardInterrupt):
        run(ITERATIVE, *argv, "--output-dir", out)
    assert not (tmp_path / "resumed" / "results.json").read_text().count('"complete": true')
    interrupt_after(monkeypatch, 6)  # then inside the second round's retraining
    with pytest.raises(KeyboardInterrupt):
        run(ITERATIVE, *argv, "--output-dir", out, "--resume")
    monkeypatch.undo()
    resumed = run(ITERATIVE, *argv, "--output-dir", out, "--resume")
    assert resumed["rows"] == reference["rows"]

    def epochs(d):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / d / "epochs.jsonl").read_text().splitlines()]

    assert epochs("resumed") == epochs("ref")
    assert not [p for p in (tmp_path / "resumed").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_resume_early_bird_keeps_detector_state(tmp_path, monkeypatch):
    argv = ["--method", "l1", "--prune-percent", "50", "--eb-detect", "--eb-patience", "3"]
    reference = run(EARLY_BIRD, *argv, "--output-dir", str(tmp_path / "ref"))
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(EARLY_BIRD, *argv, "--output-dir", str(tmp_path / "b"))
    monkeypatch.undo()
    resumed = run(EARLY_BIRD, *argv, "--output-dir", str(tmp_path / "b"), "--resume")
    assert resumed["rows"] == reference["rows"] and resumed["early_bird"] == reference["early_bird"]


@pytest.mark.slow
def test_resume_refuses_changed_settings(tmp_path):
    out = str(tmp_path / "run")
    run(ITERATIVE, "--method", "l2", "--prune-percent", "30", "--output-dir", out)
    with pytest.raises(ValueError, match="prune_percent"):
        run(ITERATIVE, "--method", "l2", "--prune-percent", "40", "--output-dir", out, "--resume")
    with pytest.raises(ValueError, match="already holds a run"):
        run(ITERATIVE, "--method", "l2", "--prune-percent", "30", "--output-dir", out)


@pytest.mark.slow
def test_target_macs_budget(tmp_path):
    results = run(ITERATIVE, "--method", "l2", "--target-macs", "0.4", "--rounds", "2",
                  "--output-dir", str(tmp_path / "macs"))
    rows = results["rows"]
    assert rows[1]["macs_pct"] <= 100 * 0.4 ** 0.5 + 1e-6 and rows[2]["macs_pct"] <= 40.0 + 1e-6
    assert rows[2]["macs_pct"] > 25.0 and rows[2]["target_pct"] is None


@pytest.mark.slow
def test_round_to_and_normalizer_options(tmp_path):
    results = run(ITERATIVE, "--method", "l1", "--prune-percent", "50", "--round-to", "8", "--normalizer", "mean",
                  "--output-dir", str(tmp_path / "r8"), "--phase", "base=0.1:1", "--phase", "retrain=0.1:1")
    widths = results["rows"][-1]["widths"]
    assert all(w % 8 == 0 for name, w in widths.items() if name != "classifier"), widths
    assert results["rows"][-1]["filters_pruned_pct"] >= 50.0 - 1e-6
    assert json.loads((tmp_path / "r8" / "config.json").read_text())["normalizer"] == "mean"


@pytest.mark.parametrize("argv,message", [
    (["--method", "magic"], "invalid choice: 'magic'"),
    (["--round-to", "0"], "argument --round-to: expected a positive integer or 'auto', got '0'"),
    (["--normalizer", "median"], "invalid choice: 'median'"),
    (["--prune-percent", "96"], "prune_percent must be in [0, 95], got 96.0"),
    (["--prune-percent", "-5"], "prune_percent must be in [0, 95], got -5.0"),
    (["--dataset", "tiny-imagenet"], "needs --data-path"),
    (["--dataset", "imagefolder", "--data-path", "/nonexistent/folder"], "train/ and test/"),
    (["--dataset", "cifar10", "--data-path", "/nonexistent/folder", "--no-download"], "--data-path DIR"),
])
def test_bad_arguments_exit_cleanly_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        experiment.run_cli(ITERATIVE.get_args_parser(), ITERATIVE.main, [*argv, "--output-dir", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_torchrun_gloo_two_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "recipes" / "iterative.py"), "--method", "orthoreg", "--prune-percent", "50",
           "--output-dir", str(out), *TINY]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["rows"]) == 2
    assert results["rows"][1]["pruned_pct"] == pytest.approx(50.0, abs=1.0)
    assert results["rows"][1]["test_acc"] > 60.0
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert not list(tmp_path.glob("**/*.tmp"))
    # rank 1 never wrote: every epoch is logged exactly once
    epochs = (out / "epochs.jsonl").read_text().splitlines()
    assert len(epochs) == results["rows"][-1]["epochs"]


@pytest.mark.slow
def test_compare_merges_runs(tmp_path, capsys):
    for method in ("l1", "random"):
        run(ITERATIVE, "--method", method, "--prune-percent", "50", "--output-dir", str(tmp_path / method),
            "--phase", "base=0.1:2", "--phase", "retrain=0.1:1")
    compare = load_recipe("compare")
    rows = compare.main(compare.get_args_parser().parse_args(
        [str(tmp_path / "l1"), str(tmp_path / "random"), "--plot", str(tmp_path / "c.png"),
         "--csv", str(tmp_path / "c.csv")]))
    assert [(r["run"], r["round"]) for r in rows] == [("l1", 0), ("l1", 1), ("random", 0), ("random", 1)]
    assert "| l1 | iterative | tiny_cnn | digits | l1 | 1 |" in capsys.readouterr().out
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert (tmp_path / "c.csv").read_text().count("\n") == 5
