"""Runs that fail cleanly: one line naming the file, exit 2 (or 130/143 for signals), nothing lost."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from test_recipes import ITERATIVE, REPO, TINY, load_recipe

import orthoreg_tp.engine.experiment as experiment
from orthoreg_tp.engine.data import build_datasets
from orthoreg_tp.engine.records import summary_table


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def cli(argv, capsys):
    """Run the iterative recipe's CLI; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as info:
        experiment.run_cli(ITERATIVE.get_args_parser(), ITERATIVE.main, [*TINY, *argv])
    return info.value.code, capsys.readouterr().err


def one_error_line(err):
    lines = [line for line in err.splitlines() if "error:" in line or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def image_folder(root, classes=("a", "b"), n=3, size=20):
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), color=(40 * i, 80, 0)).save(root / split / c / f"{i}.png")
    return root


FOLDER_ARGS = ["--dataset", "imagefolder", "--workers", "0", "--image-size", "16", "--method", "l1",
               "--phase", "base=0.1:1", "--phase", "retrain=0.1:1", "--batch-size", "4"]


# --------------------------------------------------------------------------- data
def test_image_size_resizes_every_split_even_32(tmp_path):
    image_folder(tmp_path, size=48)  # reproduction: at 32 the resize was skipped, so test images stayed 48 px
    train, test, info = build_datasets("imagefolder", data_path=tmp_path, image_size=32)
    assert train[0][0].shape == test[0][0].shape == (3, 32, 32) and info.image_size == 32


@pytest.mark.parametrize("damage,where", [
    ("empty", "class folder"), ("truncated", "cannot read image"), ("text", "cannot read image")])
def test_broken_image_folder_exits_naming_the_file(tmp_path, capsys, damage, where):
    root = image_folder(tmp_path / "data")
    if damage == "empty":
        (root / "test" / "c").mkdir()
        (root / "train" / "c").mkdir()
        bad = root / "train" / "c"
    elif damage == "truncated":
        bad = root / "test" / "a" / "0.png"
        Image.new("RGB", (64, 64), color=(1, 2, 3)).save(bad)
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad = root / "test" / "b" / "1.png"
        bad.write_text("not an image")
    out = tmp_path / "run"
    code, err = cli([*FOLDER_ARGS, "--data-path", str(root), "--output-dir", str(out)], capsys)
    line = one_error_line(err)
    assert code == 2 and where in line and str(bad) in line, line
    assert not out.exists()  # failed before anything was written


@pytest.mark.parametrize("workers", ["0", "2"])  # 2: the error comes back from a DataLoader worker process
def test_broken_training_image_stops_the_run_with_its_name(tmp_path, capsys, workers):
    root = image_folder(tmp_path / "data")
    bad = root / "train" / "b" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, err = cli([*FOLDER_ARGS, "--workers", workers, "--data-path", str(root),
                     "--output-dir", str(tmp_path / "run")], capsys)
    line = one_error_line(err)
    assert code == 2 and line.endswith(f"error: cannot read image {str(bad)!r} (OSError: Truncated File Read)"), line


