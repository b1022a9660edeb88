"""``report.html``: one self-contained page per run or analysis (tables as HTML, plots as embedded base64 PNG).

No external asset, stylesheet or script: the file opens offline in any browser and can be mailed on its own.
A recipe run writes it next to ``results.json`` every time the results are written (accuracy against MACs per
round, per-layer widths before and after, the round table, the training curve); ``orthoreg-tp analyze`` writes
the sensitivity table and plot; ``orthoreg-tp yolo`` the dense and pruned model's measurements, the headline
metric against MACs, per-layer widths and the prune settings. matplotlib is imported only when a figure is drawn.

Example:
    >>> page = html_document("demo", [("numbers", html_table([{"a": 1, "b": 2.5}]))])
    >>> "<table>" in page and "http" not in page
    True
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .records import atomic_write_bytes

__all__ = ["html_document", "html_table", "png_image", "write_run_report", "write_sensitivity_report",
           "write_yolo_report"]

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
ROUND_COLUMNS: tuple[str, ...] = (
    "round", "target_pct", "pruned_pct", "filters_pruned_pct", "params", "params_pct", "macs", "macs_pct",
    "acc_after_prune", "test_acc", "test_loss", "latency_ms", "latency_pct", "epochs",
)
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ccc;padding:.2em .5em;
text-align:right}th{background:#f3f3f3}td.t,th.t{text-align:left}tr:nth-child(even){background:#fafafa}
img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
.sub{color:#666}
"""


