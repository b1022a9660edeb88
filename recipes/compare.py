"""Merge several recipe runs into one table (Markdown on stdout, optional CSV) and one plot.

    python recipes/compare.py runs/it-orthoreg runs/it-fisher runs/it-l1 --plot runs/compare.png --csv runs/compare.csv

The same as `orthoreg-tp compare ...`.
"""

from __future__ import annotations

import argparse

from orthoreg_tp.engine.cli import compare_parser, run_compare
from orthoreg_tp.engine.experiment import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    return compare_parser()


def main(args: argparse.Namespace) -> list[dict]:
    return run_compare(args)


if __name__ == "__main__":
    run_cli(get_args_parser(), main)
