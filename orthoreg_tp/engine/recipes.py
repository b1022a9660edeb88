"""The recipes' procedures (docs/method.md, section 4): iterative pruning, early-bird tickets, comparing runs.

``orthoreg-tp iterative|early-bird|compare`` and the scripts in ``recipes/`` both call these.

Example:
    >>> results = iterative(RecipeConfig(method="l1", output_dir="/tmp/it").resolved())  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import RecipeConfig
from .earlybird import EarlyBirdDetector, pruning_mask
from .experiment import Experiment
from .records import check_comparable, default_plot_path, markdown_table, merge_results, plot_results, table_rows


def iterative(cfg: RecipeConfig) -> dict[str, Any]:
    """Train, then n rounds of estimate -> prune -> retrain; returns ``results.json``'s content.

    Round k removes r_k = p / (k p + n (1 - p)) of the *current* filters, so P% of the original filters are gone
    after n rounds (or follow ``thresholds``, cumulative %, or shrink to ``target_macs`` of the dense MACs).
    OrthoReg trains with the regularizer before every estimate: base training, ortho training, then per round
    retrain + regularized fine-tune (the last round only retrains). Baselines retrain after every round.

    Args:
        cfg: A resolved config (``recipe="iterative"``).
    """
    with Experiment(cfg) as exp:
        regularized = exp.method.regularized
        exp.train("base")
        exp.record_round(0, target=0.0)
        if regularized:
            exp.train("ortho", regularized=True)
        budget = cfg.target_macs is not None or cfg.target_latency is not None
        rounds = cfg.rounds if budget else len(cfg.round_targets())
        for k in range(1, rounds + 1):
            if cfg.target_macs is not None:
                target = None
                exp.prune(target_macs=exp.dense_macs * cfg.target_macs ** (k / rounds), round_index=k)
            elif cfg.target_latency is not None:  # the same share of the current latency every round
                target = None
                exp.prune(target_latency=cfg.target_latency ** (1 / rounds), round_index=k)
            else:
                target = cfg.round_targets()[k - 1]
                # a fraction of the channels still present: corrects for rounding in earlier rounds
                exp.prune(ratio=max(0.0, 1.0 - (1.0 - target) / exp.remaining), round_index=k)
            exp.train("ortho_retrain" if regularized else "retrain", round_index=k)
            exp.record_round(k, target=target)
            if regularized and k < rounds:
                exp.train("ortho_finetune", regularized=True, round_index=k)
        return exp.finish()


def early_bird(cfg: RecipeConfig) -> dict[str, Any]:
    """Short training, one pruning step, full retraining of the ticket; returns ``results.json``'s content.

    The network trains for the eb_train phase (with the OrthoReg regularizer for ``method="orthoreg"``), is pruned
    once by P%, and the pruned net trains for the eb_retrain phase. With ``eb_detect``, the pruning mask is
    computed after every epoch and eb_train stops as soon as the normalized Hamming distance between consecutive
    masks stays under ``eb_threshold`` for ``eb_patience`` epochs (You et al., ICLR 2020); the results report the
    epoch it fired.

    Args:
        cfg: A resolved config (``recipe="early_bird"``).
    """
    ratio = cfg.prune_percent / 100.0
    with Experiment(cfg) as exp:
        detector = EarlyBirdDetector(threshold=cfg.eb_threshold, patience=cfg.eb_patience)
        if "early_bird" in exp.extra:
            detector.load_state_dict(exp.extra["early_bird"])

        def check_mask(epoch: int) -> bool:
            exp.feed_importance()
            mask = pruning_mask(exp.model, exp.example_inputs, exp.importance, ratio=ratio,
                                seed=cfg.seed)
            fired = detector.update(mask, epoch=epoch + 1)
            exp.extra["early_bird"] = detector.state_dict()
            exp.notes["early_bird"] = {"fired_epoch": detector.fired_epoch, "distances": detector.distances,
                                       "threshold": cfg.eb_threshold, "patience": cfg.eb_patience}
            return fired

        exp.train("eb_train", regularized=exp.method.regularized,
                  on_epoch_end=check_mask if cfg.eb_detect else None)
        exp.record_round(0, target=0.0)
        exp.prune(ratio=ratio, round_index=1)
        exp.train("eb_retrain", round_index=1)
        exp.record_round(1, target=ratio, eb_epoch=detector.fired_epoch)
        return exp.finish()


def compare(runs: Sequence[str | os.PathLike], *, plot: str | os.PathLike | None = None,
            csv_path: str | os.PathLike | None = None, title: str = "",
            mixed: bool = False) -> tuple[list[dict[str, Any]], str, Path]:
    """Merge recipe runs into one table (and a plot, and optionally a CSV).

    Args:
        runs: Run folders or their ``results.json``.
        plot: PNG to write (accuracy against pruned % and MACs); ``None``: ``compare.png`` next to the runs.
        csv_path: Also write the table as CSV.
        title: The plot's title.
        mixed: Allow runs of different datasets or models in one table and figure.

    Returns:
        ``(rows, markdown, plot path)``: one row per run and round, the table as Markdown, the PNG written.

    Raises:
        FileNotFoundError: A run has no ``results.json``.
        ValueError: Runs of different datasets or models without ``mixed``.
    """
    merged = merge_results(runs)
    check_comparable(merged, mixed=mixed)
    rows = table_rows(merged)
    plot = Path(plot) if plot is not None else default_plot_path(runs)
    plot_results([(label, results["rows"]) for label, results in merged], plot, title=title)
    if csv_path and rows:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows, markdown_table(rows), plot
