"""The ``orthoreg-tp`` command: ``iterative``, ``early-bird``, ``compare``, ``export``, ``yolo`` and ``analyze``.

The recipe subcommands take the same options as ``recipes/iterative.py`` and ``recipes/early_bird.py`` (those
scripts call the parsers and handlers below), plus ``--config FILE``: a JSON or YAML file with
:class:`~orthoreg_tp.engine.config.RecipeConfig`'s snake_case keys (a run's own ``config.json`` works) that sets
options; flags given on the command line override it.

Example:
    >>> main(["iterative", "--method", "l1", "--output-dir", "runs/it-l1"])  # doctest: +SKIP
    >>> main(["export", "runs/it-l1", "--format", "onnx"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .analyze_cli import ANALYZE_HELP, analyze_parser
from .config import add_common_args, add_early_bird_args, add_schedule_args, config_from_args, load_config_file
from .yolo import YOLO_HELP, yolo_parser

PROG = "orthoreg-tp"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors and, for a recipe, ``--config FILE``.

    With ``recipe`` set, the parser takes ``--config FILE``: the file's values fill the namespace first, so
    every flag given on the command line overrides them (``--phase`` entries add to the file's phases).

    Args:
        recipe: The recipe this parser configures (``"iterative"`` or ``"early_bird"``); ``None``: no ``--config``.
        *args: For ``argparse.ArgumentParser``.
        **kwargs: For ``argparse.ArgumentParser``.

    Example:
        >>> parser = iterative_parser()
        >>> parser.parse_args(["--method", "l1"]).method
        'l1'
    """

    def __init__(self, *args: Any, recipe: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        if recipe is not None:
            self.add_argument("--config", metavar="FILE", default=None,
                              help="JSON or YAML file of options (snake_case keys, as in a run's config.json); "
                                   "command-line flags override it")

    def error(self, message: str) -> None:  # type: ignore[override]
        """Exit 2 with one line naming the problem."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse; with ``--config FILE``, parse again over the file's values."""
        if self.recipe is None:
            return super().parse_known_args(args, namespace)
        args = sys.argv[1:] if args is None else list(args)
        first, _ = super().parse_known_args(args, None)  # finds --config however it is spelled
        if first.config is None:
            return super().parse_known_args(args, namespace)
        try:
            values = load_config_file(first.config)
        except ValueError as err:
            self.error(str(err))
        recipe = values.pop("recipe", self.recipe)
        if recipe != self.recipe:
            self.error(f"config file {first.config!r} is for the {recipe!r} recipe, not {self.recipe!r}")
        if "phases" in values:  # --phase appends (name, schedule) pairs to it
            values["phases"] = list(values["phases"].items())
        namespace = argparse.Namespace() if namespace is None else namespace
        for name, value in values.items():
            setattr(namespace, name, value)
        return super().parse_known_args(args, namespace)


ITERATIVE_HELP = "iterative pruning: train, then rounds of estimate -> prune -> retrain"
EARLY_BIRD_HELP = "early-bird ticket: short training, one pruning step, full retraining"
COMPARE_HELP = "merge recipe runs into one table and one plot"
EXPORT_HELP = "export a run's pruned model (safetensors + JSON, or ONNX)"


# --------------------------------------------------------------------------- parsers
def iterative_parser(parser: ArgumentParser | None = None) -> ArgumentParser:
    """The ``iterative`` recipe's options (``recipes/iterative.py`` uses this parser).

    Example:
        >>> iterative_parser().parse_args(["--rounds", "3"]).rounds
        3
    """
    if parser is None:
        parser = ArgumentParser(description=ITERATIVE_HELP, recipe="iterative")
    add_schedule_args(add_common_args(parser))
    parser.set_defaults(handler=run_iterative)
    return parser


def early_bird_parser(parser: ArgumentParser | None = None) -> ArgumentParser:
    """The ``early-bird`` recipe's options (``recipes/early_bird.py`` uses this parser).

    Example:
        >>> early_bird_parser().parse_args(["--eb-detect"]).eb_detect
        True
    """
    if parser is None:
        parser = ArgumentParser(description=EARLY_BIRD_HELP, recipe="early_bird")
    add_early_bird_args(add_common_args(parser))
    parser.set_defaults(handler=run_early_bird)
    return parser


def compare_parser(parser: ArgumentParser | None = None) -> ArgumentParser:
    """The ``compare`` options: run folders, ``--plot``, ``--mixed``, ``--csv``, ``--title``.

    Example:
        >>> compare_parser().parse_args(["runs/a", "runs/b"]).runs
        ['runs/a', 'runs/b']
    """
    if parser is None:
        parser = ArgumentParser(description=COMPARE_HELP)
    parser.add_argument("runs", nargs="+", help="run folders (or their results.json)")
    parser.add_argument("--plot", default=None,
                        help="PNG to write (accuracy vs pruned %% and MACs); default: compare.png next to the runs")
    parser.add_argument("--mixed", action="store_true", help="allow runs of different datasets or models")
    parser.add_argument("--csv", default=None, help="also write the table as CSV")
    parser.add_argument("--title", default="")
    parser.set_defaults(handler=run_compare)
    return parser


def export_parser(parser: ArgumentParser | None = None) -> ArgumentParser:
    """The ``export`` options: a run folder, ``--round``, ``--format``, ``--output``.

    Example:
        >>> export_parser().parse_args(["runs/a", "--format", "onnx"]).format
        'onnx'
    """
    from .export import FORMATS

    if parser is None:
        parser = ArgumentParser(description=EXPORT_HELP)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a recipe's --output-dir")
    parser.add_argument("--round", dest="round_index", type=int, default=None, metavar="K",
                        help="which round's model (model_roundK.pt); default: the last one saved")
    parser.add_argument("--format", default="safetensors", choices=FORMATS,
                        help="safetensors: weights + JSON spec, for orthoreg_tp.load_pruned (no pickle); "
                             'onnx: a graph checked in onnxruntime (pip install "orthoreg-tp[onnx]")')
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="target file (default: RUN_DIR/model_roundK.safetensors or .onnx)")
    parser.set_defaults(handler=run_export)
    return parser


