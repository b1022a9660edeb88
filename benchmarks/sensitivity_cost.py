"""What a group sensitivity analysis costs: the whole ``orthoreg_tp.analyze.sensitivity`` of a ResNet-18.

torchvision ResNet-18 (random weights, 10 classes) at 64x64, 4 batches of 32 random images, levels 25/50/75%,
the default importance (OrthoReg's Fisher score accumulated on the same batches). For each thread count, in a
fresh process each (so one run's warm caches do not help the next): wall and process CPU time of the whole call,
and the parts it is made of (importance accumulation, one evaluation of the batches, building the pruner).
Goal (issue 16): the whole analysis under two minutes on 2 cores.

    python benchmarks/sensitivity_cost.py                      # --threads 1,2, ~4 min on 2 (busy) cores
    python benchmarks/sensitivity_cost.py --threads 1 --no-prefix-cache --name sensitivity_cost_nocache
    python benchmarks/sensitivity_cost.py --device cuda --threads 1 --name sensitivity_cost_gpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch
from _common import machine, machine_line, markdown_table, resolve_device, sync, write_results

GOAL_SECONDS = 120.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet18", help="orthoreg_tp.engine.models.build_model name")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-batches", type=int, default=4)
    parser.add_argument("--levels", default="0.25,0.5,0.75")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, one process each")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="run every block in every trial (sensitivity(..., prefix_cache=False))")
    parser.add_argument("--name", default="sensitivity_cost", help="result files: benchmarks/results/NAME.{json,md}")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one measurement (internal)
    return parser


def _setup(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, list]:
    from orthoreg_tp.engine.models import build_model

    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10).to(device)
    g = torch.Generator().manual_seed(0)
    side = args.image_size
    batches = [(torch.randn(args.batch_size, 3, side, side, generator=g).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(device)) for _ in range(args.num_batches)]
    return model, batches[0][0][:1], batches


def _timed(fn: Any, device: torch.device) -> tuple[Any, float, float]:
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure_once(args: argparse.Namespace) -> dict[str, Any]:
    """One thread count, in this process: the parts, then the whole analysis on a fresh model."""
    import torch_pruning as tp
    from orthoreg_tp.adapters import build_pruner

    from orthoreg_tp import OrthoRegImportance
    from orthoreg_tp.analyze import measure, sensitivity
    from orthoreg_tp.importance import default_loss

    torch.set_num_threads(args.worker)
    device = resolve_device(args.device)
    levels = tuple(float(v) for v in args.levels.split(","))
    model, x, batches = _setup(args, device)
    model.eval()
    samples = args.batch_size * args.num_batches
    parts = {}
    imp = OrthoRegImportance()
    _, parts["accumulate_s"], _ = _timed(lambda: imp.accumulate(model, batches, samples, progress=False), device)
    _, parts["evaluate_s"], _ = _timed(lambda: measure(model, batches, default_loss), device)
    _, parts["build_pruner_s"], _ = _timed(
        lambda: build_pruner(model, x, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.0), device)
    model, x, batches = _setup(args, device)  # the whole analysis on a fresh model, as a user calls it
    result, wall, cpu = _timed(lambda: sensitivity(model, x, batches, levels=levels, num_batches=args.num_batches,
                                                   progress=False, prefix_cache=args.prefix_cache), device)
    trials = sum(r["status"] in ("ok", "failed") for r in result.rows)
    return {"threads": args.worker, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "groups": len({r["group"] for r in result.rows}), "trials": trials,
            "statuses": sorted({r["status"] for r in result.rows}), **{k: round(v, 3) for k, v in parts.items()},
            "load_average": machine().get("load_average")}


def main(args: argparse.Namespace) -> None:
    if args.worker is not None:
        print(json.dumps(measure_once(args)))
        return
    runs = []
    for threads in (int(t) for t in args.threads.split(",")):
        argv = [a for a in sys.argv[1:]]
        proc = subprocess.run([sys.executable, __file__, *argv, "--worker", str(threads)], capture_output=True,
                              text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    setting = (f"{args.model} at {args.image_size}x{args.image_size}, {args.num_batches} batches of "
               f"{args.batch_size}, levels {args.levels}, device {args.device}, prefix cache "
               f"{'on' if args.prefix_cache else 'off'}")
    rows = [[r["threads"], r["wall_s"], r["cpu_s"], r["groups"], r["trials"],
             round(r["wall_s"] / max(r["groups"] * len(args.levels.split(",")), 1), 2), r["accumulate_s"],
             r["evaluate_s"], r["build_pruner_s"], "yes" if r["wall_s"] < GOAL_SECONDS else "NO",
             f"{r['load_average'][0]:.1f}" if r.get("load_average") else "-"] for r in runs]
    table = markdown_table(["threads", "whole analysis (s, wall)", "CPU (s)", "groups", "trials",
                            "wall per trial (s)", "accumulate (s)", "one evaluation (s)", "build pruner (s)",
                            f"< {GOAL_SECONDS:.0f} s", "load avg"], rows)
    md = (f"# Sensitivity analysis cost\n\n{setting}.\n\nMachine: {machine_line()}.\n\nCommand: "
          f"`python benchmarks/sensitivity_cost.py {' '.join(sys.argv[1:])}`\n\n{table}\n\n"
          "The parts are timed separately in the same process before the whole call (the whole call accumulates "
          "the importance, evaluates the baseline once, builds the pruner once, then evaluates once per trial).\n")
    write_results(args.name, {"setting": setting, "goal_seconds": GOAL_SECONDS, "runs": runs}, md)
    print(md)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
