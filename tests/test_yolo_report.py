"""report.html of ``orthoreg-tp yolo`` from a hand-made ``results.json`` (fast; the real run is in test_yolo_cli)."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path

from orthoreg_tp.engine.html_report import (
    try_write_yolo_report,
    write_yolo_report,
    yolo_before_after,
    yolo_report_sections,
)

PNG = b"\x89PNG\r\n\x1a\n"
RESULTS = {
    "command": "yolo", "task": "detect", "model_class": "DetectionModel",
    "map50_95_before": 0.4125, "map50_95_after": 0.3875, "map50_before": 0.61, "map50_after": 0.58,
    "params_before": 3157200, "params_after": 1071234, "macs_before": 8_700_000_000, "macs_after": 3_800_000_000,
    "metrics_before": {"metrics/precision(B)": 0.7, "metrics/mAP50-95(B)": 0.4125},
    "metrics_after": {"metrics/precision(B)": 0.65, "metrics/mAP50-95(B)": 0.3875},
    "importance": "OrthoRegImportance", "prune_ratio": 0.5, "target": ["macs", 0.45], "channels_removed": 0.48,
    "frozen": ["model.22.dfl.conv: fixed 16 bins"], "unused": [], "notes": ["C2f split widths set for export"],
    "latency": {"dense": {"median_ms": 12.5}, "pruned": {"median_ms": 6.25}, "ratio": 0.5},
    "widths": {"model.0.conv": [16, 8], "model.1.conv": [32, 12], "model.22.cv3.2.2": [80, 80]},
    "importance_batches_used": 2, "seconds": {"regularize": 7.4, "prune": 1.6},
    "dense_checkpoint": "runs/yolo/dense.pt", "pruned_checkpoint": "runs/yolo/pruned.pt",
    "dense_checkpoint_bytes": 6_500_000, "pruned_checkpoint_bytes": 2_300_000,
    "config": {"model": "yolov8n.yaml", "data": "data.yaml", "imgsz": 64, "target_macs": 0.45, "seed": 0},
}


def _section(page: str, heading: str) -> str:
    return page.split(f"<h2>{heading}</h2>", 1)[1].split("<h2>", 1)[0]


def test_yolo_sections_hold_the_numbers_and_embed_the_plots(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    page = write_yolo_report(tmp_path).read_text()  # reads results.json
    assert re.findall(r"<h2>(.*?)</h2>", page) == [
        "before and after", "metric against MACs", "per-layer widths before and after", "prune settings",
        "seconds per step", "run", "configuration"]
    assert "<title>yolo: yolov8n.yaml on data.yaml</title>" in page and "DetectionModel" in page
    table = _section(page, "before and after")
    for row in ('<td class="t">parameters</td><td>3,157,200</td><td>1,071,234</td><td>0.3393</td>',
                '<td class="t">MACs</td><td>8,700,000,000</td><td>3,800,000,000</td><td>0.4368</td>',
                '<td class="t">latency (ms, median)</td><td>12.5</td><td>6.25</td><td>0.5</td>',
                '<td class="t">checkpoint (bytes)</td><td>6,500,000</td><td>2,300,000</td><td>0.3538</td>',
                '<td class="t">metrics/mAP50-95(B)</td><td>0.4125</td><td>0.3875</td><td>0.9394</td>'):
        assert row in table, row
    widths = _section(page, "per-layer widths before and after")
    assert '<td class="t">model.1.conv</td><td>32</td><td>12</td><td>37.5</td>' in widths  # before, after, kept %
    settings = _section(page, "prune settings")
    assert "keep 0.45 of the dense macs" in settings and "model.22.dfl.conv: fixed 16 bins" in settings
    assert "C2f split widths set for export" in settings and "OrthoRegImportance" in settings
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in images] == ["mAP50-95 (box) vs MACs", "per-layer widths"]
    assert all(base64.b64decode(data).startswith(PNG) for _, data in images)
    assert "http" not in page and "<script" not in page


def test_classification_plots_top1_and_missing_parts_leave_sections_out() -> None:
    results = {"top1_before": 0.9, "top1_after": 0.8, "map50_95_before": None, "macs_before": 10, "macs_after": 5,
               "metrics_before": {"metrics/accuracy_top1": 0.9}, "metrics_after": {"metrics/accuracy_top1": 0.8}}
    sections = dict(yolo_report_sections(results))
    assert list(sections) == ["before and after", "metric against MACs", "prune settings"]
    assert 'alt="top-1 accuracy vs MACs"' in sections["metric against MACs"]
    assert [r["quantity"] for r in yolo_before_after(results)] == ["MACs", "metrics/accuracy_top1"]
    assert "remove ?% of the channels" in sections["prune settings"]  # no target, no config: says so


def test_a_report_that_cannot_be_written_warns_and_returns_none(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        assert try_write_yolo_report(blocker / "run", RESULTS) is None  # a file where the folder should be
    assert "report.html not written" in caplog.text
    assert try_write_yolo_report(tmp_path / "run", RESULTS) == tmp_path / "run" / "report.html"
