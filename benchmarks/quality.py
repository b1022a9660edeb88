"""Quality benchmark: accuracy of each pruning criterion at 2x / 4x / 8x fewer MACs, plus early-bird tickets.

The PruningBench protocol on the offline ``chars`` data (issue 16): for each model (a VGG-13-style and a
CIFAR ResNet-18-style network at CPU widths) and seed,

* **dense**: one plain training (``base``) shared by all criteria; then the plain family (fisher, taylor, l1,
  bn, random) continues plainly (weight decay 1e-4) and orthoreg continues with its regularizer (weight decay 0)
  for the same ``ortho`` epochs, so both dense models have had the same budget;
* **iterative**: per criterion, rounds that each prune (global ranking with the per-layer floor, through
  ``orthoreg_tp.adapters.prune(..., target=("macs", f))``) to ``dense MACs / s`` for s = 2, 4, 8, then fine-tune
  the same ``finetune`` epochs (orthoreg with its regularizer, as it re-regularizes before every estimate; the
  others plainly); the test accuracy is recorded there. ``between`` epochs (0 in the CPU presets) may be added
  before each later round, regularized for orthoreg;
* **early-bird tickets** (orthoreg, fisher, bn): a short training (``eb_train``; regularized for orthoreg), one
  prune by 25 / 50 / 75% of the filters, then the ticket is retrained ``eb_retrain`` epochs; each ticket's MACs
  are recorded, so tickets can be compared at equal cost.

Every finished run is appended to ``NAME.runs.jsonl`` at once, and dense models are cached, so an interrupted
run continues where it stopped (runs of another configuration are ignored). The tables (``NAME.md``), all
records (``NAME.json``) and the plot (``NAME.png``) are rewritten after every task.

    python benchmarks/quality.py --threads 1 --workers 2          # full CPU preset (see PRESETS)
    python benchmarks/quality.py --quick --output-dir /tmp/quality  # under 15 minutes
    python benchmarks/quality.py --preset gpu --device cuda --workers 1
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, command, machine, machine_line, markdown_table, resolve_device, write_results
from orthoreg_tp.adapters import PruningError, prune
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from orthoreg_tp import OrthoRegularizer, layer_widths
from orthoreg_tp.engine.data import build_datasets
from orthoreg_tp.engine.methods import build_importance, feed_importance_, get_method
from orthoreg_tp.engine.models import CifarResNet
from orthoreg_tp.engine.models.vgg import VGG, VGG13_CFG
from orthoreg_tp.engine.pruning import count_macs_params
from orthoreg_tp.engine.training import (
    LRSchedule,
    build_optimizer,
    evaluate,
    recalibrate_bn_,
    set_lr,
    train_one_epoch,
)

logger = logging.getLogger("quality")

METHODS = ("orthoreg", "fisher", "taylor", "l1", "bn", "random")
EB_METHODS = ("orthoreg", "fisher", "bn")
# the same criterion ranked another way: "NAME-NORMALIZER" (e.g. orthoreg-mean: OrthoReg's scores mean-normalized
# per group before the global ranking, whatever --normalizer says)
VARIANTS: dict[str, tuple[str, str]] = {f"{m}-mean": (m, "mean") for m in ("orthoreg", "fisher")}
CHOICES = (*METHODS, *VARIANTS)
MODELS = ("vgg13", "resnet18")
# How each criterion's scores are ranked across layers when --normalizer is "default": as its library does out of
# the box (the project's loss-based importances raw, torch-pruning's magnitude, BN and Taylor ones mean-normalized
# per group: their defaults when passed to a torch-pruning pruner)
DEFAULT_NORMALIZERS: dict[str, str | None] = {"orthoreg": None, "fisher": None, "taylor": "mean", "l1": "mean",
                                              "bn": "mean", "random": None}
TOLERANCES = (0.05, 0.15, 0.3)  # lower side of the MACs band: the default first, wider where the MACs jump
PHASES = ("base", "ortho", "finetune", "between", "eb_train", "eb_retrain")

# Sizing. "full": the whole chars set at width 0.125 (dense 85-92% in trial runs), 2 worker processes x 1 thread on
# 2 CPU cores (see benchmarks/results/quality.md for its measured time); "quick": the pipeline once on a subset
# (under 15 minutes there); "gpu": the same protocol at 4x the widths and longer schedules (not run here);
# "smoke": the test's (seconds, on digits).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "device": "cpu", "workers": 2,
        "eb_models": list(MODELS),  # measured: 68 min without the ResNet-18 tickets, 32 min more with them
        "width": 0.125,  # VGG-13 8..64 channels, ResNet-18 8..64
        "train_images": None, "test_images": None,  # all: 11,750 and 2,350
        "seeds": [0, 1, 2], "batch_size": 64, "importance_samples": 1000,
        # lr 0.05: a width-0.125 VGG-13 leaves chance in epoch 3 and reaches 89.8% in 10 epochs on chars v3
        "phases": {"base": "0.05:8,0.005:2", "ortho": "0.02:1,0.002:1", "finetune": "0.01:2",
                   "between": "0.01:0", "eb_train": "0.05:3", "eb_retrain": "0.05:4,0.005:1"},
    },
    "quick": {  # the whole pipeline once: one seed, all training images, shorter schedules; a check, not a result
        "device": "cpu", "workers": 2,
        "eb_models": ["vgg13"], "width": 0.125, "train_images": None, "test_images": 1175, "seeds": [0],
        "batch_size": 64, "importance_samples": 500,
        "phases": {"base": "0.05:7,0.005:1", "ortho": "0.02:1", "finetune": "0.01:1",
                   "between": "0.01:0", "eb_train": "0.05:2", "eb_retrain": "0.05:3"},
    },
    "gpu": {
        "device": "cuda", "workers": 1,
        "eb_models": list(MODELS), "width": 0.5, "train_images": None, "test_images": None, "seeds": [0, 1, 2],
        "batch_size": 128, "importance_samples": 10_000,  # the paper's
        "phases": {"base": "0.05:30,0.005:10", "ortho": "0.02:8,0.002:2", "finetune": "0.01:8,0.001:2",
                   "between": "0.01:0", "eb_train": "0.05:10", "eb_retrain": "0.05:30,0.005:10"},
    },
    "smoke": {
        "device": "cpu", "workers": 1,
        "eb_models": list(MODELS), "width": 0.0625, "train_images": 128, "test_images": 128, "seeds": [0],
        "batch_size": 64, "importance_samples": 64,
        "phases": {"base": "0.05:1", "ortho": "0.05:1", "finetune": "0.01:1", "between": "0.01:1",
                   "eb_train": "0.05:1", "eb_retrain": "0.01:1"},
    },
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="sizing (default: full CPU run)")
    p.add_argument("--quick", action="store_true", help="shorthand for --preset quick")
    g = p.add_argument_group("data and models")
    g.add_argument("--dataset", default="chars", help="an orthoreg_tp.engine.data dataset (default: chars)")
    g.add_argument("--data-path", default=None)
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    g.add_argument("--width", type=float, default=None, help="channel multiplier of both models (preset)")
    g.add_argument("--train-images", type=int, default=None, help="training subset size (preset; 0: all)")
    g.add_argument("--test-images", type=int, default=None, help="test subset size (preset; 0: all)")
    g = p.add_argument_group("protocol")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=CHOICES,
                   help="criteria (variants: orthoreg-mean, fisher-mean rank mean-normalized scores)")
    g.add_argument("--speedups", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="MACs speed-ups, rising")
    g.add_argument("--eb-models", nargs="*", default=None, choices=MODELS,
                   help="models of the early-bird tickets (preset; the authors' table is a ResNet's)")
    g.add_argument("--eb-methods", nargs="*", default=list(EB_METHODS), choices=CHOICES)
    g.add_argument("--eb-percents", type=float, nargs="*", default=[25.0, 50.0, 75.0], help="%% filters removed")
    g.add_argument("--seeds", type=int, nargs="+", default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--importance-samples", type=int, default=None)
    g.add_argument("--coefficient", type=float, default=1e-2, help="OrthoReg lambda (the paper's VGG/ResNet value)")
    g.add_argument("--min-keep", type=float, default=0.1,
                   help="per-layer floor: fraction of each layer's dense width always kept (PruningBench: 0.1)")
    g.add_argument("--normalizer", default="default", choices=["default", "none", "mean", "max", "sum"],
                   help="per-group score normalization before global ranking; default: each criterion's library "
                        "default (orthoreg and fisher raw, taylor/l1/bn mean)")
    g.add_argument("--bn-recal-batches", type=int, default=20,
                   help="batches that re-estimate BN statistics after each prune, before its accuracy is measured "
                        "(0: off)")
    for phase in PHASES:
        g.add_argument(f"--{phase.replace('_', '-')}", dest=phase, default=None, metavar="LR:EPOCHS,...",
                       help=f"schedule of the {phase} phase (preset)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="preset: cuda for gpu, else cpu")
    g.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    g.add_argument("--workers", type=int, default=None, help="worker processes (1: in this process; preset)")
    g.add_argument("--output-dir", default=str(RESULTS), help="where NAME.{json,md,png,runs.jsonl} go")
    g.add_argument("--cache-dir", default=None, help="dense-model cache (default: ~/.cache/orthoreg_tp/quality)")
    g.add_argument("--name", default="quality")
    g.add_argument("--report-only", action="store_true", help="rewrite the tables from the records; train nothing")
    g.add_argument("--config-hash", default=None,
                   help="with --report-only: report the records of this configuration hash (e.g. made on data "
                        "that has changed since)")
    g.add_argument("--note", default=None, help="a line added to NAME.md and NAME.json (e.g. how a resumed run went)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset and check them."""
    if args.quick:
        args.preset = "quick"
    preset = PRESETS[args.preset]
    for key in ("device", "workers", "eb_models", "width", "train_images", "test_images", "seeds", "batch_size",
                "importance_samples"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    for phase in PHASES:
        setattr(args, phase, str(LRSchedule.parse(getattr(args, phase) or preset["phases"][phase])))
    if list(args.speedups) != sorted(args.speedups) or any(s <= 1 for s in args.speedups):
        raise SystemExit(f"--speedups must rise and be > 1, got {args.speedups!r}")
    if any(not 0 < q < 95 for q in args.eb_percents):
        raise SystemExit(f"--eb-percents must be in (0, 95), got {args.eb_percents!r}")
    if not 0 <= args.min_keep < 1:
        raise SystemExit(f"--min-keep must be in [0, 1), got {args.min_keep!r}")
    if args.bn_recal_batches < 0:
        raise SystemExit(f"--bn-recal-batches must be >= 0, got {args.bn_recal_batches!r}")
    if args.workers < 1 or args.threads < 1:
        raise SystemExit(f"--workers and --threads must be >= 1, got {args.workers!r} and {args.threads!r}")
    return args


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """What the results depend on (records of another configuration are not reused)."""
    keys = ("dataset", "data_fingerprint", "image_size", "width", "train_images", "test_images", "batch_size",
            "importance_samples", "coefficient", "speedups", "min_keep", "normalizer", "bn_recal_batches", *PHASES)
    return {k: getattr(args, k) for k in keys}


def config_hash(args: argparse.Namespace) -> str:
    return hashlib.sha1(json.dumps(config_of(args), sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- models and data
def build_net(name: str, *, width: float, num_classes: int, in_chans: int = 3) -> nn.Module:
    """VGG-13 (conv-ReLU-BN, the paper's) or a CIFAR ResNet-18 (BasicBlocks [2, 2, 2, 2]) with scaled widths."""
    def scale(c: int) -> int:
        return max(4, round(c * width))

    if name == "vgg13":
        return VGG(tuple(v if v == "M" else scale(int(v)) for v in VGG13_CFG), num_classes=num_classes,
                   in_chans=in_chans)
    if name == "resnet18":
        return CifarResNet((2, 2, 2, 2), tuple(scale(c) for c in (64, 128, 256, 512)), num_classes=num_classes,
                           in_chans=in_chans)
    raise ValueError(f"unknown model, got {name!r}; choose one of {list(MODELS)}")


def criterion(method_name: str) -> Any:
    """The engine's method behind a criterion name (a variant's base method)."""
    return get_method(VARIANTS.get(method_name, (method_name,))[0])


def normalizer_of(method_name: str, choice: str) -> str | None:
    """The per-group normalizer a criterion ranks with: a variant's own; else its library default for
    ``"default"``, none for ``"none"``."""
    if method_name in VARIANTS:
        return VARIANTS[method_name][1]
    if choice == "default":
        return DEFAULT_NORMALIZERS[method_name]
    return None if choice == "none" else choice


def _subset(dataset: Any, count: int | None, seed: int) -> Dataset:
    """A fixed random subset (the whole set when ``count`` is 0/None); items keep the set's augmentation."""
    n = len(dataset)
    if not count or count >= n:
        return dataset
    return Subset(dataset, torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def prepare_data(args: argparse.Namespace) -> str:
    """Build the data once and freeze it for the workers (``data.pt`` in the cache); return its fingerprint.

    The fingerprint (sizes, classes, the first test images) enters the configuration hash, so records made on other
    data are not reused; the workers read the frozen file, so a dataset changed on disk mid-run cannot mix in.
    """
    train, test, info = build_datasets(args.dataset, data_path=args.data_path, image_size=args.image_size,
                                       in_chans=3)
    train, test = _subset(train, args.train_images, 1234), _subset(test, args.test_images, 4321)
    digest = hashlib.sha1(f"{len(train)} {len(test)} {info.num_classes}".encode())
    for i in range(min(32, len(test))):
        x, y = test[i]
        digest.update(torch.as_tensor(x).numpy().tobytes() + str(int(y)).encode())
    args.data_fingerprint = digest.hexdigest()[:10]
    args.data_source = getattr(info, "source", None)
    path = cache_dir(args) / "data.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"train": train, "test": test, "num_classes": info.num_classes}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return args.data_fingerprint


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """The frozen data of :func:`prepare_data` (written by this benchmark: not untrusted input)."""
    data = torch.load(cache_dir(args) / "data.pt", weights_only=False)
    return data["train"], data["test"], data["num_classes"]


class Bench:
    """Data, loaders and training helpers of one worker."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        self.train_set, self.test_set, self.num_classes = load_data(args)
        self.test_loader = DataLoader(self.test_set, batch_size=512)
        self.score_loader = DataLoader(self.train_set, batch_size=128)
        self.example = self.train_set[0][0].unsqueeze(0).to(self.device)

    def new_model(self, name: str, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_net(name, width=self.args.width, num_classes=self.num_classes).to(self.device)

    def train(self, model: nn.Module, phase: str, *, seed: int, regularized: bool = False) -> None:
        """Train one phase (SGD, momentum 0.9; weight decay 1e-4, or 0 with the OrthoReg regularizer)."""
        schedule = LRSchedule.parse(getattr(self.args, phase))
        reg = OrthoRegularizer(model, self.args.coefficient) if regularized else None
        optimizer = build_optimizer(model, lr=schedule.lrs[0], regularized=regularized)
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(self.train_set, batch_size=self.args.batch_size, shuffle=True, generator=gen)
        for epoch in range(schedule.total_epochs):
            set_lr(optimizer, schedule.lr_at(epoch))
            train_one_epoch(model, loader, optimizer, device=self.device, regularizer=reg, progress=False)

    def importance(self, method_name: str, model: nn.Module, *, seed: int) -> Any:
        """The criterion behind the per-layer floor, normalized as ``--normalizer`` says."""
        return build_importance(criterion(method_name), layer_widths(model), seed=seed,
                                min_keep_ratio=self.args.min_keep,
                                normalizer=normalizer_of(method_name, self.args.normalizer))

    def pruned_accuracy(self, model: nn.Module, *, seed: int) -> float:
        """Test accuracy right after a prune, batch-norm statistics re-estimated first (if asked)."""
        if self.args.bn_recal_batches:
            gen = torch.Generator().manual_seed(seed)
            loader = DataLoader(self.train_set, batch_size=self.args.batch_size, shuffle=True, generator=gen)
            recalibrate_bn_(model, loader, device=self.device, batches=self.args.bn_recal_batches)
        return self.accuracy(model)

    def accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.test_loader, device=self.device)["acc"]

    def cost(self, model: nn.Module) -> tuple[int, int]:
        macs, params = count_macs_params(model, self.example)
        return int(macs), int(params)

    def prune_step(self, model: nn.Module, method_name: str, importance: Any, *, seed: int,
                   macs_fraction: float | None = None, ratio: float | None = None) -> float:
        """Feed the importance, prune in place (the one pruning path); return the channels removed."""
        method = criterion(method_name)
        feed_importance_(method, importance, model, self.score_loader, num_samples=self.args.importance_samples,
                         progress=False)
        if macs_fraction is None:
            report = prune(model, self.example, importance=importance, ratio=ratio, seed=seed)
        else:
            report = self._prune_to_budget(model, importance, macs_fraction, seed=seed)
        model.zero_grad(set_to_none=True)
        return float(report.channels_removed)

    def _prune_to_budget(self, model: nn.Module, importance: Any, fraction: float, *, seed: int) -> Any:
        """Keep at most ``fraction`` of the MACs. Where the kept MACs jump past the default 5% band (a whole
        layer's tied scores), widen the band's lower side step by step; the achieved MACs are recorded."""
        for tolerance in TOLERANCES:
            try:
                return prune(model, self.example, importance=importance, target=("macs", fraction), seed=seed,
                             tolerance=tolerance)
            except PruningError as err:
                if tolerance == TOLERANCES[-1] or "no ratio lands in the band" not in str(err):
                    raise
                logger.info("budget %.3f not reachable within %.0f%%, widening: %s", fraction, 100 * tolerance,
                            str(err).splitlines()[0][:200])
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- records
class Records:
    """The append-only run records (``NAME.runs.jsonl``): one JSON line per finished run, written under a lock."""

    def __init__(self, path: Path, config_hash: str):
        self.path, self.hash = path, config_hash

    def load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("config_hash") == self.hash]

    def done(self) -> set[str]:
        return {r["key"] for r in self.load()}

    def add(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**record, "config_hash": self.hash}) + "\n"
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line)
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def run_key(kind: str, model: str, seed: int, method: str = "", extra: str = "") -> str:
    return "/".join(str(p) for p in (kind, model, seed, method, extra) if p != "")


# ---------------------------------------------------------------------------------------------- tasks
def cached_model(bench: Bench, cache: Path, name: str, tag: str, build: Callable[[], nn.Module]) -> nn.Module:
    """The dense-architecture model ``tag`` from the cache, or ``build()`` it and cache its state dict."""
    path = cache / f"{tag}.pt"
    if path.exists():
        model = bench.new_model(name, 0)
        model.load_state_dict(torch.load(path, map_location=bench.device, weights_only=True))
        return model
    model = build()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def trained(bench: Bench, start: nn.Module, phase: str, *, seed: int, regularized: bool = False) -> nn.Module:
    model = copy.deepcopy(start)
    bench.train(model, phase, seed=seed, regularized=regularized)
    return model


def dense_models(bench: Bench, records: Records, cache: Path, name: str, seed: int) -> dict[str, nn.Module]:
    """Shared base training, then the same epochs plainly (plain family) or regularized (orthoreg); recorded."""
    base = cached_model(bench, cache, name, f"{name}-s{seed}-base",
                        lambda: trained(bench, bench.new_model(name, seed), "base", seed=seed))
    models = {family: cached_model(bench, cache, name, f"{name}-s{seed}-{family}",
                                   lambda r=(family == "orthoreg"): trained(bench, base, "ortho", seed=seed + 1,
                                                                             regularized=r))
              for family in ("plain", "orthoreg")}
    done = records.done()
    for family, model in models.items():
        key = run_key("dense", name, seed, family)
        if key not in done:
            macs, params = bench.cost(model)
            records.add({"key": key, "kind": "dense", "model": name, "seed": seed, "family": family,
                         "accuracy": bench.accuracy(model), "macs": macs, "params": params})
    return models


def run_iterative(bench: Bench, dense: nn.Module, method_name: str, *, seed: int) -> dict[str, Any]:
    """Rounds to each speed-up: (between-training,) prune to the MACs budget, fine-tune, record the accuracy.

    orthoreg fine-tunes with its regularizer (weight decay 0), the others plainly: the same epochs for all.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(dense)
    method = criterion(method_name)
    importance = bench.importance(method_name, model, seed=seed)
    dense_macs, dense_params = bench.cost(model)
    rounds: list[dict[str, Any]] = []
    for k, speedup in enumerate(bench.args.speedups, 1):
        if k > 1:  # orthoreg re-regularizes before every estimate; the others train the same epochs plainly
            bench.train(model, "between", seed=seed * 100 + k, regularized=method.regularized)
        current = bench.cost(model)[0]
        row: dict[str, Any] = {"target_speedup": speedup}
        try:
            row["channels_removed"] = bench.prune_step(model, method_name, importance, seed=seed * 100 + k,
                                                       macs_fraction=min(1.0, dense_macs / speedup / current))
        except PruningError as err:
            rounds.append({**row, "error": f"{type(err).__name__}: {err}"})
            logger.warning("%s seed %d: %gx failed: %s", method_name, seed, speedup, err)
            break
        row["acc_pruned"] = bench.pruned_accuracy(model, seed=seed * 100 + k)
        bench.train(model, "finetune", seed=seed * 100 + k, regularized=method.regularized)
        macs, params = bench.cost(model)
        rounds.append({**row, "macs": macs, "params": params, "speedup": dense_macs / macs,
                       "accuracy": bench.accuracy(model)})
    return {"dense_macs": dense_macs, "dense_params": dense_params, "rounds": rounds}


def iterative_task(bench: Bench, records: Records, cache: Path, name: str, seed: int) -> None:
    todo = [m for m in bench.args.methods if run_key("iterative", name, seed, m) not in records.done()]
    if not todo:
        return
    dense = dense_models(bench, records, cache, name, seed)
    for method_name in todo:
        start = time.perf_counter()
        family = "orthoreg" if criterion(method_name).regularized else "plain"
        result = run_iterative(bench, dense[family], method_name, seed=seed)
        records.add({"key": run_key("iterative", name, seed, method_name), "kind": "iterative", "model": name,
                     "seed": seed, "method": method_name, **result, "seconds": time.perf_counter() - start})
        logger.info("%s seed %d %s: %s (%.0f s)", name, seed, method_name, ", ".join(
            f"{r['target_speedup']:g}x {r.get('accuracy', float('nan')):.1f}%" for r in result["rounds"]),
            time.perf_counter() - start)


def run_ticket(bench: Bench, short: nn.Module, method_name: str, percent: float, *, seed: int) -> dict[str, Any]:
    """One early-bird ticket: prune the short-trained model once by ``percent`` of the filters, retrain it."""
    torch.manual_seed(seed)
    model = copy.deepcopy(short)
    dense_macs, dense_params = bench.cost(model)
    importance = bench.importance(method_name, model, seed=seed)
    out: dict[str, Any] = {"percent": percent, "dense_macs": dense_macs, "dense_params": dense_params,
                           "short_acc": bench.accuracy(model)}
    try:
        out["channels_removed"] = bench.prune_step(model, method_name, importance, seed=seed, ratio=percent / 100)
    except PruningError as err:
        return {**out, "error": f"{type(err).__name__}: {err}"}
    out["acc_pruned"] = bench.pruned_accuracy(model, seed=seed)
    bench.train(model, "eb_retrain", seed=seed + 7)
    macs, params = bench.cost(model)
    return {**out, "macs": macs, "params": params, "speedup": dense_macs / macs, "accuracy": bench.accuracy(model)}


def earlybird_task(bench: Bench, records: Records, cache: Path, name: str, seed: int) -> None:
    done = records.done()
    todo = [(m, q) for m in bench.args.eb_methods for q in bench.args.eb_percents
            if run_key("earlybird", name, seed, m, f"{q:g}") not in done]
    shorts: dict[bool, nn.Module] = {}
    for method_name, percent in todo:
        regularized = criterion(method_name).regularized
        if regularized not in shorts:  # short training, shared by the plain criteria (fisher, bn)
            tag = f"{name}-s{seed}-eb{'orthoreg' if regularized else 'plain'}"
            shorts[regularized] = cached_model(bench, cache, name, tag, lambda r=regularized: trained(
                bench, bench.new_model(name, seed), "eb_train", seed=seed, regularized=r))
        start = time.perf_counter()
        result = run_ticket(bench, shorts[regularized], method_name, percent, seed=seed)
        records.add({"key": run_key("earlybird", name, seed, method_name, f"{percent:g}"), "kind": "earlybird",
                     "model": name, "seed": seed, "method": method_name, **result,
                     "seconds": time.perf_counter() - start})
        logger.info("%s seed %d early-bird %s %g%%: %.1f%% at %.2fx MACs (%.0f s)", name, seed, method_name, percent,
                    result.get("accuracy", float("nan")), result.get("speedup", float("nan")),
                    time.perf_counter() - start)


def run_task(task: tuple[str, str, int], args: argparse.Namespace) -> str:
    """One worker task: ``("iterative" | "earlybird", model, seed)``; its finished runs land in the records."""
    torch.set_num_threads(args.threads)
    kind, name, seed = task
    start = time.perf_counter()
    bench = Bench(args)
    records = Records(records_path(args), config_hash(args))
    (iterative_task if kind == "iterative" else earlybird_task)(bench, records, cache_dir(args), name, seed)
    return f"{kind} {name} seed {seed} done in {time.perf_counter() - start:.0f} s"


def records_path(args: argparse.Namespace) -> Path:
    return Path(args.output_dir) / f"{args.name}.runs.jsonl"


def cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir or Path.home() / ".cache" / "orthoreg_tp" / "quality") / config_hash(args)


def expected_keys(args: argparse.Namespace) -> list[str]:
    keys = []
    for name in args.models:
        for seed in args.seeds:
            keys += [run_key("iterative", name, seed, m) for m in args.methods]
            if name in args.eb_models:
                keys += [run_key("earlybird", name, seed, m, f"{q:g}") for m in args.eb_methods
                         for q in args.eb_percents]
    return keys


def tasks_of(args: argparse.Namespace, done: set[str]) -> list[tuple[str, str, int]]:
    """Unfinished tasks: the iterative runs of every seed first (the main table), then the early-bird tickets,
    seed by seed, the costliest model (ResNet) first; a cut-short run still has whole seeds."""
    tasks = []
    models = sorted(args.models, key=lambda n: n != "resnet18")
    for kind in ("iterative", "earlybird"):
        for seed in args.seeds:
            for name in models:
                prefix = run_key(kind, name, seed) + "/"
                if any(k.startswith(prefix) and k not in done for k in expected_keys(args)):
                    tasks.append((kind, name, seed))
    return tasks


# ---------------------------------------------------------------------------------------------- report
def flat_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per dense model, per iterative round and per ticket (method, model, seed, target, MACs, accuracy)."""
    rows = []
    for r in records:
        common = {k: r.get(k) for k in ("kind", "model", "seed", "method")}
        if r["kind"] == "dense":
            rows.append({**common, "family": r["family"], "target_speedup": 1.0, "speedup": 1.0, "macs": r["macs"],
                         "params": r["params"], "accuracy": r["accuracy"]})
        elif r["kind"] == "iterative":
            rows += [{**common, **rnd} for rnd in r["rounds"]]
        else:
            rows.append({**common, **{k: v for k, v in r.items() if k not in ("key", "config_hash", *common)}})
    return rows


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}" + (f" (n={len(values)})" if len(values) != 3 else "")


def _pick(rows: Sequence[Mapping[str, Any]], **match: Any) -> list[Mapping[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("accuracy") is not None]


def iterative_table(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace, name: str, *,
                    field: str = "accuracy") -> str:
    header = ["method", "dense acc %"] + [f"{s:g}x acc % (achieved)" for s in args.speedups]
    body = []
    for method in args.methods:
        family = "orthoreg" if criterion(method).regularized else "plain"
        line = [method, mean_std([r["accuracy"] for r in _pick(rows, kind="dense", model=name, family=family)])]
        for s in args.speedups:
            got = _pick(rows, kind="iterative", model=name, method=method, target_speedup=s)
            achieved = f" ({statistics.mean(r['speedup'] for r in got):.2f}x)" if got else ""
            line.append(mean_std([r[field] for r in got]) + achieved)
        body.append(line)
    return markdown_table(header, body)


def earlybird_table(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace, name: str) -> str:
    header = ["method", "short-trained acc %"] + [f"{q:g}% filters: acc % (MACs speed-up)" for q in args.eb_percents]
    body = []
    for method in args.eb_methods:
        got_all = _pick(rows, kind="earlybird", model=name, method=method)
        short = {r["seed"]: r["short_acc"] for r in got_all}
        line = [method, mean_std(list(short.values()))]
        for q in args.eb_percents:
            got = [r for r in got_all if r["percent"] == q]
            speed = f" ({statistics.mean(r['speedup'] for r in got):.2f}x)" if got else ""
            line.append(mean_std([r["accuracy"] for r in got]) + speed)
        body.append(line)
    return markdown_table(header, body)


def filter_correlations(args: argparse.Namespace) -> list[str]:
    """Mean ``|cos|`` between the filters of a layer in the cached dense models, plain against regularized."""
    from orthoreg_tp.diagnostics import correlation_report

    lines = []
    for name in args.models:
        means = {}
        for family in ("plain", "orthoreg"):
            paths = [cache_dir(args) / f"{name}-s{seed}-{family}.pt" for seed in args.seeds]
            values = []
            for path in (p for p in paths if p.exists()):
                state = torch.load(path, map_location="cpu", weights_only=True)
                classes = next(v.shape[0] for v in reversed(state.values()) if v.ndim == 2)  # the classifier's
                model = build_net(name, width=args.width, num_classes=classes)
                model.load_state_dict(state)
                values.append(statistics.mean(r.correlation for r in correlation_report(model)))
            if values:
                means[family] = statistics.mean(values)
        if len(means) == 2:
            lines.append(f"- {name}: plain {means['plain']:.3f}, after the OrthoReg epochs {means['orthoreg']:.3f}")
    return lines


def orthoreg_gaps(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> list[str]:
    """Per model and speed-up: the best criterion by mean accuracy, and orthoreg's rank and gap to it."""
    lines = []
    for name in args.models:
        for s in args.speedups:
            means = {m: statistics.mean(r["accuracy"] for r in got) for m in args.methods
                     if (got := _pick(rows, kind="iterative", model=name, method=m, target_speedup=s))}
            if "orthoreg" not in means or len(means) < 2:
                continue
            ranking = sorted(means, key=means.get, reverse=True)
            best = ranking[0]
            lines.append(f"- {name} {s:g}x: best {best} {means[best]:.1f}%; orthoreg {means['orthoreg']:.1f}% "
                         f"(rank {ranking.index('orthoreg') + 1}/{len(ranking)}, "
                         f"{means['orthoreg'] - means[best]:+.1f} points)")
    return lines


def plot(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Accuracy against MACs per method (iterative rounds on top, early-bird tickets below), one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.models), figsize=(6 * len(args.models), 9), squeeze=False)
    for col, name in enumerate(args.models):
        for row_i, (kind, methods, key) in enumerate((("iterative", args.methods, "target_speedup"),
                                                      ("earlybird", args.eb_methods, "percent"))):
            ax = axes[row_i][col]
            if kind == "earlybird" and name not in args.eb_models:
                ax.axis("off")
                continue
            for method in methods:
                got = _pick(rows, kind=kind, model=name, method=method)
                levels = sorted({r[key] for r in got})
                pts = [[r for r in got if r[key] == v] for v in levels]
                xs = [statistics.mean(r["macs"] / 1e6 for r in p) for p in pts]
                ys = [statistics.mean(r["accuracy"] for r in p) for p in pts]
                es = [statistics.stdev([r["accuracy"] for r in p]) if len(p) > 1 else 0.0 for p in pts]
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
            dense = _pick(rows, kind="dense", model=name, family="plain")
            if dense:
                ax.axhline(statistics.mean(r["accuracy"] for r in dense), color="gray", ls="--", lw=1,
                           label="dense (plain)")
            ax.set_xscale("log")
            ax.set_xlabel("MACs (M, per 32x32 image)")
            ax.set_ylabel("test accuracy %")
            what = "iterative to " + "/".join(f"{s:g}x" for s in args.speedups) if kind == "iterative" else \
                "early-bird tickets " + "/".join(f"{q:g}%" for q in args.eb_percents)
            ax.set_title(f"{name}: {what}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"quality benchmark on {args.dataset} (mean ± std over seeds {args.seeds})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args: argparse.Namespace, records: Records, wall: float,
                 prior: Mapping[str, Any] | None = None) -> bool:
    """Rewrite NAME.json / NAME.md / NAME.png from the records; return whether every expected run is there.

    ``prior``: the command, machine and wall time of the run that made the records (``--report-only``).
    """
    recs = records.load()
    rows = flat_rows(recs)
    done = {r["key"] for r in recs}
    missing = [k for k in expected_keys(args) if k not in done]
    run = {"command": command(), "machine": machine(), "wall_seconds": wall, **(prior or {})}
    run["run_seconds"] = sum(r.get("seconds", 0.0) for r in recs)
    payload = {"status": "partial" if missing else "complete", "missing": missing, "preset": args.preset,
               "config": {**config_of(args), "models": args.models, "eb_models": args.eb_models,
                          "methods": args.methods, "seeds": args.seeds,
                          "eb_methods": args.eb_methods, "eb_percents": args.eb_percents, "workers": args.workers,
                          "threads": args.threads},
               "config_hash": records.hash,
               "data": {"fingerprint": args.data_fingerprint, "source": getattr(args, "data_source", None)},
               **run, "note": args.note, "runs": rows}
    out = Path(args.output_dir)
    write_results(args.name, payload, report_markdown(rows, args, run, len(expected_keys(args)) - len(missing)), out)
    if rows:
        plot(rows, args, out / f"{args.name}.png")
    return not missing


def report_markdown(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace, run: Mapping[str, Any],
                    finished: int) -> str:
    total = len(expected_keys(args))
    status = "complete" if finished == total else f"PARTIAL: {finished} of {total} runs finished"
    sections = [f"### Quality benchmark ({args.dataset}, {args.image_size}x{args.image_size}, preset "
                f"`{args.preset}`) -- {status}", describe(args)]
    for name in args.models:
        sections += [f"#### {name}: iterative pruning to MACs speed-ups (test accuracy % after the fine-tune, "
                     "mean ± std over seeds; achieved speed-up)", iterative_table(rows, args, name),
                     f"{name}, the same rounds right after pruning, before the fine-tune:",
                     iterative_table(rows, args, name, field="acc_pruned")]
        if name in args.eb_models:
            sections += [f"#### {name}: early-bird tickets (test accuracy % after retraining; ticket MACs "
                         "speed-up)", earlybird_table(rows, args, name)]
    correlations = filter_correlations(args)
    if correlations:
        sections += ["#### Filter correlation of the dense models (mean |cos| between a layer's filters, averaged over "
                     "layers and seeds; 0 = orthogonal)", "\n".join(correlations)]
    gaps = orthoreg_gaps(rows, args)
    if gaps:
        sections += ["#### Where orthoreg stands (mean accuracy after the fine-tune)", "\n".join(gaps)]
    sections.append(f"Command: `{run['command']}`  \nMachine: {machine_line(run['machine'])}.  \nWall time of the "
                    "last invocation "
                    f"{run['wall_seconds'] / 60:.1f} min; the runs' own times sum to {run['run_seconds'] / 60:.1f} "
                    f"min (over {args.workers} worker process(es), {args.threads} thread(s) each; dense and short "
                    "trainings not included).")
    if args.note:
        sections.append(args.note)
    return "\n\n".join(sections)


def ranking_words(normalizer: str) -> str:
    if normalizer == "default":
        return ("each criterion's scores as its library ranks them by default (orthoreg and fisher raw; taylor, l1 "
                "and bn mean-normalized per group, torch-pruning's default)")
    return "raw scores" if normalizer == "none" else f"scores normalized per group by their {normalizer}"


def recal_words(batches: int) -> str:
    return (f"after re-estimating the batch-norm statistics on {batches} training batches (no weight changes)"
            if batches else "with the dense network's batch-norm statistics")


def describe(args: argparse.Namespace) -> str:
    n_train = args.train_images or "all"
    n_test = args.test_images or "all"
    between = "no training between rounds" if LRSchedule.parse(args.between).total_epochs == 0 else \
        f"`{args.between}` more before each later round (regularized for orthoreg)"
    return (f"Models: VGG-13 (conv-ReLU-BN) and CIFAR ResNet-18 (BasicBlocks [2, 2, 2, 2]) at width x{args.width:g}; "
            f"{n_train} training images, {n_test} test images (fixed random subsets where not all); seeds "
            f"{args.seeds}; SGD momentum 0.9, batch {args.batch_size}, weight decay 1e-4 (0 with the regularizer, "
            f"lambda {args.coefficient:g}). Dense: `base` {args.base} shared, then `ortho` {args.ortho} plainly "
            f"(fisher, taylor, l1, bn, random share this model per seed) or regularized (orthoreg). Iterative: per "
            f"round a MACs budget (at most dense / s), global ranking of {ranking_words(args.normalizer)} with "
            f"the per-layer floor (int({args.min_keep:g} width) + 1 channels kept), then fine-tune "
            f"`{args.finetune}` (orthoreg with its regularizer), accuracy recorded; {between}. The accuracy "
            f"right after a prune is measured {recal_words(args.bn_recal_batches)}. Importance from "
            f"{args.importance_samples} training samples. {earlybird_words(args)}n = seeds per cell (3 unless "
            "shown).")


def earlybird_words(args: argparse.Namespace) -> str:
    if not args.eb_models:
        return ""
    return (f"Early-bird ({', '.join(args.eb_models)}): `{args.eb_train}` (regularized for orthoreg; the plain "
            f"criteria share the plain one), one prune by % of filters, ticket retrained `{args.eb_retrain}` "
            "plainly. ")


# ---------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> bool:
    """Run every unfinished task (in ``--workers`` processes), then write the report; return completeness."""
    args = resolve(args)
    torch.set_num_threads(args.threads)
    prepare_data(args)
    start = time.perf_counter()
    records = Records(records_path(args), args.config_hash if args.report_only and args.config_hash
                      else config_hash(args))
    logger.info("quality: preset %s, config %s, records %s", args.preset, records.hash, records.path)
    if not args.report_only:
        tasks = tasks_of(args, records.done())
        logger.info("%d tasks to run: %s", len(tasks), tasks)
        if args.workers == 1:
            for task in tasks:
                logger.info(run_task(task, args))
                write_report(args, records, time.perf_counter() - start)
        else:
            import multiprocessing as mp
            from functools import partial

            with mp.get_context("spawn").Pool(min(args.workers, max(1, len(tasks))),
                                               initializer=_init_worker) as pool:
                for message in pool.imap_unordered(partial(run_task, args=args), tasks):
                    logger.info(message)
                    write_report(args, records, time.perf_counter() - start)
    prior = previous_run(args, records.hash) if args.report_only else None
    complete = write_report(args, records, time.perf_counter() - start, prior)
    print((Path(args.output_dir) / f"{args.name}.md").read_text())
    return complete


def previous_run(args: argparse.Namespace, config_hash: str) -> dict[str, Any] | None:
    """Command, machine and wall time of the run that wrote ``NAME.json`` for these records, if it did."""
    path = Path(args.output_dir) / f"{args.name}.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if old.get("config_hash") != config_hash:
        return None
    return {k: old[k] for k in ("command", "machine", "wall_seconds") if k in old}


def _init_worker() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")
    raise SystemExit(0 if main(get_args_parser().parse_args()) else 1)
