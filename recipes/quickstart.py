"""Quickstart: OrthoReg end to end on scikit-learn's digits, offline, in about a minute on 2 CPU cores.

Trains a small CNN with the OrthoReg regularizer, estimates ``OrthoRegImportance`` over the training set,
removes 50% of the filters with torch-pruning (ranked globally), fine-tunes briefly, and prints a
before/after table (accuracy, parameters, MACs, orthonormality).

    python recipes/quickstart.py                 # the defaults below
    python recipes/quickstart.py --ratio 0.7 --epochs 12 --output runs/quickstart.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from orthoreg_tp import OrthoRegImportance, OrthoRegularizer, find_classifier, mean_orthonormality, prunable_channels
from orthoreg_tp.engine.data import build_datasets
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.engine.training import build_optimizer, evaluate, set_lr, train_one_epoch

logger = logging.getLogger("quickstart")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--model", default="tiny_cnn", help="any orthoreg_tp.engine.models name (default: tiny_cnn)")
    p.add_argument("--image-size", type=int, default=16, help="digits are upsampled from 8x8 to this size")
    p.add_argument("--epochs", type=int, default=15, help="regularized training epochs")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs after pruning")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--coefficient", type=float, default=1e-2, help="OrthoReg lambda (paper: 1e-2 for VGG/ResNet)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of prunable filters to remove")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default: 1 on machines with up to 4 cores (faster for this tiny model), "
                        "else torch's default")
    p.add_argument("--output", type=Path, default=None, help="optional JSON file for the table")
    return p


def measure(model: torch.nn.Module, loader: DataLoader, example: torch.Tensor) -> dict[str, float]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"acc": evaluate(model, loader, device=torch.device("cpu"))["acc"], "params": params, "macs": macs,
            "orthonormality": mean_orthonormality(model)}


def train(model, loader, epochs, lr, regularizer, desc) -> None:
    optimizer = build_optimizer(model, lr=lr, regularized=regularizer is not None)
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch"):
        set_lr(optimizer, lr if epoch < max(1, int(0.75 * epochs)) else lr / 10)
        train_one_epoch(model, loader, optimizer, device=torch.device("cpu"), regularizer=regularizer,
                        progress=False)


def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if not 0.0 <= args.ratio < 1.0:
        raise SystemExit(f"--ratio must be in [0, 1), got {args.ratio!r}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads!r}")
    threads = args.threads or (1 if (os.cpu_count() or 1) <= 4 else torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_set, test_set, info = build_datasets("digits", image_size=args.image_size, in_chans=1)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)
    example = train_set[0][0].unsqueeze(0)
    model = build_model(args.model, num_classes=info.num_classes, in_chans=info.in_chans)

    regularizer = OrthoRegularizer(model, coefficient=args.coefficient)
    train(model, train_loader, args.epochs, args.lr, regularizer, "train (OrthoReg)")
    rows = {"trained": measure(model, test_loader, example)}

    importance = OrthoRegImportance()
    importance.accumulate(model, DataLoader(train_set, batch_size=256), num_samples=len(train_set))
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=True,
                                  pruning_ratio=args.ratio, max_pruning_ratio=0.95,
                                  ignored_layers=[find_classifier(model)])
    channels = prunable_channels(pruner)
    pruner.step()
    achieved = 1 - prunable_channels(pruner) / channels
    rows["pruned"] = measure(model, test_loader, example)

    train(model, train_loader, args.finetune_epochs, args.lr / 5, None, "fine-tune")
    rows["fine-tuned"] = measure(model, test_loader, example)

    seconds = round(time.perf_counter() - start, 2)  # measured by this run, data loading included
    print(f"\nOrthoReg on digits ({args.model}, {args.image_size}x{args.image_size}): removed {achieved:.1%} of "
          f"{channels} filters in {seconds:.0f} s ({threads} CPU thread{'s' if threads > 1 else ''})")
    print(f"{'stage':<11} {'test acc %':>10} {'params':>9} {'MACs':>11} {'orthonormality':>15}")
    for stage, r in rows.items():
        print(f"{stage:<11} {r['acc']:>10.1f} {r['params']:>9,.0f} {r['macs']:>11,.0f} {r['orthonormality']:>15.3f}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                           "achieved_ratio": achieved, "seconds": seconds,
                                           "threads": threads, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
