"""Iterative pruning (docs/method.md, section 4): train, then n rounds of estimate -> prune -> retrain.

Round k removes r_k = p / (k p + n (1 - p)) of the *current* filters, so P% of the original filters are gone
after n rounds (or follow --thresholds, cumulative %, or shrink to --target-macs of the dense MACs).
OrthoReg trains with the regularizer before every estimate: base training, ortho training, then per round
retrain + regularized fine-tune (the last round only retrains). Baselines retrain after every round.

Quick digits run (a couple of CPU minutes):
    python recipes/iterative.py --method orthoreg --prune-percent 75 --rounds 3 --output-dir runs/it-orthoreg
Paper settings (GPU):
    python recipes/iterative.py --preset paper --model vgg13 --dataset cifar100 --method orthoreg \
        --prune-percent 75 --rounds 3 --output-dir runs/vgg13-it-orthoreg-75
Multi-GPU: torchrun --nproc_per_node 4 recipes/iterative.py ...  (same options)
"""

from __future__ import annotations

import argparse

from orthoreg_tp.engine.config import add_common_args, add_schedule_args, config_from_args
from orthoreg_tp.engine.experiment import Experiment, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    return add_schedule_args(add_common_args(parser))


def main(args: argparse.Namespace) -> dict:
    cfg = config_from_args(args, recipe="iterative")
    with Experiment(cfg) as exp:
        regularized = exp.method.regularized
        exp.train("base")
        exp.record_round(0, target=0.0)
        if regularized:
            exp.train("ortho", regularized=True)
        rounds = cfg.rounds if cfg.target_macs is not None else len(cfg.round_targets())
        for k in range(1, rounds + 1):
            if cfg.target_macs is not None:
                target = None
                exp.prune(target_macs=exp.dense_macs * cfg.target_macs ** (k / rounds), round_index=k)
            else:
                target = cfg.round_targets()[k - 1]
                # a fraction of the channels still present: corrects for rounding in earlier rounds
                exp.prune(ratio=max(0.0, 1.0 - (1.0 - target) / exp.remaining), round_index=k)
            exp.train("ortho_retrain" if regularized else "retrain", round_index=k)
            exp.record_round(k, target=target)
            if regularized and k < rounds:
                exp.train("ortho_finetune", regularized=True, round_index=k)
        return exp.finish()


if __name__ == "__main__":
    run_cli(get_args_parser(), main)
