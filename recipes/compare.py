"""Merge several recipe runs into one table (Markdown on stdout, optional CSV) and one plot.

    python recipes/compare.py runs/it-orthoreg runs/it-fisher runs/it-l1 --plot runs/compare.png --csv runs/compare.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from orthoreg_tp.engine.records import markdown_table, merge_results, plot_results, table_rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (or their results.json)")
    parser.add_argument("--plot", default="compare.png", help="PNG to write (accuracy vs pruned %% and MACs)")
    parser.add_argument("--csv", default=None, help="also write the table as CSV")
    parser.add_argument("--title", default="")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    runs = merge_results(args.runs)
    rows = table_rows(runs)
    print(markdown_table(rows))
    plot_results([(label, results["rows"]) for label, results in runs], args.plot, title=args.title)
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
    except (FileNotFoundError, KeyError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
