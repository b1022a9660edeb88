"""The paper's claim on a small CNN: does OrthoReg make summed single-filter importances track group removal?

For each seed, the same CNN (same initialization) is trained twice: plainly (weight decay 1e-4) and with the
OrthoReg regularizer (weight decay 0). On both it measures

* additivity (``orthoreg_tp.diagnostics.additivity``): for random groups of a quarter / half of each layer's
  filters, the Spearman correlation between the summed single-filter Fisher scores (accumulated on the
  training set) and the measured test-loss increase when the group is removed, and between the summed
  *measured* single-filter increases and the group's increase (additivity itself);
* one-shot pruning to 30/50/70% fewer MACs (matched MACs: the channel ratio is searched per method) with
  orthoreg (regularized model) and fisher, l1, bn, taylor (plain model), test accuracy before and after a
  short fine-tune.

    python benchmarks/claim.py --threads 1           # digits, 8 seeds, ~10 min on 2 (busy) CPU cores
    python benchmarks/claim.py --dataset cifar10 --data-path data --model resnet56 --image-size 32
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from typing import Any

import torch
from _common import fmt_spread, machine_line, markdown_table, resolve_device, spread, write_results
from torch import nn
from torch.utils.data import DataLoader

from orthoreg_tp import OrthoRegularizer, layer_widths
from orthoreg_tp.diagnostics import additivity, correlation_report
from orthoreg_tp.engine.data import build_datasets
from orthoreg_tp.engine.methods import build_importance, feed_importance_, get_method
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.engine.pruning import count_macs_params, prune_round_
from orthoreg_tp.engine.training import LRSchedule, build_optimizer, evaluate, set_lr, train_one_epoch
from orthoreg_tp.regularizer import find_classifier

logger = logging.getLogger("claim")
METRICS = ("spearman", "relative_error", "additive_spearman", "additive_relative_error", "additive_ratio")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="digits", help="any orthoreg_tp.engine.data dataset (default: digits, offline)")
    g.add_argument("--data-path", default=None)
    g.add_argument("--image-size", type=int, default=16)
    g.add_argument("--in-chans", type=int, default=1, help="digits only: 1 (grayscale) or 3")
    g.add_argument("--model", default="tiny_cnn")
    g = p.add_argument_group("training")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    g.add_argument("--schedule", type=LRSchedule.parse, default=LRSchedule.parse("0.05:12,0.005:3"),
                   help="LR:EPOCHS pieces of the (regularized and plain) training")
    g.add_argument("--coefficient", type=float, default=1e-2, help="OrthoReg lambda (the paper's VGG/ResNet value)")
    g.add_argument("--batch-size", type=int, default=64)
    g = p.add_argument_group("additivity")
    g.add_argument("--group-sizes", type=float, nargs="+", default=[0.125, 0.25, 0.5],
                   help="fractions of a layer's width")
    g.add_argument("--num-groups", type=int, default=30, help="random groups per layer")
    g = p.add_argument_group("pruning")
    g.add_argument("--methods", nargs="+", default=["orthoreg", "fisher", "l1", "bn", "taylor"])
    g.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="fractions of MACs removed")
    g.add_argument("--importance-samples", type=int, default=10_000, help="capped by the training set size")
    g.add_argument("--finetune-epochs", type=int, default=3)
    g.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--name", default="claim", help="result files: benchmarks/results/NAME.{json,md}")
    return p


def train(model: nn.Module, loader: DataLoader, schedule: LRSchedule, device: torch.device,
          regularizer: OrthoRegularizer | None) -> None:
    optimizer = build_optimizer(model, lr=schedule.lrs[0], regularized=regularizer is not None)
    for epoch in range(schedule.total_epochs):
        set_lr(optimizer, schedule.lr_at(epoch))
        train_one_epoch(model, loader, optimizer, device=device, regularizer=regularizer, progress=False)


def describe(model: nn.Module, loaders: dict[str, DataLoader], args: argparse.Namespace,
             device: torch.device) -> dict[str, Any]:
    """Accuracy, filter statistics and additivity of a trained model."""
    head = find_classifier(model)
    head_names = {n for n, m in model.named_modules() if m is head}
    report = [r for r in correlation_report(model) if r.name not in head_names]
    out: dict[str, Any] = {
        "test_acc": evaluate(model, loaders["test"], device=device)["acc"],
        "orthonormality": sum(r.orthonormality for r in report) / len(report),
        "filter_correlation": sum(r.correlation for r in report) / len(report),
        "layers": [r.to_dict() for r in report],
        "additivity": {},
    }
    for size in args.group_sizes:
        result = additivity(model, loaders["test"], None, group_size=size, num_groups=args.num_groups,
                            score_data=loaders["score"], score_samples=args.importance_samples, seed=0)
        out["additivity"][str(size)] = {"overall": result.overall.to_dict(), "mean_layer_spearman":
                                        result.mean_spearman, "layers": [e.to_dict() for e in result.layers]}
    return out


def prune_and_finetune(model: nn.Module, method_name: str, level: float, loaders: dict[str, DataLoader],
                       example: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One-shot prune a copy of ``model`` to ``(1 - level)`` of its MACs, evaluate, fine-tune, evaluate."""
    model = copy.deepcopy(model)
    method = get_method(method_name)
    dense_macs, dense_params = count_macs_params(model, example)
    importance = build_importance(method, layer_widths(model))
    feed_importance_(method, importance, model, loaders["score"], num_samples=args.importance_samples,
                     progress=False)
    report = prune_round_(model, example, importance, target_macs=(1.0 - level) * dense_macs)
    model.zero_grad(set_to_none=True)
    macs, params = count_macs_params(model, example)
    row = {"method": method_name, "level": level, "macs_removed": 1 - macs / dense_macs,
           "params_removed": 1 - params / dense_params, "channels_removed": report.channels_removed,
           "acc_pruned": evaluate(model, loaders["test"], device=device)["acc"]}
    optimizer = build_optimizer(model, lr=args.finetune_lr)
    for _ in range(args.finetune_epochs):
        train_one_epoch(model, loaders["train"], optimizer, device=device, progress=False)
    row["acc_finetuned"] = evaluate(model, loaders["test"], device=device)["acc"]
    return row


