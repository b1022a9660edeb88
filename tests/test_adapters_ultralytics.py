"""Ultralytics YOLO (v8, 11; detect, segment, pose, classify, OBB) pruned as built, with random weights.

Models are built from ultralytics' YAML names (no download). Skipped without ``ultralytics`` (installed by the
``dev`` extra, so CI runs them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

ultralytics = pytest.importorskip("ultralytics")

# Importing ultralytics replaces PIL.Image.open process-wide (a HEIF fallback that may pip-install pi-heif on any
# file Pillow cannot identify); the rest of the test session gets Pillow's own back.
import PIL.Image  # noqa: E402
from ultralytics.utils import patches as _patches  # noqa: E402

PIL.Image.open = getattr(_patches, "_image_open", PIL.Image.open)

from orthoreg_tp.adapters import build_pruner, prepare, prune  # noqa: E402
from orthoreg_tp.adapters.libraries.ultralytics_models import is_ultralytics_model, yolo_predictions  # noqa: E402

X = torch.randn(1, 3, 64, 64)
HEAD_BRANCHES = ("cv2", "cv3", "cv4")


def _yolo(cfg: str):
    torch.manual_seed(0)
    return ultralytics.YOLO(cfg)


def _shapes(output):
    if torch.is_tensor(output):
        return tuple(output.shape)
    if isinstance(output, dict):
        return {k: _shapes(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return [_shapes(v) for v in output]
    return type(output).__name__


def _prediction_shapes(model: nn.Module) -> tuple:
    modes = {m: m.training for m in model.modules()}
    with torch.no_grad():
        model.eval()
        evaluated = _shapes(yolo_predictions(model(X)))
        model.train()
        trained = _shapes(yolo_predictions(model(X)))
    for m, mode in modes.items():
        m.train(mode)
    return evaluated, trained


def _head_outputs(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) channels of the head's prediction convolutions and DFL, by name."""
    head = model.model[-1]
    out = {}
    for attr in HEAD_BRANCHES:
        for i, branch in enumerate(getattr(head, attr, ())):
            conv = [m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1]
            out[f"{attr}.{i}"] = (conv.in_channels, conv.out_channels)
    if isinstance(getattr(getattr(head, "dfl", None), "conv", None), nn.Conv2d):  # YOLO26 has none (Identity)
        out["dfl"] = (head.dfl.conv.in_channels, head.dfl.conv.out_channels)
    if getattr(head, "proto", None) is not None:
        out["proto"] = (_last_conv(head.proto).out_channels,)
    return out


def _last_conv(module: nn.Module) -> nn.Conv2d:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


FAST = ["yolov8n.yaml", "yolo11n-seg.yaml"]
SLOW = ["yolo11n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolo11n-pose.yaml", "yolov8n-cls.yaml",
        "yolo11n-cls.yaml", "yolo11n-obb.yaml",
        # the other generations: YOLOv5u, v9, v10 (one-to-one head), 12 (area attention), 26 (no DFL; seg with a
        # semantic branch that runs in training only)
        "yolov5nu.yaml", "yolov9t.yaml", "yolov10n.yaml", "yolo12n.yaml", "yolo26n.yaml", "yolo26n-seg.yaml",
        "yolo26n-pose.yaml"]


@pytest.mark.parametrize("cfg", FAST + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW])
def test_yolo_prunes_at_half_with_every_prediction_kept(cfg):
    model = _yolo(cfg).model
    assert is_ultralytics_model(model)
    before_shapes, before_heads = _prediction_shapes(model), _head_outputs(model)
    head_out = {k: v[1:] for k, v in before_heads.items()}  # output widths (inputs may shrink)
    classes = {type(m) for m in model.modules()}
    report = prune(model, X, ratio=0.5, importance=tp.importance.MagnitudeImportance())
    assert report.source == "ultralytics"
    assert not report.frozen, report.frozen
    assert report.params_after <= 0.6 * report.params_before, report  # at least 40% of the parameters removed
    assert _prediction_shapes(model) == before_shapes
    assert {k: v[1:] for k, v in _head_outputs(model).items()} == head_out
    if "dfl" in before_heads:
        assert _head_outputs(model)["dfl"] == before_heads["dfl"]  # DFL intact: 16 bins in, 1 out
    assert {type(m) for m in model.modules()} == classes  # nothing swapped
    assert not any("feats" in n for n in report.spec["unhandled"])


def test_neck_features_returned_for_the_loss_may_shrink():
    model = _yolo("yolov8n.yaml").model.eval()
    spec = prepare(model, X)
    head = model.model[-1]
    kept = set(spec.ignored_layers)
    # the neck C2f blocks feeding the head are not output layers (only their feature maps' sizes are read)
    feeders = [model.model[i].cv2.conv for i in head.f]
    assert not kept & set(feeders)
    assert any("feats" in note for note in spec.notes)


