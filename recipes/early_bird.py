"""Early-bird tickets (docs/method.md, section 4): short training, one pruning step, full retraining of the ticket.

The network trains for the eb_train phase (25 epochs in the paper preset; with the OrthoReg regularizer for
--method orthoreg), is pruned once by P%, and the pruned net trains for the eb_retrain phase. With --eb-detect,
the pruning mask is computed after every epoch and eb_train stops as soon as the normalized Hamming distance
between consecutive masks stays under --eb-threshold for --eb-patience epochs (You et al., ICLR 2020: 0.1 over
5 epochs); results.json reports the epoch it fired.
The same as `orthoreg-tp early-bird` (orthoreg_tp/engine/recipes.py holds the procedure); --config FILE reads
options from JSON/YAML, flags override it.

Quick digits run (about a CPU minute):
    python recipes/early_bird.py --method orthoreg --prune-percent 50 --eb-detect --output-dir runs/eb-orthoreg
Paper settings (GPU):
    python recipes/early_bird.py --preset paper --model resnet34 --dataset cifar100 --method orthoreg \
        --prune-percent 50 --output-dir runs/resnet34-eb-orthoreg-50
"""

from __future__ import annotations

import argparse

from orthoreg_tp.engine.cli import early_bird_parser, run_early_bird
from orthoreg_tp.engine.experiment import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    return early_bird_parser()


def main(args: argparse.Namespace) -> dict:
    return run_early_bird(args)


if __name__ == "__main__":
    run_cli(get_args_parser(), main)
