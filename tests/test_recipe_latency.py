"""--target-latency and --round-to auto in the recipes: rows record measured latency and how it was timed."""

import json

import pytest
from test_recipes import ITERATIVE, run

from orthoreg_tp.engine.config import RecipeConfig


def test_latency_budget_run_records_latency(tmp_path):
    out = tmp_path / "lat"
    results = run(ITERATIVE, "--method", "l1", "--model", "tiny_cnn", "--target-latency", "0.6", "--rounds", "1",
                  "--batch-size", "16", "--output-dir", str(out))
    rows = results["rows"]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["latency_pct"] > 0 and "round_latency" not in rows[0]  # timed before any prune
    last = rows[1]
    assert last["round_latency"]["ratio"] <= 0.6  # what the prune measured for the model it kept
    assert last["macs"] < rows[0]["macs"] and last["latency_ms"] > 0 and last["dense_latency_ms"] > 0
    timed = results["latency"]
    assert timed["batch_size"] == 16 and timed["interleaved_with"] == 2 and timed["clock"] == "cpu-process-time"
    assert json.loads((out / "config.json").read_text())["target_latency"] == 0.6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"target_latency": 1.5}, "target_latency must be"), ({"round_to": "fast"}, "round_to must be"),
     ({"target_latency": 0.5, "target_macs": 0.5}, "at most one of")],
)
def test_bad_latency_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecipeConfig(recipe="iterative", **kwargs).validate()


def test_round_to_flag_parses_auto():
    args = ITERATIVE.get_args_parser().parse_args(["--round-to", "auto"])
    assert args.round_to == "auto"
    with pytest.raises(SystemExit):
        ITERATIVE.get_args_parser().parse_args(["--round-to", "0"])
