"""Run records: every run leaves a folder a person can read.

``config.json`` (resolved configuration), ``epochs.csv``/``epochs.jsonl`` (one row per epoch),
``results.json`` (one row per round), ``checkpoint.pt`` (atomic, safe to load) and ``results.png``.

Example:
    >>> record = RunRecord("/tmp/run-demo2")
    >>> record.write_config({"model": "tiny_cnn"})
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import re
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .interrupts import critical_section

EPOCH_FIELDS: tuple[str, ...] = (
    "global_epoch", "stage", "phase", "round", "epoch", "lr", "regularized", "train_loss", "train_acc",
    "test_loss", "test_acc", "penalty", "orthonormality", "params", "seconds",
)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with critical_section():  # a SIGINT/SIGTERM waits for the rename
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename (atomic checkpoint).

    Example:
        >>> atomic_torch_save({"w": torch.zeros(2)}, "/tmp/ckpt.pt")
        >>> safe_torch_load("/tmp/ckpt.pt")["w"]
        tensor([0., 0.])
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable (corrupt, truncated, not weights-only) or of the wrong kind."""


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(..., weights_only=True)``: tensors, containers and plain values, never pickled code.

    Raises:
        CheckpointError: The file is missing, corrupt or truncated, or holds objects ``weights_only=True``
            refuses; the one-line message names the file.

    Example:
        >>> safe_torch_load("/nonexistent.pt")
        Traceback (most recent call last):
        ...
        orthoreg_tp.engine.records.CheckpointError: no checkpoint file at '/nonexistent.pt'
    """
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():
            raise CheckpointError(f"cannot load {str(path)!r}: it holds Python objects that weights_only=True "
                                  "refuses to unpickle (save a state dict of tensors instead)") from err
        raise CheckpointError(f"cannot load {str(path)!r}: corrupt or truncated file "
                              f"({type(err).__name__}: {_first_line(err)})") from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"cannot load {str(path)!r}: corrupt or truncated file "
                              f"({type(err).__name__}: {_first_line(err)})") from err


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed atomic write left in ``folder`` (``.NAME.*.tmp``); return them.

    Example:
        >>> remove_stale_temporaries("/nonexistent-run")
        []
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_writable_dir(folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``folder`` if it cannot be created or written (nothing is created).

    Example:
        >>> check_writable_dir("/tmp/some/new/run")
    """
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write to output dir {str(folder)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to output dir {str(folder)!r}: {str(existing)!r} is not writable")


class RunRecord:
    """The files of one run in ``output_dir``; a disabled record (non-zero ranks) writes nothing.

    Args:
        output_dir: The run folder (created on first write).
        enabled: Whether this process writes (only rank 0 under torchrun).

    Example:
        >>> record = RunRecord("/tmp/run-demo")
        >>> record.log_epoch({"global_epoch": 0, "train_loss": 2.3})
        >>> record.epochs()[0]["train_loss"]
        2.3
    """

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled

    @property
    def config_path(self) -> Path:
        """``config.json``: the resolved configuration."""
        return self.dir / "config.json"

    @property
    def results_path(self) -> Path:
        """``results.json``: one row per round."""
        return self.dir / "results.json"

    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.pt``: the latest resumable state."""
        return self.dir / "checkpoint.pt"

    @property
    def plot_path(self) -> Path:
        """``results.png``: accuracy against pruned % and MACs."""
        return self.dir / "results.png"

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config.json``."""
        if self.enabled:
            atomic_write_json(self.config_path, dict(config))

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Append one row to ``epochs.jsonl`` and ``epochs.csv`` (columns :data:`EPOCH_FIELDS`)."""
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with critical_section():  # both files get the row, or neither
            with open(self.dir / "epochs.jsonl", "a") as f:
                f.write(json.dumps(dict(row)) + "\n")
            csv_path = self.dir / "epochs.csv"
            new = not csv_path.exists()
            with open(csv_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=EPOCH_FIELDS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(dict(row))

    def epochs(self) -> list[dict[str, Any]]:
        """The rows of ``epochs.jsonl`` (empty if none)."""
        path = self.dir / "epochs.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_epochs(self, count: int) -> None:
        """Keep only the first ``count`` epoch rows (on resume: drop epochs logged after the checkpoint)."""
        if not self.enabled:
            return
        rows = self.epochs()[:count]
        atomic_write_bytes(self.dir / "epochs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=EPOCH_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.dir / "epochs.csv", text.getvalue().encode())

    def write_results(self, results: Mapping[str, Any]) -> None:
        """Atomically write ``results.json``."""
        if self.enabled:
            atomic_write_json(self.results_path, dict(results))

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Atomically write ``checkpoint.pt`` (load it with :func:`safe_torch_load`)."""
        if self.enabled:
            atomic_torch_save(dict(state), self.checkpoint_path)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run's ``results.json`` (``path`` is the file or its run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {str(path)!r}")
    return json.loads(path.read_text())


TABLE_COLUMNS: tuple[str, ...] = (
    "run", "recipe", "model", "dataset", "method", "round", "pruned_pct", "params", "macs_pct", "acc_after_prune",
    "test_acc",
)


def merge_results(paths: Sequence[str | os.PathLike]) -> list[tuple[str, dict[str, Any]]]:
    """Load several runs' results, labelled by method (by folder name where a method repeats).

    Example:
        >>> runs = merge_results(["runs/it-orthoreg", "runs/it-l1"])  # doctest: +SKIP
        >>> [label for label, _ in runs]  # doctest: +SKIP
        ['orthoreg', 'l1']
    """
    loaded = [(Path(p), load_results(p)) for p in paths]
    methods = [r["method"] for _, r in loaded]
    return [(r["method"] if methods.count(r["method"]) == 1 else
             (p.name if p.is_dir() else p.parent.name), r) for p, r in loaded]


def table_rows(runs: Sequence[tuple[str, Mapping[str, Any]]],
               columns: Sequence[str] = TABLE_COLUMNS) -> list[dict[str, Any]]:
    """Flatten runs into table rows (one per run and round) with the given columns."""
    out = []
    for label, results in runs:
        for row in results["rows"]:
            merged = {**{k: results.get(k) for k in ("recipe", "model", "dataset", "method")}, **row, "run": label}
            out.append({c: merged.get(c) for c in columns})
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows (dicts with the same keys) as a Markdown table; floats with 2 decimals, ``None`` as ``-``.

    Example:
        >>> print(markdown_table([{"method": "l1", "test_acc": 91.234}]))
        | method | test_acc |
        |---|---|
        | l1 | 91.23 |
    """
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_results(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: str | os.PathLike,
                 *, title: str = "") -> None:
    """Plot test accuracy against pruned % and against MACs, one line per run.

    Args:
        runs: ``(label, rows)`` pairs; rows need ``pruned_pct``, ``macs`` and ``test_acc``.
        path: Where to write the PNG (atomically).
        title: Figure title.

    Example:
        >>> plot_results([("orthoreg", [{"pruned_pct": 0, "macs": 1e6, "test_acc": 90.0}])], "/tmp/p.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, rows in runs:
        rows = sorted(rows, key=lambda r: r["pruned_pct"])
        acc = [r["test_acc"] for r in rows]
        axes[0].plot([r["pruned_pct"] for r in rows], acc, marker="o", label=label)
        axes[1].plot([r["macs"] / 1e6 for r in rows], acc, marker="o", label=label)
    axes[0].set_xlabel("filters pruned (%)")
    axes[1].set_xlabel("MACs (M)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def check_comparable(runs: Sequence[tuple[str, Mapping[str, Any]]], *, mixed: bool = False) -> None:
    """Refuse to put runs of different datasets or models in one comparison, unless ``mixed``.

    Raises:
        ValueError: Naming each run's dataset and model.

    Example (the message continues "to compare them anyway"):
        >>> check_comparable([("a", {"dataset": "digits", "model": "m"}), ("b", {"dataset": "cifar10", "model": "m"})])
        Traceback (most recent call last):
        ...
        ValueError: runs of different datasets or models: a (m on digits), b (m on cifar10); pass --mixed ...
    """
    kinds = {(r.get("dataset"), r.get("model")) for _, r in runs}
    if len(kinds) > 1 and not mixed:
        listed = ", ".join(f"{label} ({r.get('model')} on {r.get('dataset')})" for label, r in runs)
        raise ValueError(f"runs of different datasets or models: {listed}; pass --mixed to compare them anyway")


def default_plot_path(paths: Sequence[str | os.PathLike]) -> Path:
    """Where a comparison's plot goes by default: ``compare.png`` in the folder that holds the runs.

    Example:
        >>> str(default_plot_path(["runs/a", "runs/b/results.json"]))
        'runs/compare.png'
    """
    folders = [os.path.abspath(Path(p) if not str(p).endswith(".json") else Path(p).parent) for p in paths]
    common = Path(os.path.commonpath([os.path.dirname(f) for f in folders]))
    with contextlib.suppress(ValueError):  # outside the working directory: keep it absolute
        common = common.relative_to(Path.cwd())
    return common / "compare.png"


def print_safely(text: str) -> bool:
    """Print ``text`` to stdout; if the reader closed the pipe (``| head -1``), stop printing quietly.

    Returns:
        ``False`` if the pipe was closed (later output goes to ``os.devnull``), else ``True``.

    Example:
        >>> print_safely("hello")
        hello
        True
    """
    try:
        print(text)
        sys.stdout.flush()
        return True
    except BrokenPipeError:  # the Python docs' recipe: silence stdout so the interpreter's exit flush cannot fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return False


def summary_table(results: Mapping[str, Any]) -> str:
    """A short plain-text table of a run's rounds: pruned %, params, MACs, accuracy (and latency if recorded).

    Example:
        >>> print(summary_table({"rows": [{"round": 0, "pruned_pct": 0.0, "params": 1200, "macs": 3.4e6,
        ...                                "test_acc": 97.5}]}))
        round  pruned %   params   MACs (M)  test acc %
            0      0.00    1,200       3.40       97.50
    """
    rows = list(results.get("rows", []))
    latency = next((k for r in rows for k, v in r.items() if k.startswith("latency")
                    and isinstance(v, (int, float))), None)
    header = f"{'round':>5} {'pruned %':>9} {'params':>8} {'MACs (M)':>10} {'test acc %':>11}"
    if latency:
        header += f" {latency:>12}"
    lines = [header]
    for r in rows:
        line = (f"{r.get('round', '-')!s:>5} {r.get('pruned_pct', 0.0):>9.2f} {r.get('params', 0):>8,} "
                f"{r.get('macs', 0) / 1e6:>10.2f} {r.get('test_acc', 0.0):>11.2f}")
        if latency:
            value = r.get(latency)
            line += f" {value:>12.3f}" if isinstance(value, (int, float)) else f" {'-':>12}"
        lines.append(line)
    return "\n".join(lines)