def build_parser() -> ArgumentParser:
    """The ``orthoreg-tp`` parser with its four subcommands.

    Example:
        >>> build_parser().parse_args(["export", "runs/a"]).round_index is None
        True
    """
    parser = ArgumentParser(prog=PROG, description="OrthoReg pruning recipes and pruned-model export.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    for name, build, text, recipe in (("iterative", iterative_parser, ITERATIVE_HELP, "iterative"),
                                      ("early-bird", early_bird_parser, EARLY_BIRD_HELP, "early_bird"),
                                      ("compare", compare_parser, COMPARE_HELP, None),
                                      ("export", export_parser, EXPORT_HELP, None),
                                      ("yolo", yolo_parser, YOLO_HELP, None),
                                      ("analyze", analyze_parser, ANALYZE_HELP, None)):
        build(sub.add_parser(name, help=text, description=text, recipe=recipe))
    return parser


# --------------------------------------------------------------------------- handlers
def run_iterative(args: argparse.Namespace) -> dict[str, Any]:
    """Run the iterative recipe with parsed options; returns ``results.json``'s content."""
    from . import recipes

    return recipes.iterative(config_from_args(args, recipe="iterative"))


def run_early_bird(args: argparse.Namespace) -> dict[str, Any]:
    """Run the early-bird recipe with parsed options; returns ``results.json``'s content."""
    from . import recipes

    return recipes.early_bird(config_from_args(args, recipe="early_bird"))


def run_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print the runs' Markdown table (write the plot and CSV); returns the rows.

    Raises:
        ValueError: A run has no ``results.json``.
    """
    from . import recipes
    from .records import print_safely

    try:
        rows, table, plot = recipes.compare(args.runs, plot=args.plot, csv_path=args.csv, title=args.title,
                                            mixed=args.mixed)
    except (FileNotFoundError, KeyError) as err:
        raise ValueError(str(err)) from None
    print_safely(table)
    print_safely(f"\nplot: {plot}")
    return rows


def run_export(args: argparse.Namespace) -> Path:
    """Export a run's model as asked; prints and returns the written path.

    Raises:
        ValueError: No such folder, no saved model or round, unknown format, or the ``onnx`` extra is missing.
    """
    from .export import OnnxUnavailableError, export_run

    try:
        path = export_run(args.run_dir, round_index=args.round_index, fmt=args.format, output=args.output)
    except (FileNotFoundError, OnnxUnavailableError) as err:
        raise ValueError(str(err)) from None
    extra = f" + {path.with_suffix('.json').name}" if args.format == "safetensors" else ""
    print(f"wrote {path}{extra}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """The ``orthoreg-tp`` console script: parse ``argv``, run the subcommand; bad input exits 2 with one line.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    from .experiment import run_cli

    run_cli(build_parser(), lambda args: args.handler(args), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
