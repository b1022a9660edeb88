"""Iterative pruning (docs/method.md, section 4): train, then n rounds of estimate -> prune -> retrain.

Round k removes r_k = p / (k p + n (1 - p)) of the *current* filters, so P% of the original filters are gone
after n rounds (or follow --thresholds, cumulative %, or shrink to --target-macs of the dense MACs).
OrthoReg trains with the regularizer before every estimate: base training, ortho training, then per round
retrain + regularized fine-tune (the last round only retrains). Baselines retrain after every round.
The same as `orthoreg-tp iterative` (orthoreg_tp/engine/recipes.py holds the procedure); --config FILE reads
options from JSON/YAML (a run's config.json reruns it), flags override it.

Quick digits run (a couple of CPU minutes):
    python recipes/iterative.py --method orthoreg --prune-percent 75 --rounds 3 --output-dir runs/it-orthoreg
Paper settings (GPU):
    python recipes/iterative.py --preset paper --model vgg13 --dataset cifar100 --method orthoreg \
        --prune-percent 75 --rounds 3 --output-dir runs/vgg13-it-orthoreg-75
Multi-GPU: torchrun --nproc_per_node 4 recipes/iterative.py ...  (same options)
"""

from __future__ import annotations

import argparse

from orthoreg_tp.engine.cli import iterative_parser, run_iterative
from orthoreg_tp.engine.experiment import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    return iterative_parser()


def main(args: argparse.Namespace) -> dict:
    return run_iterative(args)


if __name__ == "__main__":
    run_cli(get_args_parser(), main)
