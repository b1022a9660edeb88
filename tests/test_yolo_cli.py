"""``orthoreg-tp yolo``: argument errors (fast) and the whole method on a four-image dataset it writes (slow).

The end-to-end run needs ``ultralytics`` (the ``dev`` extra) and builds yolov8n from its YAML (random weights,
no download).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from orthoreg_tp.engine import cli
from orthoreg_tp.engine.yolo import YoloConfig, results_table


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


from conftest import write_yolo_dataset  # noqa: E402

write_dataset = write_yolo_dataset  # the four-image dataset both YOLO test files train on


# --------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("extra, message", [
    (["--model", "missing.pt"], "model file not found: 'missing.pt'"),
    (["--model", "yolov8n.onnx"], "--model must be a .pt checkpoint or a model .yaml"),
    (["--data", "missing.yaml"], "data file not found: 'missing.yaml'"),
    (["--prune-percent", "100"], "prune_percent must be in (0, 100)"),
    (["--target-macs", "1.5"], "target_macs must be a fraction"),
    (["--epochs", "-1"], "epochs must be a non-negative integer"),
    (["--prune-percent", "30", "--target-params", "0.5"], "not allowed with argument"),
    (["--target-macs", "0.5", "--target-latency", "0.5"], "not allowed with argument"),
], ids=["missing-model", "model-format", "missing-data", "percent", "target", "epochs", "percent-and-target",
        "two-targets"])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, extra, message):
    data = tmp_path / "data.yaml"
    data.write_text("names: {0: thing}\n")
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    args = {"--model": str(model), "--data": str(data), "--output-dir": str(tmp_path / "run")}
    args.update(dict(zip(extra[::2], extra[1::2])))
    with pytest.raises(SystemExit) as info:
        cli.main(["yolo", *[x for kv in args.items() for x in kv]])
    assert info.value.code == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # nothing written


def test_distill_without_ultralytics_support_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from orthoreg_tp.engine import yolo

    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("ultralytics is not installed")

    monkeypatch.setattr(yolo, "distill_supported", lambda: False)
    data = tmp_path / "data.yaml"
    data.write_text("names: {0: thing}\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["yolo", "--model", "yolov8n.yaml", "--data", str(data), "--distill"])
    assert info.value.code == 2
    assert "--distill needs an ultralytics with knowledge distillation" in one_error_line(capsys)


def test_config_round_trips_and_names_its_budget():
    config = YoloConfig(model="yolov8n.yaml", data="my.yaml", target_params=0.4)
    assert YoloConfig.from_dict(config.to_dict()) == config
    assert config.target == ("params", 0.4)
    assert YoloConfig(model="m.yaml", data="d.yaml").target is None
    with pytest.raises(ValueError, match="unknown yolo options"):
        YoloConfig.from_dict({**config.to_dict(), "lr": 0.1})


def test_the_table_shows_before_and_after():
    table = results_table({"map50_95_before": 0.5, "map50_95_after": None, "macs_before": 10, "macs_after": 4})
    assert table.splitlines()[2:] == ["| map50_95 | 0.5000 | - |", "| macs | 10 | 4 |"]


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory):
    ultralytics = pytest.importorskip("ultralytics")
    import PIL.Image
    from ultralytics.utils import patches

    try:
        root = tmp_path_factory.mktemp("yolo-cli")
        data = write_dataset(root)
        out = root / "run"
        torch.manual_seed(0)
        cli.main(["yolo", "--model", "yolov8n.yaml", "--data", data, "--imgsz", "64", "--epochs", "1",
                  "--finetune-epochs", "1", "--prune-percent", "50", "--batch", "2", "--importance-batches", "2",
                  "--output-dir", str(out)])
        yield ultralytics, out, json.loads((out / "results.json").read_text())
    finally:  # importing ultralytics replaces PIL.Image.open process-wide; give the session Pillow's own back
        PIL.Image.open = getattr(patches, "_image_open", PIL.Image.open)


def _conv_widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.slow
def test_yolo_command_runs_the_method_end_to_end(yolo_run):
    _, out, results = yolo_run
    for key in ("map50_95_before", "map50_95_after", "map50_before", "map50_after", "params_before",
                "params_after", "macs_before", "macs_after", "config", "seconds"):
        assert key in results, key
    assert 0.0 <= results["map50_95_before"] <= 1.0 and 0.0 <= results["map50_95_after"] <= 1.0
    assert results["params_after"] < 0.7 * results["params_before"]
    assert results["macs_after"] < results["macs_before"]
    assert results["config"]["prune_percent"] == 50.0 and results["importance_batches_used"] == 2
    assert results["task"] == "detect" and not results["frozen"]
    assert json.loads((out / "config.json").read_text()) == results["config"]
    for phase in ("regularize", "finetune"):
        assert (out / phase / "weights" / "best.pt").is_file(), phase  # ultralytics' own run folders


@pytest.mark.slow
def test_the_run_writes_a_report_from_its_results(yolo_run):
    ultralytics, out, results = yolo_run
    page = (out / "report.html").read_text()
    assert "<title>yolo: yolov8n.yaml on " in page and "DetectionModel" in page
    assert f"<td>{results['params_before']:,}</td><td>{results['params_after']:,}</td>" in page
    assert page.count('src="data:image/png;base64,') == 2  # mAP50-95 against MACs, per-layer widths
    assert results["pruned_checkpoint_bytes"] == (out / "pruned.pt").stat().st_size
    assert results["dense_checkpoint_bytes"] > results["pruned_checkpoint_bytes"]
    pruned = dict(ultralytics.YOLO(str(out / "pruned.pt")).model.named_modules())
    convs = {k: v for k, v in results["widths"].items() if isinstance(pruned.get(k), torch.nn.Conv2d)}
    assert len(convs) > 50 and any(before > after for before, after in convs.values())
    assert all(pruned[k].out_channels == after for k, (_, after) in convs.items())  # widths of the saved model


@pytest.mark.slow
def test_the_saved_checkpoints_load_predict_and_export_in_ultralytics(yolo_run):
    import numpy as np
    import torch_pruning as tp

    ultralytics, out, results = yolo_run
    dense, pruned = ultralytics.YOLO(str(out / "dense.pt")), ultralytics.YOLO(str(out / "pruned.pt"))
    assert sum(p.numel() for p in pruned.model.parameters()) == results["params_after"]
    assert sum(p.numel() for p in dense.model.parameters()) == results["params_before"]
    assert sum(_conv_widths(pruned.model)) < 0.8 * sum(_conv_widths(dense.model))
    macs, _ = tp.utils.count_ops_and_params(pruned.model.eval(), torch.zeros(1, 3, 64, 64))
    assert macs == results["macs_after"]
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    boxes = pruned.predict(image, imgsz=64, device="cpu", conf=0.0, verbose=False)[0].boxes
    assert boxes.data.shape[-1] == 6
    exported = ultralytics.YOLO(str(out / "pruned.pt")).export(format="torchscript", imgsz=64, device="cpu")
    output = torch.jit.load(exported)(torch.zeros(1, 3, 64, 64))
    anchors = sum((64 // stride) ** 2 for stride in (8, 16, 32))
    assert (output[0] if isinstance(output, (list, tuple)) else output).shape == (1, 4 + 1, anchors)


@pytest.mark.slow
def test_a_macs_budget_without_training_and_distilled_fine_tuning(tmp_path):
    ultralytics = pytest.importorskip("ultralytics")
    import PIL.Image
    from ultralytics.utils import patches

    from orthoreg_tp.engine.yolo import distill_supported

    try:
        if not distill_supported():
            pytest.skip("the installed ultralytics has no distill_model=")
        out = tmp_path / "run"
        cli.main(["yolo", "--model", "yolov8n.yaml", "--data", write_dataset(tmp_path), "--imgsz", "64",
                  "--epochs", "0", "--finetune-epochs", "1", "--target-macs", "0.6", "--distill", "--batch", "2",
                  "--importance-batches", "1", "--output-dir", str(out)])
        results = json.loads((out / "results.json").read_text())
        assert results["macs_after"] <= 0.6 * results["macs_before"] and results["target"] == ["macs", 0.6]
        assert not (out / "regularize").exists()  # no regularized training
        pruned = ultralytics.YOLO(str(out / "pruned.pt")).model
        assert type(pruned).__name__ == "DetectionModel"  # the student, not the distillation wrapper
        assert sum(p.numel() for p in pruned.parameters()) == results["params_after"]
    finally:  # importing ultralytics replaces PIL.Image.open process-wide; give the session Pillow's own back
        PIL.Image.open = getattr(patches, "_image_open", PIL.Image.open)