# ----------------------------------------------------------------------------------------------- building blocks
def _cell(value: Any, digits: int) -> tuple[str, bool]:
    """``(escaped text, is_text)`` of one table cell."""
    if value is None:
        return "-", False
    if isinstance(value, bool):
        return str(value), True
    if isinstance(value, float):
        return ("nan" if math.isnan(value) else f"{value:.{digits}g}"), False
    if isinstance(value, int):
        return f"{value:,}", False
    if isinstance(value, (list, tuple)):
        value = "; ".join(map(str, value))
    elif isinstance(value, Mapping):
        value = json.dumps(value)
    return html.escape(str(value)), True


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, digits: int = 4) -> str:
    """An HTML table of ``rows`` (dicts); floats with ``digits`` significant digits, ``None`` as ``-``.

    Args:
        rows: The rows.
        columns: Columns to show (default: the keys of the first row); a column no row has is left out.
        digits: Significant digits of floats.

    Example:
        >>> table = html_table([{"layer": "conv<1>", "width": 64}])
        >>> table.split("</tr>")[1]
        '<tr><td class="t">conv&lt;1&gt;</td><td>64</td>'
    """
    if not rows:
        return "<p class=\"sub\">(no rows)</p>"
    columns = [c for c in (columns or list(rows[0])) if any(c in r for r in rows)]
    text_cols = {c for c in columns if any(_cell(r.get(c), digits)[1] for r in rows if r.get(c) is not None)}
    head = "".join(f'<th class="t">{html.escape(c)}</th>' if c in text_cols else f"<th>{html.escape(c)}</th>"
                   for c in columns)
    body = []
    for r in rows:
        cells = "".join(f'<td class="t">{_cell(r.get(c), digits)[0]}</td>' if c in text_cols else
                        f"<td>{_cell(r.get(c), digits)[0]}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def pairs_table(values: Mapping[str, Any], left: str = "key", right: str = "value") -> str:
    """A two-column table of a mapping: one row per item.

    Example:
        >>> pairs_table({'seed': 0}, 'option').count('<tr>')  # a header row and one row per item
        2
    """
    return html_table([{left: k, right: v} for k, v in values.items()])


def png_image(png: bytes, *, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI.

    Example:
        >>> png_image(bytes([137, 80, 78, 71]), alt="plot")
        '<img alt="plot" src="data:image/png;base64,iVBORw=="/>'
    """
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"/>'


def html_document(title: str, sections: Sequence[tuple[str, str]], *, subtitle: str = "") -> str:
    """A complete HTML page: a title, an optional subtitle and ``(heading, html)`` sections; inline CSS only.

    Example:
        >>> html_document("t", [("s", "<p>x</p>")]).startswith("<!DOCTYPE html>")
        True
    """
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="sub">{html.escape(subtitle)}</p>')
    parts += [f"<h2>{html.escape(heading)}</h2>\n{body}" for heading, body in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _write(path: str | os.PathLike, page: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page.encode("utf-8"))
    path.chmod(0o644)  # a page to share (the atomic write's temporary file is private)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- recipe runs
def _round_tag(row: Mapping[str, Any]) -> str:
    return f"r{row.get('round', '?')}"


def _metric_vs_macs(rows: Sequence[Mapping[str, Any]], title: str, *, metric: str = "test_acc",
                    ylabel: str = "test accuracy (%)", label: str = "after retraining",
                    tag: Callable[[Mapping[str, Any]], str] = _round_tag) -> bytes:
    """``metric`` of each row against its MACs, each point tagged; ``acc_after_prune`` as open circles if any."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    rows = [r for r in rows if r.get("macs") is not None and r.get(metric) is not None]
    macs = [r["macs"] / 1e6 for r in rows]
    ax.plot(macs, [r[metric] for r in rows], marker="o", label=label)
    pruned = [(r["macs"] / 1e6, r["acc_after_prune"]) for r in rows if r.get("acc_after_prune") is not None]
    if pruned:
        ax.scatter(*zip(*pruned), facecolors="none", edgecolors="C3", label="right after pruning")
    for r, x in zip(rows, macs):
        ax.annotate(tag(r), (x, r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _widths_plot(before: Mapping[str, int], after: Mapping[str, int], label: str) -> bytes:
    plt = _pyplot()
    names = list(before)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4), constrained_layout=True)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [before[n] for n in names], width=0.4, label="before (dense)")
    ax.bar([x + 0.2 for x in xs], [after.get(n, 0) for n in names], width=0.4, label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("per-layer widths", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _training_curve(epochs: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5), constrained_layout=True)
    xs = [e.get("global_epoch", i) for i, e in enumerate(epochs)]
    ax.plot(xs, [e.get("test_acc") for e in epochs], label="test accuracy", marker=".")
    ax.plot(xs, [e.get("train_acc") for e in epochs], label="train accuracy", marker=".", alpha=0.6)
    ax.set_xlabel("epoch (all phases)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _round_column(row: Mapping[str, Any]) -> str:
    return f"round {row.get('round', '?')}"


def _widths_rows(rows: Sequence[Mapping[str, Any]], *, column: Callable[[Mapping[str, Any]], str] = _round_column,
                 ) -> tuple[dict[str, int], dict[str, int], list[dict[str, Any]]]:
    """Dense and final widths, and one table row per layer with its width in every row (column ``column(row)``)."""
    with_widths = [r for r in rows if isinstance(r.get("widths"), Mapping)]
    if not with_widths:
        return {}, {}, []
    before, after = dict(with_widths[0]["widths"]), dict(with_widths[-1]["widths"])
    table = []
    for name, width in before.items():
        entry: dict[str, Any] = {"layer": name}
        for r in with_widths:
            entry[column(r)] = r["widths"].get(name)
        entry["kept %"] = round(100.0 * after.get(name, 0) / width, 1) if width else None
        table.append(entry)
    return before, after, table


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_report_sections(results: Mapping[str, Any], *, config: Mapping[str, Any] | None = None,
                        epochs: Sequence[Mapping[str, Any]] = ()) -> list[tuple[str, str]]:
    """The sections of a recipe run's report from its ``results.json`` (and ``config.json``, ``epochs.jsonl``).

    Example:
        >>> sections = run_report_sections({"rows": [{"round": 0, "macs": 1e6, "test_acc": 90.0}]})
        >>> [heading for heading, _ in sections]
        ['rounds', 'accuracy against MACs']
    """
    rows = list(results.get("rows", []))
    sections = [("rounds", html_table(rows, [c for c in ROUND_COLUMNS if any(c in r for r in rows)]))]
    if rows:
        title = f"{results.get('model', '')} on {results.get('dataset', '')}, method {results.get('method', '')}"
        sections.append(("accuracy against MACs", png_image(_metric_vs_macs(rows, title), alt="accuracy vs MACs")))
    before, after, table = _widths_rows(rows)
    if table:
        last = next(r.get("round") for r in reversed(rows) if isinstance(r.get("widths"), Mapping))
        sections.append(("per-layer widths before and after",
                         png_image(_widths_plot(before, after, f"after round {last}"), alt="per-layer widths")
                         + html_table(table)))
    if epochs:
        sections.append(("training", png_image(_training_curve(epochs), alt="training curve")))
    notes = {k: v for k, v in results.items() if k != "rows"}
    if notes:
        sections.append(("run", pairs_table(notes)))
    if config:
        sections.append(("configuration", pairs_table(config, "option")))
    return sections


def write_run_report(run_dir: str | os.PathLike, results: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.html`` for a recipe run (``results`` default: the folder's ``results.json``).

    Example:
        >>> write_run_report("runs/it-orthoreg")  # doctest: +SKIP
        PosixPath('runs/it-orthoreg/report.html')
    """
    run_dir = Path(run_dir)
    if results is None:
        results = json.loads((run_dir / "results.json").read_text())
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    sections = run_report_sections(results, config=config, epochs=_read_json_lines(run_dir / "epochs.jsonl"))
    state = "complete" if results.get("complete") else "in progress"
    title = f"{results.get('recipe', 'run')}: {results.get('model', '?')} on {results.get('dataset', '?')}"
    subtitle = f"method {results.get('method', '?')}, seed {results.get('seed', '?')}, {state}; folder {run_dir}"
    return _write(run_dir / REPORT_NAME, html_document(title, sections, subtitle=subtitle))


# ----------------------------------------------------------------------------------------------- sensitivity
def sensitivity_sections(result: Any, *, max_loss_delta: float | None = None) -> list[tuple[str, str]]:
    """The sections of a sensitivity report: summary, figure, groups ranked, per-layer ratios, every row.

    Example:
        >>> from orthoreg_tp.analyze import SensitivityResult
        >>> [h for h, _ in sensitivity_sections(SensitivityResult(rows=[], baseline_loss=1.0))][:2]
        ['summary', 'loss change per group']
    """
    from ..analyze.plots import sensitivity_figure_png
    from ..analyze.result import rows_for_table

    sections = [("summary", f"<pre>{html.escape(result.summary())}</pre>"),
                ("loss change per group", png_image(sensitivity_figure_png(result), alt="sensitivity")),
                ("groups, most sensitive first", html_table(
                    [{**g, "layers": "; ".join(g["layers"])} for g in result.groups()]))]
    if max_loss_delta is not None:
        ratios = result.layer_ratios(max_loss_delta=max_loss_delta, by_name=True)
        sections.append((f"per-layer ratios within a loss change of {max_loss_delta:g}",
                         pairs_table(ratios, "root layer", "ratio")))
    sections.append(("every group and level", html_table(rows_for_table(result.rows))))
    return sections


def write_sensitivity_report(path: str | os.PathLike, result: Any, *, title: str = "",
                             context: Mapping[str, Any] | None = None,
                             max_loss_delta: float | None = None) -> Path:
    """Write a self-contained sensitivity report (a :class:`~orthoreg_tp.analyze.SensitivityResult`).

    Args:
        path: The HTML file to write.
        result: The analysis.
        title: Page title (default: the model class).
        context: Facts shown as a table first (model, dataset, checkpoint, command...).
        max_loss_delta: Also list :meth:`~orthoreg_tp.analyze.SensitivityResult.layer_ratios` for this budget.

    Example:
        >>> write_sensitivity_report("out/report.html", result, context={"model": "resnet34"})  # doctest: +SKIP
    """
    sections = sensitivity_sections(result, max_loss_delta=max_loss_delta)
    if context:
        sections.insert(0, ("analysis", pairs_table(context)))
    subtitle = (f"{result.importance} ranking, {result.num_samples} samples, levels "
                f"{', '.join(f'{v:g}' for v in result.levels)}, {result.seconds:.1f} s")
    return _write(path, html_document(title or f"sensitivity: {result.model_class}", sections, subtitle=subtitle))


# ----------------------------------------------------------------------------------------------- orthoreg-tp yolo
YOLO_METRICS: tuple[tuple[str, str], ...] = (("map50_95", "mAP50-95 (box)"), ("top1", "top-1 accuracy"))


def _ratio(before: Any, after: Any) -> float | None:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after))
    return after / before if numbers and before else None


def yolo_before_after(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per quantity a ``yolo`` run measured on the dense and the pruned model, with ``after / before``.

    Parameters, MACs, latency (when a latency budget timed it), checkpoint sizes, then every metric of
    ultralytics' validator (``metrics_before`` / ``metrics_after``).

    Example:
        >>> yolo_before_after({"params_before": 10, "params_after": 4})
        [{'quantity': 'parameters', 'before': 10, 'after': 4, 'after / before': 0.4}]
    """
    latency = results.get("latency") or {}
    pairs = [("parameters", results.get("params_before"), results.get("params_after")),
             ("MACs", results.get("macs_before"), results.get("macs_after")),
             ("latency (ms, median)", (latency.get("dense") or {}).get("median_ms"),
              (latency.get("pruned") or {}).get("median_ms")),
             ("checkpoint (bytes)", results.get("dense_checkpoint_bytes"), results.get("pruned_checkpoint_bytes"))]
    metrics_before, metrics_after = results.get("metrics_before") or {}, results.get("metrics_after") or {}
    pairs += [(k, metrics_before.get(k), metrics_after.get(k)) for k in dict.fromkeys([*metrics_before,
                                                                                         *metrics_after])]
    return [{"quantity": name, "before": b, "after": a, "after / before": _ratio(b, a)}
            for name, b, a in pairs if b is not None or a is not None]


def _yolo_metric_plot(results: Mapping[str, Any]) -> str | None:
    """The headline metric (box mAP50-95, else top-1) of the dense and the pruned model against their MACs."""
    for key, label in YOLO_METRICS:
        points = [{"stage": stage, "macs": results.get(f"macs_{suffix}"), key: results.get(f"{key}_{suffix}")}
                  for stage, suffix in (("dense", "before"), ("pruned", "after"))]
        if any(p[key] is not None and p["macs"] is not None for p in points):
            config = results.get("config") or {}
            title = f"{config.get('model', '?')} on {config.get('data', '?')}, imgsz {config.get('imgsz', '?')}"
            png = _metric_vs_macs(points, title, metric=key, ylabel=label, label="validated (dense, pruned)",
                                  tag=lambda r: r["stage"])
            return png_image(png, alt=f"{label} vs MACs")
    return None


def _yolo_widths(results: Mapping[str, Any]) -> str | None:
    """A bar chart and a table of ``results["widths"]`` (``{layer: [before, after]}``), or ``None`` without it."""
    widths = results.get("widths") or {}
    rows = [{"stage": stage, "widths": {k: v[i] for k, v in widths.items()}}
            for i, stage in enumerate(("before", "after"))]
    before, after, table = _widths_rows(rows, column=lambda r: r["stage"])
    if not table:
        return None
    return png_image(_widths_plot(before, after, "after pruning"), alt="per-layer widths") + html_table(table)


def _yolo_prune_settings(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    config = results.get("config") or {}
    target = results.get("target")
    budget = (f"keep {target[1]:g} of the dense {target[0]}" if target else
              f"remove {config.get('prune_percent', '?')}% of the channels")
    facts = {"importance": results.get("importance", "OrthoRegImportance"),
             "importance batches used": results.get("importance_batches_used"),
             "OrthoReg coefficient": config.get("coefficient"), "budget": budget,
             "pruning ratio used": results.get("prune_ratio"), "channels removed": results.get("channels_removed"),
             "frozen": results.get("frozen") or "none", "unused (not pruned)": results.get("unused") or "none",
             "notes": results.get("notes") or "none"}
    return [{"setting": k, "value": v} for k, v in facts.items() if v is not None]


def yolo_report_sections(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The sections of an ``orthoreg-tp yolo`` run's report from its ``results.json``.

    Example:
        >>> sections = yolo_report_sections({"params_before": 10, "params_after": 4, "config": {"epochs": 1}})
        >>> [heading for heading, _ in sections]
        ['before and after', 'prune settings', 'configuration']
    """
    sections = [("before and after", html_table(yolo_before_after(results)))]
    plot = _yolo_metric_plot(results)
    if plot:
        sections.append(("metric against MACs", plot))
    widths = _yolo_widths(results)
    if widths:
        sections.append(("per-layer widths before and after", widths))
    sections.append(("prune settings", html_table(_yolo_prune_settings(results))))
    if results.get("seconds"):
        sections.append(("seconds per step", pairs_table(results["seconds"], "step", "seconds")))
    files = {k: v for k, v in results.items() if k.endswith("_checkpoint") or k in ("task", "model_class")}
    if files:
        sections.append(("run", pairs_table(files)))
    if results.get("config"):
        sections.append(("configuration", pairs_table(results["config"], "option")))
    return sections


def write_yolo_report(out_dir: str | os.PathLike, results: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/report.html`` for an ``orthoreg-tp yolo`` run (``results`` default: its ``results.json``).

    Example:
        >>> write_yolo_report("runs/yolo")  # doctest: +SKIP
        PosixPath('runs/yolo/report.html')
    """
    out_dir = Path(out_dir)
    if results is None:
        results = json.loads((out_dir / "results.json").read_text())
    config = results.get("config") or {}
    title = f"yolo: {config.get('model', '?')} on {config.get('data', '?')}"
    subtitle = (f"{results.get('model_class', 'model')}, task {results.get('task', '?')}, imgsz "
                f"{config.get('imgsz', '?')}, seed {config.get('seed', '?')}; folder {out_dir}")
    return _write(out_dir / REPORT_NAME, html_document(title, yolo_report_sections(results), subtitle=subtitle))


# ----------------------------------------------------------------------------------------------- never failing
def _try_write(write: Callable[..., Path], *args: Any) -> Path | None:
    try:
        return write(*args)
    except Exception as err:  # noqa: BLE001 - a report must never stop the run that asked for it
        logger.warning("report.html not written: %s: %s", type(err).__name__, err)
        return None


def try_write_run_report(run_dir: str | os.PathLike, results: Mapping[str, Any]) -> Path | None:
    """:func:`write_run_report`, logging a warning instead of failing the run that asked for it.

    Example:
        >>> try_write_run_report("/proc/no-such-run", {"rows": []}) is None
        True
    """
    return _try_write(write_run_report, run_dir, results)


def try_write_yolo_report(out_dir: str | os.PathLike, results: Mapping[str, Any]) -> Path | None:
    """:func:`write_yolo_report`, logging a warning instead of failing the ``yolo`` run that asked for it.

    Example:
        >>> try_write_yolo_report("/proc/no-such-run", {}) is None
        True
    """
    return _try_write(write_yolo_report, out_dir, results)
