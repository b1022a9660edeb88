"""Merge several recipe runs into one table (Markdown on stdout, optional CSV) and one plot.

    python recipes/compare.py runs/it-orthoreg runs/it-fisher runs/it-l1 --plot runs/compare.png --csv runs/compare.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from orthoreg_tp.engine.records import (
    check_comparable,
    default_plot_path,
    markdown_table,
    merge_results,
    plot_results,
    print_safely,
    table_rows,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (or their results.json)")
    parser.add_argument("--plot", default=None,
                        help="PNG to write (accuracy vs pruned %% and MACs); default: compare.png next to the runs")
    parser.add_argument("--mixed", action="store_true", help="allow runs of different datasets or models")
    parser.add_argument("--csv", default=None, help="also write the table as CSV")
    parser.add_argument("--title", default="")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    runs = merge_results(args.runs)
    check_comparable(runs, mixed=args.mixed)
    rows = table_rows(runs)
    print_safely(markdown_table(rows))
    plot = args.plot or default_plot_path(args.runs)
    plot_results([(label, results["rows"]) for label, results in runs], plot, title=args.title)
    print_safely(f"\nplot: {plot}")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    parser = get_args_parser()
    try:
        main(parser.parse_args())
    except (FileNotFoundError, KeyError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
