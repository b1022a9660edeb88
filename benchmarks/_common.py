"""Helpers shared by the benchmark scripts: machine description, timing, spread statistics, result files.

The scripts are run as ``python benchmarks/NAME.py`` (this folder is then on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def command() -> str:
    """The command line that is running, for the result files."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                      device: torch.device | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved (A B C A B C ...) so drifts hit all alike.

    ``clock`` is wall time by default; ``time.process_time`` (this process's CPU time) is steadier on shared cores.
    """
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[name].append(clock() - start)
    return times


def median(values: Sequence[float]) -> float:
    """Median (``nan`` for no values)."""
    return statistics.median(values) if values else float("nan")


def spread(values: Iterable[float | None]) -> dict[str, float]:
    """``{"mean", "min", "max", "n"}`` over the finite values."""
    finite = [float(v) for v in values if v is not None and v == v]
    if not finite:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite), "n": len(finite)}


def fmt_spread(s: Mapping[str, float], digits: int = 2) -> str:
    """``mean [min, max]``."""
    if not s.get("n"):
        return "n/a"
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: Mapping[str, Any], markdown: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``NAME.json`` (payload + machine + command) and ``NAME.md`` (the summary) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"command": command(), "machine": machine(), **payload}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def machine_line(info: Mapping[str, Any] | None = None) -> str:
    """One line describing the machine, for the markdown summaries."""
    info = info or machine()
    gpu = info.get("cuda") or "no GPU"
    load = info.get("load_average")
    load_text = f", load average {load[0]:.1f}" if load else ""
    return (f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), {gpu}, "
            f"torch {info['torch']}{load_text}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path | torch.device):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
