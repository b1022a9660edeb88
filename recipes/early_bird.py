"""Early-bird tickets (docs/method.md, section 4): short training, one pruning step, full retraining of the ticket.

The network trains for the eb_train phase (25 epochs in the paper preset; with the OrthoReg regularizer for
--method orthoreg), is pruned once by P%, and the pruned net trains for the eb_retrain phase. With --eb-detect,
the pruning mask is computed after every epoch and eb_train stops as soon as the normalized Hamming distance
between consecutive masks stays under --eb-threshold for --eb-patience epochs (You et al., ICLR 2020: 0.1 over
5 epochs); results.json reports the epoch it fired.

Quick digits run (about a CPU minute):
    python recipes/early_bird.py --method orthoreg --prune-percent 50 --eb-detect --output-dir runs/eb-orthoreg
Paper settings (GPU):
    python recipes/early_bird.py --preset paper --model resnet34 --dataset cifar100 --method orthoreg \
        --prune-percent 50 --output-dir runs/resnet34-eb-orthoreg-50
"""

from __future__ import annotations

import argparse

from orthoreg_tp.engine.config import add_common_args, add_early_bird_args, config_from_args
from orthoreg_tp.engine.earlybird import EarlyBirdDetector, pruning_mask
from orthoreg_tp.engine.experiment import Experiment, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    return add_early_bird_args(add_common_args(parser))


def main(args: argparse.Namespace) -> dict:
    cfg = config_from_args(args, recipe="early_bird")
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


if __name__ == "__main__":
    run_cli(get_args_parser(), main)
