"""What ``prune()`` costs next to torch-pruning alone on the same job: wall time, CPU time and peak memory.

Per model and method, one fresh subprocess (``--threads`` torch threads, batch-1 input at ``--image-size``)
builds the model with random weights and prunes it once with magnitude importance
(``tp.importance.GroupMagnitudeImportance()``), ratio 0.5 per layer, the classifier kept:

- ``plain``: ``tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, ignored_layers=[classifier]).step()``
- ``ours``: ``orthoreg_tp.adapters.prune(model, x, importance=imp, ratio=0.5, global_ranking=False)`` (which
  finds and keeps the classifier itself, and also verifies the pruned model and can roll it back).

Measured in the subprocess around the pruning call only: wall seconds, process CPU seconds
(``RUSAGE_SELF`` user + system) and peak memory = ``ru_maxrss`` at the end minus the resident set
(``/proc/self/statm``) right after the model was built: the resident memory the call adds at its peak,
tensors included. Each (model, method) runs ``--repeats`` times; the tables show medians.

``--detection`` also prunes ``fasterrcnn_resnet50_fpn`` as the prunability sweep does (its worker, OrthoReg
importance from one backward pass, 320x320 input, global ranking, 2 threads) and sets it beside the sweep's
earlier record in ``results/prunability.json``.

    python benchmarks/prune_cost.py --threads 1                      # the 10 torchvision + 2 timm models
    python benchmarks/prune_cost.py --threads 1 --models resnet50 timm:vit_small_patch16_224 --repeats 1
    python benchmarks/prune_cost.py --threads 1 --detection
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, command, machine, machine_line, markdown_table, write_results

MODELS = (
    "resnet50", "resnet152", "convnext_tiny", "convnext_large", "efficientnet_b0", "mobilenet_v3_large",
    "regnet_y_800mf", "densenet121", "vit_b_16", "vit_l_16", "timm:resnet50", "timm:vit_small_patch16_224",
)
DETECTION = "fasterrcnn_resnet50_fpn"
METHODS = ("plain", "ours")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="torchvision names, or timm:NAME for timm models")
    p.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per (model, method); medians shown")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--detection", action="store_true", help=f"also time {DETECTION} against its earlier record")
    p.add_argument("--timeout-s", type=float, default=600.0, help="wall-clock kill per subprocess")
    p.add_argument("--name", default="prune_cost", help="results file stem under benchmarks/results/")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------------ worker
def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build(name: str, image_size: int) -> tuple[Any, Any, Any]:
    """``(model, input, classifier)`` for a torchvision name or ``timm:NAME``, random weights, eval mode."""
    import torch

    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False).eval()
        classifier = model.get_classifier()
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None).eval()
        classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return model, torch.randn(1, 3, image_size, image_size), classifier


def run_worker(name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch_pruning as tp
    from orthoreg_tp.adapters import prune

    torch.set_num_threads(args.threads)
    model, x, classifier = build(name, args.image_size)
    params = sum(p.numel() for p in model.parameters())
    imp = tp.importance.GroupMagnitudeImportance()
    base_mb, wall, cpu = _rss_mb(), time.perf_counter(), _cpu_s()
    if method == "plain":
        tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=args.ratio, ignored_layers=[classifier]).step()
    else:
        prune(model, x, importance=imp, ratio=args.ratio, global_ranking=False)
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    return {"model": name, "method": method, "wall_s": wall, "cpu_s": cpu, "peak_mb": _peak_mb() - base_mb,
            "base_mb": base_mb, "params_before": params, "params_after": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------------------------ parent
def _child(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"killed after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"exit code {proc.returncode}: {proc.stderr.strip()[-400:]}"}


def measure(name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median wall/CPU/peak over ``args.repeats`` fresh subprocesses (every run kept under ``runs``)."""
    cmd = [sys.executable, __file__, "--worker", name, method, "--threads", str(args.threads),
           "--ratio", str(args.ratio), "--image-size", str(args.image_size)]
    runs = [_child(cmd, args.timeout_s) for _ in range(args.repeats)]
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[-1]["error"], "runs": runs}
    out = {k: statistics.median(r[k] for r in good) for k in ("wall_s", "cpu_s", "peak_mb")}
    return {**out, "params_before": good[0]["params_before"], "params_after": good[0]["params_after"], "runs": runs}


