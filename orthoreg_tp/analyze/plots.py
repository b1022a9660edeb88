"""The sensitivity figure (matplotlib is imported inside the functions, never at package import)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

__all__ = ["plot_sensitivity", "sensitivity_figure_png"]

_MAX_GROUPS = 40  # groups drawn in the bar panel (the most sensitive); more would be unreadable


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, result: Any) -> None:
    groups = [g for g in result.groups() if g["sensitivity"] is not None][:_MAX_GROUPS][::-1]
    levels = sorted({r["level"] for r in result.rows})
    height = 0.8 / max(len(levels), 1)
    for j, level in enumerate(levels):
        deltas = {r["group"]: r["loss_delta"] for r in result.rows
                  if r["level"] == level and r.get("status") == "ok" and r.get("loss_delta") is not None}
        ax.barh([i + j * height for i in range(len(groups))], [deltas.get(g["group"], 0.0) for g in groups],
                height=height, label=f"{100 * level:.0f}% removed")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(groups))])
    ax.set_yticklabels([g["root"] + (f" +{len(g['layers']) - 1}" if len(g["layers"]) > 1 else "") for g in groups],
                       fontsize=7)
    ax.axvline(0.0, color="black", lw=0.6)
    ax.set_xlabel("loss change (measured)")
    ax.set_title("groups pruned alone (most sensitive on top)", fontsize=9)
    if groups:
        ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)


def _scatter(ax: Any, result: Any) -> None:
    pairs = [(r["predicted_loss_delta"], r["loss_delta"], r["level"]) for r in result.rows
             if r.get("status") == "ok" and r.get("predicted_loss_delta") is not None
             and r.get("loss_delta") is not None]
    if not pairs:
        ax.text(0.5, 0.5, f"no predicted loss change\n({result.importance or 'this'} importance)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for level in sorted({p[2] for p in pairs}):
        xs = [p[0] for p in pairs if p[2] == level]
        ys = [p[1] for p in pairs if p[2] == level]
        ax.scatter(xs, ys, s=14, label=f"{100 * level:.0f}% removed")
    top = max(max(abs(p[0]), abs(p[1])) for p in pairs) or 1.0
    diagonal = [0.0] + [top * 10 ** (k / 8) for k in range(-40, 1)]  # straight on the symlog axes too
    ax.plot(diagonal, diagonal, color="grey", lw=0.8, ls="--", label="measured = predicted")
    # symmetric log axes: predicted and measured changes often differ by orders of magnitude, and can be < 0
    ax.set_xscale("symlog", linthresh=top * 1e-4)
    ax.set_yscale("symlog", linthresh=top * 1e-4)
    ax.set_xlabel("predicted loss change (0.5 * sum of Fisher scores)")
    ax.set_ylabel("measured loss change")
    ax.set_title("predicted against measured, one point per group and level", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def sensitivity_figure_png(result: Any, *, dpi: int = 110) -> bytes:
    """A :class:`~orthoreg_tp.analyze.SensitivityResult`'s figure as PNG: loss change per group, predicted vs measured.

    Example:
        >>> from orthoreg_tp.analyze import SensitivityResult
        >>> sensitivity_figure_png(SensitivityResult(rows=[], baseline_loss=0.0))[1:4]
        b'PNG'
    """
    plt = _pyplot()
    n = len({r["group"] for r in result.rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 0.3 * min(n, _MAX_GROUPS) + 1.5)), constrained_layout=True)
    _bars(axes[0], result)
    _scatter(axes[1], result)
    fig.suptitle(f"sensitivity: {result.model_class} (baseline loss {result.baseline_loss:.4f})", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def plot_sensitivity(result: Any, path: str | os.PathLike) -> Path:
    """Write :func:`sensitivity_figure_png` to ``path``; returns it.

    Example:
        >>> result.plot("sensitivity.png")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sensitivity_figure_png(result))
    return path