def test_pruned_yolo_runs_through_the_ultralytics_predictor():
    import numpy as np

    yolo = _yolo("yolov8n.yaml")
    prune(yolo.model, X, ratio=0.5, importance=tp.importance.MagnitudeImportance())
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    results = yolo.predict(image, imgsz=64, device="cpu", conf=0.0, verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    assert results[0].boxes.data.shape[-1] == 6  # x1, y1, x2, y2, score, class


def test_build_pruner_drives_yolo_by_hand():
    model = _yolo("yolo11n.yaml").model.eval()
    before = _prediction_shapes(model)
    pruner = build_pruner(model, X, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
                          global_pruning=True, iterative_steps=2)
    for _ in range(2):
        pruner.step()
        assert _prediction_shapes(model) == before
    assert sum(p.numel() for p in model.parameters()) < 0.7 * 2_624_080


@pytest.mark.slow
def test_pruned_yolo_fine_tunes_with_the_ultralytics_trainer(tmp_path, monkeypatch):
    """The documented fine-tuning lines: a trainer handed the pruned module trains it and saves it pruned."""
    from conftest import write_yolo_dataset
    from ultralytics.models.yolo.detect import DetectionTrainer

    monkeypatch.chdir(tmp_path)
    data = write_yolo_dataset(tmp_path)

    yolo = _yolo("yolov8n.yaml")
    prune(yolo.model, X, ratio=0.5, importance=tp.importance.MagnitudeImportance())
    widths = [m.out_channels for m in yolo.model.modules() if isinstance(m, nn.Conv2d)]
    trainer = DetectionTrainer(overrides=dict(model="yolov8n.yaml", data=str(data), epochs=1, imgsz=64, batch=2,
                                              workers=0, device="cpu", plots=False, amp=False,
                                              project=str(tmp_path / "runs"), name="ft", verbose=False))
    trainer.model = yolo.model  # a model set beforehand is trained as it is (not rebuilt from its YAML)
    trainer.train()
    tuned = ultralytics.YOLO(str(trainer.best))
    assert [m.out_channels for m in tuned.model.modules() if isinstance(m, nn.Conv2d)] == widths


def test_orthoreg_importance_from_the_yolo_loss():
    """The documented importance pass: ultralytics' own loss, averaged over the batch, then accumulate_grad."""
    from ultralytics.cfg import get_cfg

    from orthoreg_tp import OrthoRegImportance

    model = _yolo("yolov8n.yaml").model
    model.args = get_cfg()  # the loss gains (box, cls, dfl) a trainer would set
    imp = OrthoRegImportance()
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [3.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.2, 0.3]])}
    model.train()
    loss, _ = model.loss(batch)  # per-term losses times the batch size
    (loss.sum() / 2).backward()
    imp.accumulate_grad(model, num_samples=2)
    model.eval()
    report = prune(model, X, ratio=0.5, importance=imp)
    assert not report.frozen and report.params_after < 0.6 * report.params_before


def test_the_yolo_wrapper_is_refused_with_the_way_to_go():
    yolo = _yolo("yolov8n.yaml")
    state = {k: v.clone() for k, v in yolo.model.state_dict().items()}
    with pytest.raises(TypeError, match=r"prune\(yolo.model, example_inputs"):
        prune(yolo, X, ratio=0.5, importance=tp.importance.MagnitudeImportance())
    assert all(torch.equal(v, yolo.model.state_dict()[k]) for k, v in state.items())


def test_a_prepared_spec_keeps_its_prediction_selector():
    model = _yolo("yolov8n.yaml").model.eval()
    spec = prepare(model, X)
    assert spec.select_outputs is yolo_predictions
    report = prune(model, X, ratio=0.5, importance=tp.importance.MagnitudeImportance(), spec=spec)
    assert not report.frozen and report.params_after < 0.6 * report.params_before


@pytest.mark.slow
def test_rtdetr_prunes_its_backbone_and_says_what_is_kept():
    torch.manual_seed(0)
    model = ultralytics.RTDETR("rtdetr-l.yaml").model.eval()
    decoder = model.model[-1]
    widths = {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    decoder_params = sum(p.numel() for p in decoder.parameters())
    with torch.no_grad():
        before = _shapes(yolo_predictions(model(X)))

    report = prune(model, X, ratio=0.5, importance=tp.importance.MagnitudeImportance())

    assert not report.frozen and report.params_after < 0.6 * report.params_before
    with torch.no_grad():
        assert _shapes(yolo_predictions(model(X))) == before
    backbone = [n for n in widths if n.startswith(("model.0.", "model.1.", "model.2."))]
    assert any(model.get_submodule(n).out_channels < widths[n][1] for n in backbone)  # the backbone is pruned
    assert sum(p.numel() for p in decoder.parameters()) <= decoder_params  # only input projections' inputs shrink
    assert all(m.out_channels == widths[n][1] for n, m in decoder.named_modules(prefix="model.28")
               if isinstance(m, nn.Conv2d))
    notes = " ".join(report.spec["notes"])
    assert "RTDETRDecoder: frozen" in notes and "AIFI: frozen" in notes