def detection(args: argparse.Namespace) -> dict[str, Any]:
    """The prunability sweep's worker on the detection model, next to the sweep's earlier record."""
    script = Path(__file__).with_name("prunability.py")
    cmd = [sys.executable, str(script), "--worker", "--lib", "torchvision", "--family", "", "--model", DETECTION,
           "--ratio", "0.5", "--importance", "orthoreg", "--ranking", "global", "--mem-gb", "6", "--threads", "2"]
    now = _child(cmd, args.timeout_s)
    earlier = next((r for r in json.loads((RESULTS / "prunability.json").read_text())["records"]
                    if r.get("model") == DETECTION), {})
    return {"command": " ".join(["python", "benchmarks/prunability.py", *cmd[2:]]), "now": now, "earlier": earlier}


def _geomean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def summarize(results: dict[str, dict[str, Any]]) -> tuple[list[list[Any]], dict[str, float]]:
    rows, ratios = [], {"wall": [], "cpu": [], "peak": []}
    for name, res in results.items():
        plain, ours = res["plain"], res["ours"]
        if "error" in plain or "error" in ours:
            rows.append([name, plain.get("error", "")[:80], ours.get("error", "")[:80], "", "", "", ""])
            continue
        r = {"wall": ours["wall_s"] / plain["wall_s"], "cpu": ours["cpu_s"] / plain["cpu_s"],
             "peak": ours["peak_mb"] / max(plain["peak_mb"], 1.0)}
        for k, v in r.items():
            ratios[k].append(v)
        rows.append([name, f"{plain['wall_s']:.2f}", f"{ours['wall_s']:.2f}", f"{r['wall']:.2f}", f"{r['cpu']:.2f}",
                     f"{plain['peak_mb']:.0f} / {ours['peak_mb']:.0f}", f"{r['peak']:.2f}"])
    geo = {k: _geomean(v) for k, v in ratios.items()}
    worst = {f"worst_{k}": max(v) if v else float("nan") for k, v in ratios.items()}
    return rows, {**geo, **worst}


def write_markdown(rows: list[list[Any]], stats: dict[str, float], args: argparse.Namespace,
                   det: dict[str, Any] | None) -> str:
    lines = [f"Command: `{command()}`  ", f"Machine: {machine_line()}  ",
             f"Per model: median of {args.repeats} fresh subprocesses per method; batch-1 input at "
             f"{args.image_size}, magnitude importance, ratio {args.ratio} per layer, classifier kept. Peak MB: "
             "`ru_maxrss` at the end minus the resident set after the model was built.", ""]
    headers = ["model", "torch-pruning s", "prune() s", "wall x", "CPU x", "peak MB tp / ours", "peak x"]
    lines.append(markdown_table(headers, rows))
    lines += ["", f"Geometric mean: {stats['wall']:.2f}x wall, {stats['cpu']:.2f}x CPU, {stats['peak']:.2f}x peak "
              f"memory (worst {stats['worst_wall']:.2f}x wall, {stats['worst_cpu']:.2f}x CPU, "
              f"{stats['worst_peak']:.2f}x memory). Goal: at most 1.25x, no model above 1.5x."]
    if det is not None:
        now, old = det["now"], det["earlier"]
        lines += ["", f"Detection (`{det['command']}`, the sweep's worker): {DETECTION}, prune "
                  f"{now.get('prune_s', now.get('error'))} s (CPU {now.get('prune_cpu_s')} s), peak RSS "
                  f"{now.get('peak_rss_gb')} GB; the sweep's earlier record: prune {old.get('prune_s')} s "
                  f"(CPU {old.get('prune_cpu_s')} s), peak RSS {old.get('peak_rss_gb')} GB."]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.worker:
        print(json.dumps(run_worker(*args.worker, args)), flush=True)
        return
    import torch

    torch.set_num_threads(args.threads)  # the machine line names the workers' thread count
    results: dict[str, dict[str, Any]] = {}
    for name in args.models:
        results[name] = {m: measure(name, m, args) for m in METHODS}
        res = results[name]
        print(f"{name}: " + ", ".join(f"{m} {res[m].get('wall_s', res[m].get('error'))}" for m in METHODS),
              flush=True)
        _write(results, None, args)  # a partial table survives an interrupted run
    det = detection(args) if args.detection else None
    print(_write(results, det, args))


def _write(results: dict[str, dict[str, Any]], det: dict[str, Any] | None, args: argparse.Namespace) -> str:
    rows, stats = summarize(results)
    md = write_markdown(rows, stats, args, det)
    payload = {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "summary": stats,
               "results": results, "detection": det, "machine_at_end": machine()}
    write_results(args.name, payload, md)
    return md


if __name__ == "__main__":
    main(get_args_parser().parse_args())
