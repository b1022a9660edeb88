"""``orthoreg-tp analyze``: group sensitivity analysis of a model on a dataset, with files and a report.

Builds the model and data as the recipes do (a registered model, ``timm:NAME`` or ``torchvision:NAME``; random
weights, ``--pretrained`` or ``--checkpoint``), runs :func:`orthoreg_tp.analyze.sensitivity` on a few shuffled
batches of the test split, prints the ranked summary and writes ``sensitivity.csv``, ``sensitivity.json``,
``sensitivity.png`` and ``report.html`` into ``--output-dir`` (docs/sensitivity.md).

Example:
    >>> analyze_parser().parse_args(["--model", "tiny_resnet", "--output-dir", "out"]).levels
    [0.25, 0.5, 0.75]
    >>> main(["analyze", "--model", "tiny_resnet", "--output-dir", "runs/sens"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from .data import DATASETS

__all__ = ["ANALYZE_HELP", "analyze_parser", "run_analyze"]

ANALYZE_HELP = "sensitivity of each dependency group: prune it alone at a few levels, measure the loss, restore"
FILES = ("sensitivity.csv", "sensitivity.json", "sensitivity.png", "report.html")


def _levels(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated fractions, got {text!r}") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"levels must be fractions in (0, 1), got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def analyze_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``analyze`` options.

    Example:
        >>> analyze_parser().parse_args(["--model", "m", "--output-dir", "o", "--levels", "0.5"]).levels
        [0.5]
    """
    if parser is None:
        parser = argparse.ArgumentParser(description=ANALYZE_HELP)
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="registered model, timm:NAME or torchvision:NAME")
    g.add_argument("--dataset", default="digits", choices=DATASETS)
    g.add_argument("--data-path", default=None, help="dataset root (CIFAR: where to find/download it)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR")
    g.add_argument("--image-size", type=int, default=None, help="default: the dataset's (16 digits, 32 CIFAR)")
    g.add_argument("--in-chans", type=int, default=3, choices=(1, 3))
    g.add_argument("--pretrained", action="store_true", help="timm / torchvision pretrained weights")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights to analyse: a state dict or a (pruned) checkpoint of this project")
    g = parser.add_argument_group("analysis")
    g.add_argument("--levels", type=_levels, default=[0.25, 0.5, 0.75], metavar="F,F,..",
                   help="fractions of each group's channels to remove (default 0.25,0.5,0.75)")
    g.add_argument("--num-batches", type=_positive, default=4)
    g.add_argument("--batch-size", type=_positive, default=64)
    g.add_argument("--split", default="test", choices=("test", "train"),
                   help="which split the batches come from (shuffled with --seed; test: no augmentation)")
    g.add_argument("--max-loss-delta", type=float, default=None,
                   help="also list per-layer ratios within this loss change (report and sensitivity.json)")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("execution")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(handler=run_analyze)
    return parser


def _command(args: argparse.Namespace) -> str:
    """The options as one ``orthoreg-tp analyze`` command line (for the report)."""
    words = ["orthoreg-tp", "analyze", "--model", args.model, "--dataset", args.dataset,
             "--levels", ",".join(f"{v:g}" for v in args.levels), "--num-batches", str(args.num_batches),
             "--batch-size", str(args.batch_size), "--split", args.split, "--seed", str(args.seed),
             "--output-dir", str(args.output_dir)]
    for flag, value in (("--data-path", args.data_path), ("--image-size", args.image_size),
                        ("--checkpoint", args.checkpoint), ("--max-loss-delta", args.max_loss_delta),
                        ("--threads", args.threads)):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words + (["--pretrained"] if args.pretrained else []))


def _model(args: argparse.Namespace, info: Any, example_inputs: Any) -> Any:
    from .models import build_model
    from .weights import build_pretrained_model, load_start_checkpoint_

    if args.pretrained and args.checkpoint:
        raise ValueError("give --pretrained or --checkpoint, not both")
    if args.pretrained:
        return build_pretrained_model(args.model, num_classes=info.num_classes, in_chans=info.in_chans)
    model = build_model(args.model, num_classes=info.num_classes, in_chans=info.in_chans)
    if args.checkpoint:
        load_start_checkpoint_(model, example_inputs, args.checkpoint, model_name=args.model)
    return model


def run_analyze(args: argparse.Namespace) -> Any:
    """Run the analysis with parsed options; print the summary; return the :class:`SensitivityResult`.

    Raises:
        ValueError: Bad options, an unwritable output folder, or a checkpoint that does not fit.
    """
    import torch
    from torch.utils.data import DataLoader

    from ..analyze import sensitivity
    from .data import build_datasets
    from .distributed import resolve_device
    from .html_report import write_sensitivity_report
    from .records import check_writable_dir, print_safely

    check_writable_dir(args.output_dir)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    train_set, test_set, info = build_datasets(args.dataset, data_path=args.data_path, image_size=args.image_size,
                                               in_chans=args.in_chans, download=args.download)
    loader = DataLoader(test_set if args.split == "test" else train_set, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    batches = []
    for x, y in loader:
        batches.append((x.to(device), y.to(device)))
        if len(batches) == args.num_batches:
            break
    example_inputs = batches[0][0][:1]
    model = _model(args, info, example_inputs.cpu()).to(device)
    result = sensitivity(model, example_inputs, batches, levels=args.levels, num_batches=args.num_batches,
                         progress=args.progress)
    out = Path(args.output_dir)
    context = {"model": args.model, "dataset": args.dataset, "split": args.split,
               "weights": "pretrained" if args.pretrained else args.checkpoint or "random",
               "image_size": info.image_size, "batch_size": args.batch_size, "num_batches": len(batches),
               "device": str(device), "threads": torch.get_num_threads(), "command": _command(args)}
    extra: dict[str, Any] = {"context": context}
    if args.max_loss_delta is not None:
        extra["layer_ratios"] = result.layer_ratios(max_loss_delta=args.max_loss_delta, by_name=True)
        extra["max_loss_delta"] = args.max_loss_delta
    result.to_csv(out / FILES[0])
    result.to_json(out / FILES[1], extra=extra)
    result.plot(out / FILES[2])
    write_sensitivity_report(out / FILES[3], result, title=f"sensitivity: {args.model} on {args.dataset}",
                             context=context, max_loss_delta=args.max_loss_delta)
    print_safely(result.summary())
    print_safely(f"\nwrote {', '.join(str(out / f) for f in FILES)} ({result.seconds:.1f} s)")
    return result