def run_seed(seed: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    train_set, test_set, info = build_datasets(args.dataset, data_path=args.data_path, image_size=args.image_size,
                                               in_chans=args.in_chans)
    gen = torch.Generator().manual_seed(seed)
    loaders = {"train": DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen),
               "score": DataLoader(train_set, batch_size=256), "test": DataLoader(test_set, batch_size=512)}
    example = train_set[0][0].unsqueeze(0).to(device)
    torch.manual_seed(seed)
    init = build_model(args.model, num_classes=info.num_classes, in_chans=info.in_chans).to(device)
    models = {"plain": copy.deepcopy(init), "orthoreg": copy.deepcopy(init)}
    out: dict[str, Any] = {"seed": seed, "models": {}, "pruning": []}
    for name, model in models.items():
        start = time.perf_counter()
        torch.manual_seed(seed)
        reg = OrthoRegularizer(model, args.coefficient) if name == "orthoreg" else None
        train(model, loaders["train"], args.schedule, device, reg)
        out["models"][name] = describe(model, loaders, args, device)
        logger.info("seed %d %s: acc %.2f, orthonormality %.3f, %.0f s", seed, name,
                    out["models"][name]["test_acc"], out["models"][name]["orthonormality"],
                    time.perf_counter() - start)
    for method_name in args.methods:
        source = models["orthoreg" if get_method(method_name).regularized else "plain"]
        for level in args.levels:
            torch.manual_seed(seed)
            start = time.perf_counter()
            row = prune_and_finetune(source, method_name, level, loaders, example, args, device)
            out["pruning"].append(row)
            logger.info("seed %d %s %.0f%% MACs: acc %.2f -> %.2f, %.0f s", seed, method_name, 100 * level,
                        row["acc_pruned"], row["acc_finetuned"], time.perf_counter() - start)
    return out


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    seeds = [r["seed"] for r in runs]
    models: dict[str, Any] = {}
    for name in ("plain", "orthoreg"):
        m = {k: spread(r["models"][name][k] for r in runs) for k in ("test_acc", "orthonormality",
                                                                        "filter_correlation")}
        for size in args.group_sizes:
            for metric in METRICS:
                m[f"{metric}@{size}"] = spread(r["models"][name]["additivity"][str(size)]["overall"][metric]
                                               for r in runs)
            m[f"mean_layer_spearman@{size}"] = spread(r["models"][name]["additivity"][str(size)]
                                                      ["mean_layer_spearman"] for r in runs)
        models[name] = m
    diffs = {}
    for size in args.group_sizes:
        for metric in ("spearman", "additive_spearman", "additive_relative_error"):
            per_seed = [r["models"]["orthoreg"]["additivity"][str(size)]["overall"][metric]
                        - r["models"]["plain"]["additivity"][str(size)]["overall"][metric] for r in runs]
            better = sum((d < 0) if metric.endswith("error") else (d > 0) for d in per_seed)
            diffs[f"{metric}@{size}"] = {**spread(per_seed), "improved_seeds": better}
    pruning = []
    for method in args.methods:
        for level in args.levels:
            rows = [row for r in runs for row in r["pruning"] if row["method"] == method and row["level"] == level]
            pruning.append({"method": method, "level": level, **{k: spread(row[k] for row in rows) for k in (
                "macs_removed", "channels_removed", "acc_pruned", "acc_finetuned")}})
    summary = {"seeds": seeds, "models": models, "orthoreg_minus_plain": diffs, "pruning": pruning}

    rows = []
    for name in ("plain", "orthoreg"):
        m = models[name]
        for size in args.group_sizes:
            rows.append([name, f"{size:g}", fmt_spread(m["test_acc"], 1), fmt_spread(m["orthonormality"]),
                         fmt_spread(m["filter_correlation"]), fmt_spread(m[f"spearman@{size}"]),
                         fmt_spread(m[f"mean_layer_spearman@{size}"]), fmt_spread(m[f"additive_spearman@{size}"]),
                         fmt_spread(m[f"additive_relative_error@{size}"]), fmt_spread(m[f"additive_ratio@{size}"])])
    table1 = markdown_table(["model", "group size", "test acc %", "orthonormality", "filter corr",
                             "rho(Fisher sum, group dL)", "mean per-layer rho(Fisher)", "rho(sum single dL, group dL)",
                             "rel. err (sum single dL)", "group dL / sum single dL"], rows)
    diff_rows = [[k.replace("@", " @ "), fmt_spread(v, 3), f"{v['improved_seeds']}/{v['n']}"] for k, v in diffs.items()]
    table2 = markdown_table(["statistic @ group size", "orthoreg - plain", "seeds improved"], diff_rows)
    table3 = markdown_table(
        ["method", "MACs removed (target)", "MACs removed", "channels removed", "acc % pruned", "acc % fine-tuned"],
        [[p["method"], f"{p['level']:.0%}", fmt_spread(p["macs_removed"], 3), fmt_spread(p["channels_removed"], 3),
          fmt_spread(p["acc_pruned"], 1), fmt_spread(p["acc_finetuned"], 1)] for p in pruning])
    md = "\n\n".join([
        f"### Claim: additivity and one-shot pruning ({args.dataset}, {args.model}, {args.image_size}x"
        f"{args.image_size})",
        f"Seeds {seeds}; values are mean [min, max] over seeds. Training `{args.schedule}` (batch "
        f"{args.batch_size}, lambda {args.coefficient:g} for orthoreg); additivity on the test set with "
        f"{args.num_groups} random groups per layer, Fisher scores accumulated on the training set; pruning to "
        f"matched MACs, fine-tune {args.finetune_epochs} epochs at lr {args.finetune_lr:g}.",
        "Columns: *rho(Fisher sum, group dL)*: Spearman correlation, pooled over all layers' groups, between a "
        "group's summed single-filter Fisher scores and the measured test-loss increase when the group is removed "
        "(what global pruning relies on); *mean per-layer rho*: the same within each layer, averaged; *rho(sum "
        "single dL, group dL)*: the summed *measured* single-filter increases against the group's (additivity "
        "itself); *rel. err*: ||sum single dL - group dL|| / ||group dL||; *group dL / sum single dL*: above 1 "
        "means removing filters together costs more than the parts.",
        table1, table2, table3,
    ])
    return summary, md


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = [run_seed(seed, args, device) for seed in args.seeds]
    summary, md = summarize(runs, args)
    wall = time.perf_counter() - start
    md += f"\n\nMachine: {machine_line()}. Wall time {wall / 60:.1f} min.\n"
    config = {k: (str(v) if isinstance(v, LRSchedule) else v) for k, v in vars(args).items()}
    paths = write_results(args.name, {"config": config, "wall_seconds": wall, "summary": summary, "runs": runs}, md)
    print(md)
    print(f"wrote {paths[0]} and {paths[1]}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
