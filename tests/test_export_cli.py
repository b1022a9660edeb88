"""orthoreg-tp: portable artifacts (safetensors + JSON, ONNX), load_pruned, the console script and --config."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp

import orthoreg_tp
from orthoreg_tp.engine import cli
from orthoreg_tp.engine.config import RecipeConfig, config_from_args
from orthoreg_tp.engine.export import ModelSpec, export_run, load_pruned, save_pruned
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.engine.pruning import load_pruned_model, prune_round_
from orthoreg_tp.engine.records import safe_torch_load

REPO = Path(__file__).resolve().parents[1]
TINY = ["--method", "l1", "--prune-percent", "50", "--phase", "base=0.1:1", "--phase", "retrain=0.1:1",
        "--importance-samples", "128", "--no-progress", "--threads", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def restore_threads():  # runs use --threads 1
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny iterative run (digits, tiny_cnn, one round at 50%) made through the console script's function."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("runs") / "it-l1"
    assert cli.main(["iterative", *TINY, "--output-dir", str(out)]) == 0
    torch.set_num_threads(threads)
    return out


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- the run and its final artifact
def test_iterative_run_writes_the_final_artifact(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] and [r["round"] for r in results["rows"]] == [0, 1]
    assert results["final_model"] == "model_final.safetensors"
    doc = json.loads((run_dir / "model_final.json").read_text())
    assert doc["spec"] == {"model": "tiny_cnn", "num_classes": 10, "in_chans": 3, "image_size": 16}
    assert doc["round"] == 1 and doc["params"] == results["rows"][-1]["params"]
    assert doc["pruning_history"] == safe_torch_load(run_dir / "model_round1.pt")["pruning_history"]
    model = orthoreg_tp.load_pruned(run_dir / "model_final.safetensors")
    assert sum(p.numel() for p in model.parameters()) == results["rows"][-1]["params"]


def test_export_safetensors_gives_identical_outputs(run_dir, tmp_path, capsys):
    assert cli.main(["export", str(run_dir), "--round", "1", "--output", str(tmp_path / "pruned")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'pruned.safetensors'} + pruned.json"
    reference = load_pruned_model(run_dir / "model_round1.pt").eval()  # the run's own (torch.save) checkpoint
    saved = safe_torch_load(run_dir / "model_round1.pt")["model"]
    for path in (tmp_path / "pruned.safetensors", tmp_path / "pruned.json", tmp_path / "pruned"):
        model = orthoreg_tp.load_pruned(path)
        assert not model.training
        state = model.state_dict()
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
        x = torch.randn(5, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(model(x), reference(x))


def test_export_defaults_to_the_last_round_and_round_zero_is_dense(run_dir):
    path = export_run(run_dir)
    assert path == run_dir / "model_round1.safetensors" and path.with_suffix(".json").is_file()
    dense = load_pruned(export_run(run_dir, round_index=0, output=run_dir / "dense"))
    config = json.loads((run_dir / "config.json").read_text())
    assert sum(p.numel() for p in dense.parameters()) == config["dense_params"]


def test_save_and_load_pruned_library_model_through_the_adapters(tmp_path):
    spec = ModelSpec("timm:test_vit", num_classes=10, in_chans=3, image_size=32)
    model = build_model(spec.model, num_classes=10)
    step = prune_round_(model, spec.example_inputs(), tp.importance.MagnitudeImportance(p=1), ratio=0.3)
    path = save_pruned(tmp_path / "vit", model, step.history, spec)
    loaded = load_pruned(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_load_pruned_rejects_mismatched_or_foreign_files(run_dir, tmp_path):
    export_run(run_dir, round_index=0, output=tmp_path / "a")
    export_run(run_dir, round_index=1, output=tmp_path / "b")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(ValueError, match="is not the weights file"):
        load_pruned(tmp_path / "a.json")
    (tmp_path / "c.json").write_text(json.dumps({"format": "something else"}))
    (tmp_path / "c.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an orthoreg-tp pruned-model spec"):
        load_pruned(tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError, match="no json file"):
        load_pruned(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- ONNX
def test_export_onnx_matches_pytorch(run_dir, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(run_dir), "--format", "onnx", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    reference = load_pruned_model(run_dir / "model_round1.pt").eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16)  # another batch size than the export's: the batch axis is dynamic
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), reference(x), atol=1e-5, rtol=1e-4)


def test_onnx_without_the_extra_says_how_to_install(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(SystemExit) as info:
        cli.main(["export", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    assert info.value.code == 2
    assert 'pip install "orthoreg-tp[onnx]"' in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- bad export inputs
@pytest.mark.parametrize("case,message", [
    ("missing", "no run folder at"),
    ("empty", "holds no saved model (model_round<K>.pt)"),
    ("format", "invalid choice: 'zip'"),
    ("round", "has no round 7 (saved rounds: 0, 1)"),
])
def test_export_bad_inputs_exit_2_with_one_line(run_dir, tmp_path, capsys, case, message):
    argv = {"missing": [str(tmp_path / "nope")], "empty": [str(tmp_path)],
            "format": [str(run_dir), "--format", "zip"], "round": [str(run_dir), "--round", "7"]}[case]
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(SystemExit) as info:
        cli.main(["export", *argv])
    assert info.value.code == 2
    assert message in one_error_line(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == before


# --------------------------------------------------------------------------- the command line and --config
def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("iterative", "early-bird", "compare", "export"))
    for name in ("iterative", "early-bird", "compare", "export"):
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0 and f"usage: orthoreg-tp {name}" in capsys.readouterr().out


def test_console_script_and_dependencies_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["orthoreg-tp"] == "orthoreg_tp.engine.cli:main"
    assert any(d.startswith("safetensors") for d in project["dependencies"])
    dev = project["optional-dependencies"]["dev"]
    assert any(d.startswith("onnxruntime") for d in dev) and any(d.startswith("onnx>") for d in dev)


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def options(parser):
    return sorted(s for a in parser._actions for s in a.option_strings)


@pytest.mark.parametrize("script,command", [("iterative", "iterative"), ("early_bird", "early-bird"),
                                            ("compare", "compare")])
def test_recipe_scripts_take_the_subcommands_options(script, command):
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    recipe = load_recipe(script)
    assert options(recipe.get_args_parser()) == options(sub)
    if script != "compare":  # the recipes' options stay
        assert {"--model", "--method", "--prune-percent", "--phase", "--output-dir", "--resume", "--round-to",
                "--normalizer", "--config"} <= set(options(sub))


def parse(command, *argv):
    args = cli.build_parser().parse_args([command, *argv])
    return config_from_args(args, recipe=command.replace("-", "_"))


def write_yaml(path, text):
    path.write_text(text)
    return str(path)


def test_config_json_and_yaml_set_options_and_flags_override(tmp_path):
    pytest.importorskip("yaml")
    values = {"method": "l2", "prune_percent": 30, "rounds": 2, "phases": {"base": "0.1:2"}, "seed": 3}
    (tmp_path / "c.json").write_text(json.dumps(values))
    yaml_file = write_yaml(tmp_path / "c.yaml", "method: l2\nprune_percent: 30\nrounds: 2\nphases:\n"
                                                "  base: '0.1:2'\nseed: 3\n")
    expected = RecipeConfig(recipe="iterative", method="l2", prune_percent=30.0, rounds=2,
                            phases={"base": "0.1:2"}, seed=3).resolved()
    for path in (str(tmp_path / "c.json"), yaml_file):
        assert parse("iterative", "--config", path) == expected
        # flags win, before or after --config; --phase adds to the file's phases
        overridden = parse("iterative", "--method", "l1", "--config", path, "--seed", "0", "--phase", "retrain=0.1:1")
        assert overridden == RecipeConfig(recipe="iterative", method="l1", prune_percent=30.0, rounds=2, seed=0,
                                          phases={"base": "0.1:2", "retrain": "0.1:1"}).resolved()


def test_a_runs_config_json_reruns_it(run_dir):
    original = parse("iterative", *TINY, "--output-dir", str(run_dir))
    assert parse("iterative", "--config", str(run_dir / "config.json")) == original


@pytest.mark.parametrize("text,message", [
    ('{"method": "l1", "learning_rate": 0.1, "epochs": 3}', "unknown keys in config file"),
    ('{"prune_percent": "half"}', "prune_percent must be float, got 'half'"),
    ('{"recipe": "early_bird"}', "is for the 'early_bird' recipe, not 'iterative'"),
    ('{"method": ', "is not valid"),
    ("[1, 2]", "must hold a mapping"),
])
def test_bad_config_files_exit_2_naming_the_problem(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as info:
        cli.main(["iterative", "--config", str(path), "--output-dir", str(tmp_path / "never")])
    assert info.value.code == 2
    err = one_error_line(capsys)
    assert message in err
    if "unknown keys" in message:
        assert "epochs, learning_rate" in err
    assert not (tmp_path / "never").exists()


def test_load_pruned_is_a_lazy_attribute():
    assert "load_pruned" not in vars(orthoreg_tp) and "load_pruned" in orthoreg_tp.__all__
    assert orthoreg_tp.load_pruned is load_pruned
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        orthoreg_tp.nope  # noqa: B018


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s idle, ~30 s on a busy 2-core machine
def test_import_stays_cheap_and_load_pruned_is_lazy(tmp_path):
    code = ("import sys, orthoreg_tp; print(any(m.startswith('orthoreg_tp.engine') for m in sys.modules));"
            "f = orthoreg_tp.load_pruned; print(f.__module__)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "orthoreg_tp.engine.export"]