def test_unknown_tiny_imagenet_class(tmp_path, capsys):
    root = image_folder(tmp_path / "data", classes=("n01", "n02"))
    (root / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(root / "val" / "images" / "val_0.JPEG", format="JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t19\t19\n")
    import shutil

    shutil.rmtree(root / "test")
    code, err = cli([*FOLDER_ARGS, "--dataset", "tiny-imagenet", "--data-path", str(root),
                     "--output-dir", str(tmp_path / "run")], capsys)
    line = one_error_line(err)
    assert code == 2 and "'n99'" in line and "val_annotations.txt" in line and "line 1" in line
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- checkpoints and output folder
def _checkpoints(tmp_path):
    from orthoreg_tp.engine.models import build_model

    good = build_model("tiny_cnn", num_classes=10).state_dict()
    torch.save(good, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.pt").write_bytes(b"\0" * 64 + data[64:])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "wrongkind.pt")
    torch.save({**good, "extra.weight": torch.zeros(2)}, tmp_path / "unexpected.pt")
    torch.save({k: v for k, v in good.items() if not k.startswith("classifier")}, tmp_path / "missing.pt")
    bigger = build_model("tiny_cnn", num_classes=12).state_dict()
    torch.save(bigger, tmp_path / "classes.pt")


@pytest.mark.parametrize("name,words", [
    ("truncated.pt", "corrupt or truncated"), ("corrupt.pt", "corrupt or truncated"),
    ("list.pt", "not a model checkpoint"), ("wrongkind.pt", "found keys epoch, notes"),
    ("unexpected.pt", "unexpected keys: extra.weight"), ("missing.pt", "missing keys: classifier.weight"),
    ("classes.pt", "shape mismatches"), ("nowhere.pt", "no checkpoint file"),
])
def test_bad_start_checkpoint_exits_naming_it(tmp_path, capsys, name, words):
    _checkpoints(tmp_path)
    out = tmp_path / "run"
    code, err = cli(["--checkpoint", str(tmp_path / name), "--output-dir", str(out)], capsys)
    line = one_error_line(err)
    assert code == 2 and words in line and str(tmp_path / name) in line, line
    assert not out.exists()


def test_unwritable_output_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = cli(["--output-dir", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and "cannot write to output dir" in one_error_line(err)


# --------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = [*TINY, "--method", "l1", "--prune-percent", "30", "--phase", "base=0.1:1", "--phase", "retrain=0.1:1",
            "--output-dir", str(out)]
    results = ITERATIVE.main(ITERATIVE.get_args_parser().parse_args(argv))
    return out, argv, results


def test_resume_refuses_results_without_checkpoint(tmp_path, capsys, finished):
    out, argv, _ = finished
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.json", "epochs.jsonl", "config.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    code, err = cli([*argv, "--output-dir", str(copy), "--resume"], capsys)
    assert code == 2 and "holds results but no checkpoint" in one_error_line(err)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # nothing overwritten or appended


def test_resume_removes_stale_temporaries(finished, capsys):
    out, argv, results = finished
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    again = ITERATIVE.main(ITERATIVE.get_args_parser().parse_args([*argv, "--resume"]))
    assert not stale.exists() and again["rows"] == results["rows"]
    printed = capsys.readouterr().out
    assert "round  pruned %" in printed and f"final model: {out / 'model_final.safetensors'}" in printed


def test_resume_refuses_a_corrupt_run_checkpoint(tmp_path, capsys, finished):
    out, argv, _ = finished
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])
    code, err = cli([*argv, "--output-dir", str(broken), "--resume"], capsys)
    assert code == 2 and "corrupt or truncated" in one_error_line(err) and "checkpoint.pt" in err


def test_summary_table_latency_column():
    text = summary_table({"rows": [{"round": 0, "pruned_pct": 0.0, "params": 10, "macs": 2e6, "test_acc": 90.0,
                                    "latency_ms": 1.5}, {"round": 1, "pruned_pct": 50.0, "params": 5,
                                                         "macs": 1e6, "test_acc": 89.0}]})
    lines = text.splitlines()
    assert lines[0].split()[-1] == "latency_ms" and lines[1].split()[-1] == "1.500" and lines[2].split()[-1] == "-"


# --------------------------------------------------------------------------- signals
@pytest.mark.slow  # a subprocess: interpreter start-up plus one epoch
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_says_how_to_resume(tmp_path, sig, code):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "recipes" / "iterative.py"), *TINY, "--method", "l1",
           "--phase", "base=0.1:400", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert f"interrupted by {signal.Signals(sig).name}" in last and "--resume" in last and str(out) in last
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    lines = (out / "epochs.jsonl").read_text().splitlines()
    assert all(json.loads(line)["phase"] == "base" for line in lines)  # every row whole


# --------------------------------------------------------------------------- compare
def fake_run(folder, *, dataset="digits", model="tiny_cnn", method="l1"):
    folder.mkdir(parents=True)
    rows = [{"round": r, "pruned_pct": 30.0 * r, "params": 100 - 10 * r, "macs": 1e6 - 1e5 * r, "test_acc": 90.0 - r,
             "macs_pct": 100 - 10 * r} for r in range(2)]
    (folder / "results.json").write_text(json.dumps({"recipe": "iterative", "method": method, "model": model,
                                                     "dataset": dataset, "rows": rows}))
    return folder


def test_compare_refuses_mixed_runs_and_plots_next_to_them(tmp_path, capsys, monkeypatch):
    compare = load_recipe("compare")
    a = fake_run(tmp_path / "runs" / "a")
    b = fake_run(tmp_path / "runs" / "b", dataset="cifar10", method="random")
    with pytest.raises(ValueError, match="different datasets or models.*--mixed"):
        compare.main(compare.get_args_parser().parse_args([str(a), str(b)]))
    assert not (tmp_path / "runs" / "compare.png").exists()
    monkeypatch.chdir(tmp_path)
    compare.main(compare.get_args_parser().parse_args([str(a), str(b), "--mixed"]))
    assert (tmp_path / "runs" / "compare.png").stat().st_size > 10_000
    assert "plot: " in capsys.readouterr().out


@pytest.mark.slow  # a subprocess importing torch and matplotlib
def test_compare_survives_a_closed_pipe(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", method="random")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # pipefail: the exit status is compare.py's; "plot: ..." is printed after head has gone
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} {REPO / 'recipes' / 'compare.py'} "
                           f"{a} {b} | head -1"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("| run |") and proc.stderr == "", proc.stderr
    assert (tmp_path / "compare.png").exists()


def test_an_image_open_hook_failing_is_reported_as_an_unreadable_image(tmp_path, monkeypatch):
    """A library hooking PIL.Image.open (ultralytics' HEIF fallback) may raise ImportError on a non-image."""
    from orthoreg_tp.engine.data import DataError, load_image

    bad = tmp_path / "x.png"
    bad.write_text("not an image")

    def hooked(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pi_heif'")

    monkeypatch.setattr(Image, "open", hooked)
    with pytest.raises(DataError, match=r"cannot read image .*x\.png.*pi_heif"):
        load_image(str(bad))
