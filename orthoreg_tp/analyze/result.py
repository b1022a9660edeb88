"""``SensitivityResult``: the rows of a sensitivity analysis, their files, a ranked summary and per-layer ratios."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CSV_COLUMNS", "PREDICTIONS", "SensitivityResult", "rows_for_table", "spearman"]

#: Columns of :meth:`SensitivityResult.to_csv` (``layers`` joined with ``;``).
CSV_COLUMNS: tuple[str, ...] = (
    "group", "root", "layers", "level", "channels", "removed", "params_removed", "loss", "acc", "loss_delta",
    "acc_delta", "predicted_loss_delta", "predicted_joint_loss_delta", "first_order_loss_delta", "status", "note",
)
#: The prediction columns (docs/sensitivity.md).
PREDICTIONS: tuple[str, ...] = ("predicted_loss_delta", "predicted_joint_loss_delta", "first_order_loss_delta")


@dataclass
class SensitivityResult:
    """What :func:`~orthoreg_tp.analyze.sensitivity` measured: one row per group and level.

    Each row has ``group`` (index), ``root`` (the group's root layer), ``layers`` (every layer whose output
    channels the group removes), ``level``, ``channels`` (the root's width), ``removed`` (root channels
    removed), ``params_removed``, ``loss``, ``acc`` (%), ``loss_delta`` and ``acc_delta`` (against the
    baseline), ``predicted_loss_delta`` (``0.5 * sum I_c``), ``predicted_joint_loss_delta``,
    ``first_order_loss_delta``, ``status`` (``ok``, ``failed``, ``skipped``, ``unscored``) and ``note``.

    Example:
        >>> r = SensitivityResult(rows=[{"group": 0, "root": "conv", "layers": ["conv"], "level": 0.5,
        ...                              "loss_delta": 0.2, "status": "ok"}], baseline_loss=1.0)
        >>> r.layer_ratios(max_loss_delta=0.5, by_name=True)
        {'conv': 0.5}
    """

    rows: list[dict[str, Any]]
    baseline_loss: float
    baseline_acc: float | None = None
    levels: tuple[float, ...] = ()
    importance: str = ""
    num_samples: int = 0
    seconds: float = 0.0
    model_class: str = ""
    roots: dict[str, nn.Module] = field(default_factory=dict, repr=False)  # group root name -> module

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (everything but the module references).

        Example:
            >>> SensitivityResult(rows=[], baseline_loss=1.0).to_dict()["baseline_loss"]
            1.0
        """
        return {"model_class": self.model_class, "importance": self.importance, "levels": list(self.levels),
                "num_samples": self.num_samples, "seconds": round(self.seconds, 3),
                "baseline_loss": self.baseline_loss, "baseline_acc": self.baseline_acc,
                "rows": [dict(r) for r in self.rows]}

    def groups(self) -> list[dict[str, Any]]:
        """One entry per group, most sensitive first.

        Each has ``group``, ``root``, ``layers``, ``level`` and ``sensitivity`` (the highest level measured and
        its loss change), ``status`` (``ok`` if any level was measured) and ``note``.

        Example:
            >>> SensitivityResult(rows=[], baseline_loss=0.0).groups()
            []
        """
        by_group: dict[int, list[dict[str, Any]]] = {}
        for row in self.rows:
            by_group.setdefault(row["group"], []).append(row)
        out = []
        for index, rows in by_group.items():
            measured = [r for r in rows if r.get("status") == "ok" and r.get("loss_delta") is not None]
            top = max(measured, key=lambda r: r["level"]) if measured else None
            out.append({"group": index, "root": rows[0]["root"], "layers": rows[0]["layers"],
                        "level": top["level"] if top else None,
                        "sensitivity": top["loss_delta"] if top else None,
                        "status": "ok" if measured else rows[0].get("status", "failed"),
                        "note": "" if measured else next((r.get("note", "") for r in rows if r.get("note")), "")})
        return sorted(out, key=lambda g: (g["sensitivity"] is None, -(g["sensitivity"] or 0.0), g["group"]))

    def prediction_agreement(self) -> dict[str, float | None]:
        """Spearman rank correlation between the measured loss change and each prediction, over measured rows.

        How well each estimate orders the (group, level) trials; ``None`` with fewer than 3 rows that have both.

        Example:
            >>> rows = [{"group": i, "level": 0.5, "status": "ok", "loss_delta": d, "predicted_loss_delta": p}
            ...         for i, (d, p) in enumerate([(0.1, 1.0), (0.3, 2.0), (0.2, 3.0)])]
            >>> SensitivityResult(rows=rows, baseline_loss=1.0).prediction_agreement()["predicted_loss_delta"]
            0.5
        """
        out: dict[str, float | None] = {}
        for column in PREDICTIONS:
            pairs = [(r["loss_delta"], r[column]) for r in self.rows if r.get("status") == "ok"
                     and r.get("loss_delta") is not None and r.get(column) is not None]
            out[column] = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else None
        return out

    def summary(self, top: int = 5) -> str:
        """A short ranked text: the most and the least sensitive groups, and those that could not be pruned alone.

        Example:
            >>> r = SensitivityResult(rows=[{"group": 0, "root": "a", "layers": ["a"], "level": 0.5,
            ...                              "loss_delta": 0.3, "status": "ok"}], baseline_loss=1.0)
            >>> print(r.summary().splitlines()[2])
              1. a  loss +0.3 at 50% removed
        """
        groups = self.groups()
        ranked = [g for g in groups if g["sensitivity"] is not None]
        acc = "" if self.baseline_acc is None else f", accuracy {self.baseline_acc:.2f}%"
        lines = [f"sensitivity of {len(groups)} groups of {self.model_class or 'the model'} ({self.importance or '?'}"
                 f" ranking, {self.num_samples} samples; baseline loss {self.baseline_loss:.4f}{acc})",
                 "most sensitive (loss change when the group alone loses its lowest-scored channels):"]
        lines += [_group_line(i + 1, g) for i, g in enumerate(ranked[:top])]
        if len(ranked) > top:
            lines.append("least sensitive:")
            tail = ranked[-top:] if len(ranked) >= 2 * top else ranked[top:]
            lines += [_group_line(ranked.index(g) + 1, g) for g in tail]
        agreement = {k: v for k, v in self.prediction_agreement().items() if v is not None}
        if agreement:
            lines.append("rank correlation of measured and predicted loss changes (Spearman): " + ", ".join(
                f"{k.removesuffix('_loss_delta')} {v:.2f}" for k, v in agreement.items()))
        failed = [g for g in groups if g["sensitivity"] is None]
        if failed:
            lines.append(f"not measured alone ({len(failed)}): " + "; ".join(
                f"{g['root']} ({g['status']}: {g['note'][:80]})" for g in failed[:top]))
        return "\n".join(lines)

    # ------------------------------------------------------------------ per-layer ratios
    def layer_ratios(self, *, max_loss_delta: float, by_name: bool = False) -> dict[Any, float]:
        """Per-group pruning ratios within a loss budget, for ``prune(..., pruning_ratio_dict=...)``.

        A group's ratio is the largest level whose measured loss change, and that of every lower level, is at
        most ``max_loss_delta``; ``0.0`` when even the lowest level exceeds it or the group could not be measured.
        Keys are the groups' root modules (``pruning_ratio_dict`` of torch-pruning and
        :func:`orthoreg_tp.adapters.prune`; pass ``ratio=0.0, global_ranking=False`` so unlisted layers keep
        their channels), or their names with ``by_name=True``.

        Args:
            max_loss_delta: The loss increase each group may cause on its own.
            by_name: Key by layer name instead of module.

        Raises:
            ValueError: ``max_loss_delta`` is not a finite number, or module keys were asked of a result without
                module references (one loaded from JSON).

        Example:
            >>> ratios = result.layer_ratios(max_loss_delta=0.05)  # doctest: +SKIP
            >>> prune(model, x, importance=imp, ratio=0.0, global_ranking=False, pruning_ratio_dict=ratios)
            ... # doctest: +SKIP
        """
        if not isinstance(max_loss_delta, (int, float)) or max_loss_delta != max_loss_delta:
            raise ValueError(f"max_loss_delta must be a number, got {max_loss_delta!r}")
        ratios: dict[str, float] = {}
        by_group: dict[int, list[dict[str, Any]]] = {}
        for row in self.rows:
            by_group.setdefault(row["group"], []).append(row)
        for rows in by_group.values():
            ratio = 0.0
            for row in sorted(rows, key=lambda r: r["level"]):
                if row.get("status") == "skipped":
                    continue
                if row.get("status") != "ok" or row.get("loss_delta") is None or row["loss_delta"] > max_loss_delta:
                    break
                ratio = float(row["level"])
            ratios[rows[0]["root"]] = ratio
        if by_name:
            return ratios
        missing = [name for name in ratios if name not in self.roots]
        if missing:
            raise ValueError(f"no module references for {missing[:3]} (a result loaded from a file?); "
                             "pass by_name=True")
        return {self.roots[name]: ratio for name, ratio in ratios.items()}

    # ------------------------------------------------------------------ files
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV (:data:`CSV_COLUMNS`); returns the path.

        Example:
            >>> SensitivityResult(rows=[], baseline_loss=1.0).to_csv("/tmp/sens.csv").read_text().split(",")[0]
            'group'
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({**row, "layers": ";".join(row.get("layers", []))})
        return path

    def to_json(self, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
        """Write :meth:`to_dict` (plus the keys of ``extra``) as JSON; returns the path.

        Example:
            >>> import json
            >>> json.loads(SensitivityResult(rows=[], baseline_loss=1.0).to_json("/tmp/s.json").read_text())["rows"]
            []
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), **(extra or {})}, indent=1, allow_nan=True))
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SensitivityResult:
        """Read a result written by :meth:`to_json` (without module references: use ``by_name=True``).

        Example:
            >>> SensitivityResult.from_json(SensitivityResult(rows=[], baseline_loss=1.0).to_json("/tmp/s.json")).rows
            []
        """
        doc = json.loads(Path(path).read_text())
        return cls(rows=doc["rows"], baseline_loss=doc["baseline_loss"], baseline_acc=doc.get("baseline_acc"),
                   levels=tuple(doc.get("levels", ())), importance=doc.get("importance", ""),
                   num_samples=doc.get("num_samples", 0), seconds=doc.get("seconds", 0.0),
                   model_class=doc.get("model_class", ""))

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG: loss change per group and level, and predicted against measured (matplotlib).

        Example:
            >>> result.plot("sensitivity.png")  # doctest: +SKIP
        """
        from .plots import plot_sensitivity

        return plot_sensitivity(self, path)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks starting at 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); ``None`` if either side is constant.

    Example:
        >>> spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0])
        0.5
    """
    ra, rb = _ranks(a), _ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / (va * vb) ** 0.5


def _group_line(rank: int, g: dict[str, Any]) -> str:
    extra = f" (+{len(g['layers']) - 1} coupled)" if len(g["layers"]) > 1 else ""
    return f"  {rank}. {g['root']}{extra}  loss {g['sensitivity']:+.4g} at {100 * g['level']:.0f}% removed"


def rows_for_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``layers`` joined and the columns of :data:`CSV_COLUMNS` (for HTML and Markdown tables).

    Example:
        >>> rows_for_table([{"group": 0, "layers": ["a", "b"]}])[0]["layers"]
        'a; b'
    """
    return [{c: ("; ".join(r.get(c) or []) if c == "layers" else r.get(c)) for c in CSV_COLUMNS} for r in rows]
