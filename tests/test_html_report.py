"""report.html: one self-contained page per recipe run and per sensitivity analysis; orthoreg-tp analyze."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

from orthoreg_tp.analyze import SensitivityResult
from orthoreg_tp.engine import cli
from orthoreg_tp.engine.html_report import (
    html_document,
    html_table,
    png_image,
    run_report_sections,
    try_write_run_report,
    write_run_report,
    write_sensitivity_report,
)

RUN = ["--method", "l1", "--prune-percent", "50", "--importance-samples", "128", "--no-progress", "--threads", "1",
       "--device", "cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_threads():  # runs use --threads 1
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_self_contained(page: str) -> list[bytes]:
    """No external reference anywhere; returns the embedded PNGs (each a valid PNG)."""
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http" not in page and "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(?!data:image/png;base64,)', page)
    images = [base64.b64decode(b) for b in re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)]
    assert images and all(img.startswith(PNG) for img in images)
    return images


# ----------------------------------------------------------------------------------------------- building blocks
def test_table_escapes_and_formats() -> None:
    table = html_table([{"layer": "a<b>&", "width": 1234, "acc": 91.23456, "x": None},
                        {"layer": "c", "width": 5, "acc": float("nan"), "x": ["p", "q"]}])
    assert "a&lt;b&gt;&amp;" in table and "<td>1,234</td>" in table and "<td>91.23</td>" in table
    assert '<td class="t">-</td>' in table and "<td>nan</td>" in table and "p; q" in table
    assert html_table([]) == '<p class="sub">(no rows)</p>'
    assert "<th>missing</th>" not in html_table([{"a": 1}], columns=["a", "missing"])


def test_png_image_round_trips() -> None:
    tag = png_image(PNG + b"rest", alt='a "plot"')
    assert tag.startswith('<img alt="a &quot;plot&quot;"')
    assert base64.b64decode(tag.split("base64,")[1].rstrip('"/>')) == PNG + b"rest"
    assert html_document("t<", [("h", tag)]).count("<h2>h</h2>") == 1


def test_run_report_from_results_has_rounds_widths_and_plots(tmp_path: Path) -> None:
    widths0, widths1 = {"conv1": 16, "conv2": 32, "fc": 10}, {"conv1": 12, "conv2": 8, "fc": 10}
    results = {"recipe": "iterative", "model": "tiny_cnn", "dataset": "digits", "method": "orthoreg", "seed": 0,
               "complete": True, "rows": [
                   {"round": 0, "pruned_pct": 0.0, "params": 1000, "macs": 2e6, "test_acc": 90.0, "widths": widths0},
                   {"round": 1, "pruned_pct": 50.0, "params": 400, "macs": 1e6, "test_acc": 88.5,
                    "acc_after_prune": 70.0, "widths": widths1}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "config.json").write_text(json.dumps({"model": "tiny_cnn", "lr": 0.1}))
    (tmp_path / "epochs.jsonl").write_text("".join(json.dumps({"global_epoch": i, "test_acc": 80.0 + i,
                                                               "train_acc": 85.0}) + "\n" for i in range(3)))
    page = write_run_report(tmp_path).read_text()
    assert len(assert_self_contained(page)) == 3  # accuracy vs MACs, widths, training curve
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings == ["rounds", "accuracy against MACs", "per-layer widths before and after", "training", "run",
                        "configuration"]
    assert '<td class="t">conv2</td><td>32</td><td>8</td><td>25</td>' in page  # widths per round, kept %
    assert "<td>88.5</td>" in page and "<td>70</td>" in page


def test_a_failing_report_does_not_stop_the_run(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert try_write_run_report(blocker / "run", {"rows": []}) is None
    assert "report.html not written" in caplog.text
    assert [h for h, _ in run_report_sections({"rows": []})] == ["rounds"]


def test_sensitivity_report(tmp_path: Path) -> None:
    rows = [{"group": g, "root": f"layer{g}", "layers": [f"layer{g}"], "level": lv, "loss_delta": 0.1 * g * lv,
             "predicted_loss_delta": 0.05 * g * lv, "status": "ok"} for g in range(3) for lv in (0.25, 0.5)]
    result = SensitivityResult(rows=rows, baseline_loss=1.0, levels=(0.25, 0.5), importance="orthoreg")
    path = write_sensitivity_report(tmp_path / "r.html", result, context={"model": "m"}, max_loss_delta=0.06)
    page = path.read_text()
    assert len(assert_self_contained(page)) == 1
    assert re.findall(r"<h2>(.*?)</h2>", page)[:3] == ["analysis", "summary", "loss change per group"]
    assert "per-layer ratios within a loss change of 0.06" in page
    assert '<td class="t">layer2</td><td>0.25</td>' in page  # layer2: 0.05 at 25%, 0.1 at 50%


# ----------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_iterative_and_early_bird_runs_write_the_report(tmp_path: Path) -> None:
    for recipe, phases in (("iterative", ["base=0.1:1", "retrain=0.1:1"]), ("early-bird", ["eb_train=0.1:1",
                                                                                            "eb_retrain=0.1:1"])):
        out = tmp_path / recipe
        args = [recipe, *RUN, *sum((["--phase", p] for p in phases), []), "--output-dir", str(out)]
        assert cli.main(args) == 0
        page = (out / "report.html").read_text()
        assert len(assert_self_contained(page)) == 3
        results = json.loads((out / "results.json").read_text())
        last = results["rows"][-1]
        assert f"<td>{last['params']:,}</td>" in page  # the round table
        assert "per-layer widths before and after" in page and "accuracy against MACs" in page


@pytest.mark.slow
def test_analyze_command_on_digits(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sens"
    assert cli.main(["analyze", "--model", "tiny_resnet", "--output-dir", str(out), "--levels", "0.25,0.5",
                     "--num-batches", "2", "--batch-size", "32", "--threads", "1", "--no-progress",
                     "--max-loss-delta", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "most sensitive" in printed and "report.html" in printed
    doc = json.loads((out / "sensitivity.json").read_text())
    assert doc["num_samples"] == 64 and doc["context"]["dataset"] == "digits"
    assert len(doc["rows"]) == 2 * len({r["group"] for r in doc["rows"]}) and set(doc["layer_ratios"]) == {
        r["root"] for r in doc["rows"]}
    assert (out / "sensitivity.csv").read_text().count("\n") == 1 + len(doc["rows"])
    assert (out / "sensitivity.png").read_bytes().startswith(PNG)
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert "every group and level" in page and "stem.0" in page


def test_analyze_command_rejects_bad_options(capsys) -> None:
    for args, match in ((["--levels", "0.5,1.5"], "levels must be fractions"), (["--num-batches", "0"], "positive")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["analyze", "--model", "tiny_cnn", "--output-dir", "/tmp/never", *args])
        assert stop.value.code == 2 and match in capsys.readouterr().err
    assert not Path("/tmp/never").exists()
