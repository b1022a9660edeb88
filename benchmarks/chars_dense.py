"""Dense test accuracy of the paper's models (VGG-13, ResNet-34, MobileNet-V1) at CPU widths on ``chars``.

The difficulty check of the offline ``chars`` dataset (docs/data-chars.md): each model is built from the
project's classes with every width multiplied by ``--width`` and trained from scratch with the paper's recipe
(SGD, momentum 0.9, weight decay 1e-4, step learning rates, random crop with padding 4, no flip) on the whole
training set; the test set is rendered from fonts the training set never saw.

Run (the measured commands, times and accuracies are in docs/data-chars.md)::

    python benchmarks/chars_dense.py --models vgg13 --width 0.125 --schedule 0.05:10,0.005:5 --batch-size 64 \\
        --threads 1

Each finished model is appended to the JSON file (a rerun skips the models it already holds for the same
settings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from orthoreg_tp.engine.data import build_datasets
from orthoreg_tp.engine.models import CifarResNet, MobileNetV1
from orthoreg_tp.engine.models.mobilenet import MOBILENET_V1_CFG
from orthoreg_tp.engine.models.vgg import VGG, VGG13_CFG
from orthoreg_tp.engine.training import LRSchedule, build_optimizer, evaluate, set_lr, train_one_epoch

MODELS = ("vgg13", "resnet34", "mobilenet_v1")


def build_scaled(name: str, *, width: float, num_classes: int) -> nn.Module:
    """The paper's model with every channel count multiplied by ``width`` (at least 4)."""
    def scale(c: int) -> int:
        return max(4, round(c * width))

    if name == "vgg13":
        return VGG(tuple(v if v == "M" else scale(int(v)) for v in VGG13_CFG), num_classes=num_classes)
    if name == "resnet34":
        return CifarResNet((3, 4, 6, 3), tuple(scale(c) for c in (64, 128, 256, 512)), num_classes=num_classes)
    if name == "mobilenet_v1":
        cfg = tuple((scale(c), s) for c, s in MOBILENET_V1_CFG)
        return MobileNetV1(num_classes=num_classes, cfg=cfg, stem_width=scale(32))
    raise ValueError(f"unknown model, got {name!r}; choose one of {list(MODELS)}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--width", type=float, default=0.125, help="channel multiplier (CPU widths)")
    p.add_argument("--schedule", default="0.05:10,0.005:5", help="lr:epochs,... (step schedule; paper: 0.1 first)")
    p.add_argument("--batch-size", type=int, default=64, help="the paper: 128; 64 gives narrow nets more steps")
    p.add_argument("--train-images", type=int, default=None, help="first N training images (default: all)")
    p.add_argument("--data-path", default=None, help="chars cache folder (default ~/.cache/orthoreg_tp/chars)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="benchmarks/results/chars_dense.json")
    return p


def train_and_test(name: str, args: argparse.Namespace, train_set, test_set, num_classes: int) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build_scaled(name, width=args.width, num_classes=num_classes)
    schedule = LRSchedule.parse(args.schedule)
    optimizer = build_optimizer(model, lr=schedule.lrs[0])
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=512)
    device, start, curve = torch.device("cpu"), time.perf_counter(), []
    for epoch in range(schedule.total_epochs):
        set_lr(optimizer, schedule.lr_at(epoch))
        stats = train_one_epoch(model, loader, optimizer, device=device, progress=False)
        test = evaluate(model, test_loader, device=device)
        curve.append({"epoch": epoch + 1, "train_acc": round(stats["acc"], 2), "test_acc": round(test["acc"], 2)})
        print(f"{name} epoch {epoch + 1}: train {stats['acc']:.1f}% test {test['acc']:.1f}% "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "width": args.width, "schedule": args.schedule, "batch_size": args.batch_size,
            "seed": args.seed, "train_images": len(train_set), "test_images": len(test_set), "params": params,
            "test_acc": curve[-1]["test_acc"], "train_acc": curve[-1]["train_acc"],
            "seconds": round(time.perf_counter() - start, 1), "curve": curve}


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    train_set, test_set, info = build_datasets("chars", image_size=32, data_path=args.data_path)
    if args.train_images:
        train_set = torch.utils.data.Subset(train_set, range(args.train_images))
    out = Path(args.output)
    rows = json.loads(out.read_text()) if out.is_file() else []
    for name in args.models:
        settings = {"model": name, "width": args.width, "schedule": args.schedule, "batch_size": args.batch_size,
                    "seed": args.seed, "train_images": len(train_set)}
        if any(all(r.get(k) == v for k, v in settings.items()) for r in rows):
            print(f"{name}: already in {out}, skipped")
            continue
        row = train_and_test(name, args, train_set, test_set, info.num_classes)
        row["command"] = "python benchmarks/chars_dense.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if k not in ("model", "train_images"))
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        print(f"{name} (width {args.width}): dense test accuracy {row['test_acc']:.2f}% in {row['seconds']:.0f} s")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
