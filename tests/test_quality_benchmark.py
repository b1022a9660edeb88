"""Smoke test of benchmarks/quality.py: a tiny preset end to end, its MACs budgets, its records and resumption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality.py"


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--preset", "smoke", "--dataset", "digits", "--models", "vgg13",
           "--methods", "orthoreg", "l1", "--speedups", "2", "4", "--eb-methods", "bn", "--eb-percents", "50",
           "--workers", "1", "--output-dir", str(out), "--cache-dir", str(out / "cache"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _conv_linear_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions and linear layers of one forward pass (forward hooks)."""
    total = 0

    def hook(module, _inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += out.numel() * module.in_channels // module.groups * k
        else:
            total += module.in_features * module.out_features * (out.numel() // module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.slow
def test_quality_smoke_budgets_records_and_resume(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["status"] == "complete" and result["missing"] == []
    rows = result["runs"]

    # the dense MACs (conv + linear, the project's convention), counted by hand on the architecture the script builds
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from quality import build_net
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    net = build_net("vgg13", width=PRESET_WIDTH, num_classes=10)
    dense_macs = _conv_linear_macs(net, torch.randn(1, 3, 32, 32))
    dense_params = sum(p.numel() for p in net.parameters())
    dense = [r for r in rows if r["kind"] == "dense"]
    assert {r["family"] for r in dense} == {"plain", "orthoreg"}
    assert all(r["macs"] == dense_macs and r["params"] == dense_params for r in dense)

    iterative = [r for r in rows if r["kind"] == "iterative"]
    assert sorted((r["method"], r["target_speedup"]) for r in iterative) == [
        ("l1", 2.0), ("l1", 4.0), ("orthoreg", 2.0), ("orthoreg", 4.0)]
    for r in iterative:  # every round keeps at most dense / s of the MACs, and the speed-up is dense / kept
        assert r["macs"] <= dense_macs / r["target_speedup"] + 1
        assert r["speedup"] == pytest.approx(dense_macs / r["macs"])
        assert 0.0 <= r["accuracy"] <= 100.0
    tickets = [r for r in rows if r["kind"] == "earlybird"]
    assert len(tickets) == 1 and tickets[0]["method"] == "bn" and tickets[0]["percent"] == 50.0
    assert tickets[0]["macs"] < dense_macs
    md = (tmp_path / "quality.md").read_text()
    assert "| orthoreg |" in md and "Machine:" in md and "--preset smoke" in md
    assert (tmp_path / "quality.png").stat().st_size > 0

    # resumption: every run is recorded, so a second call trains nothing and appends nothing
    lines = (tmp_path / "quality.runs.jsonl").read_text().splitlines()
    second = _run(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 tasks to run" in second.stderr
    assert (tmp_path / "quality.runs.jsonl").read_text().splitlines() == lines


PRESET_WIDTH = 0.0625  # benchmarks/quality.py PRESETS["smoke"]["width"]


def _quality_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return quality


def test_quality_normalizers_follow_each_library_default():
    quality = _quality_module()
    assert set(quality.DEFAULT_NORMALIZERS) == set(quality.METHODS)
    # the project's loss-based scores rank raw; torch-pruning's importances are mean-normalized by default
    import torch_pruning as tp

    assert tp.importance.MagnitudeImportance().normalizer == quality.normalizer_of("l1", "default") == "mean"
    assert tp.importance.BNScaleImportance().normalizer == quality.normalizer_of("bn", "default")
    assert tp.importance.TaylorImportance().normalizer == quality.normalizer_of("taylor", "default")
    assert quality.normalizer_of("orthoreg", "default") is None and quality.normalizer_of("fisher", "default") is None
    assert quality.normalizer_of("orthoreg", "mean") == "mean" and quality.normalizer_of("l1", "none") is None
    # variants rank the same scores mean-normalized, whatever --normalizer says, and keep the base's training
    assert quality.normalizer_of("orthoreg-mean", "none") == "mean" == quality.normalizer_of("fisher-mean", "default")
    assert quality.criterion("orthoreg-mean").regularized and not quality.criterion("fisher-mean").regularized
    assert quality.criterion("fisher-mean").name == "fisher"


@pytest.mark.parametrize("option, value", [("--min-keep", "1.0"), ("--bn-recal-batches", "-1")])
def test_quality_rejects_bad_protocol_options(option, value):
    quality = _quality_module()
    args = quality.get_args_parser().parse_args(["--preset", "smoke", option, value])
    with pytest.raises(SystemExit, match=option):
        quality.resolve(args)
