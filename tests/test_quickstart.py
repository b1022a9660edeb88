import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.py"


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains_prunes_and_recovers(tmp_path, capsys):
    qs = load_quickstart()
    out = tmp_path / "table.json"
    args = qs.get_args_parser().parse_args(["--epochs", "4", "--finetune-epochs", "2", "--output", str(out)])
    rows = qs.main(args)
    assert rows["trained"]["acc"] > 60.0  # 10 classes: chance is 10%
    assert rows["pruned"]["params"] < 0.6 * rows["trained"]["params"]
    assert rows["pruned"]["macs"] < rows["trained"]["macs"]
    assert rows["fine-tuned"]["acc"] > 40.0
    record = json.loads(out.read_text())
    assert record["achieved_ratio"] == pytest.approx(0.5, abs=0.01)
    printed = capsys.readouterr().out
    assert "fine-tuned" in printed
    # the time printed is the run's own measurement, and the thread count it ran with (1 on small CPUs)
    assert f"in {record['seconds']:.0f} s ({record['threads']} CPU thread" in printed and record["seconds"] > 0
    if (os.cpu_count() or 1) <= 4:
        assert record["threads"] == 1


def test_quickstart_rejects_bad_threads():
    qs = load_quickstart()
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        qs.main(qs.get_args_parser().parse_args(["--threads", "0"]))


def test_quickstart_rejects_bad_ratio():
    qs = load_quickstart()
    with pytest.raises(SystemExit, match="--ratio must be in"):
        qs.main(qs.get_args_parser().parse_args(["--ratio", "1.5"]))
