"""What pruning buys: measured latency of pruned models vs. their MACs reduction, and ONNX export.

Each model (random weights, BatchNorm statistics calibrated on random data, CIFAR-sized inputs) is pruned one-shot
from dense by 30/50/70% of its channels with OrthoReg's importance (ranked globally, 5% per-layer floor; scores
accumulated on random data, which only shapes *where* channels go). For each, the measured forward latency (median
of interleaved runs, ``inference_mode``) is compared with the MACs reduction: efficiency = latency reduction / MACs
reduction (goal >= 0.8). A second set is pruned with layer widths rounded to multiples of 16
(``prune_round_(round_to=16)``: torch-pruning's ``round_to`` with every layer keeping at least one multiple), which
CPU kernels prefer. The pruned models are exported to ONNX and run in onnxruntime, whose
outputs must match PyTorch's (skipped cleanly when ``onnx``/``onnxruntime`` are not installed:
``pip install orthoreg-tp[onnx]``).

    python benchmarks/speedup.py --threads 1            # CPU (and CUDA when available), ~4 min on 2 cores
    python benchmarks/speedup.py --models resnet56 --batch-sizes 1 --ratios 0.5
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import time
import warnings
from typing import Any

import torch
from _common import interleaved_times, machine_line, markdown_table, median, write_results
from torch import nn

from orthoreg_tp import layer_widths
from orthoreg_tp.engine.methods import build_importance, feed_importance_, get_method
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.engine.pruning import count_macs_params, prune_round_

GOAL = 0.8


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet56", "resnet34", "vgg13", "mobilenet_v1"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="fractions of channels removed")
    p.add_argument("--method", default="orthoreg", help="orthoreg_tp.engine.methods name ranking the channels")
    p.add_argument("--round-to", type=int, nargs="+", default=[1, 16],
                   help="also prune with layer widths rounded to these multiples (1: no rounding, the library path)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=30, help="timed forwards per model and batch size")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when unavailable")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--name", default="speedup")
    return p


@torch.no_grad()
def calibrate_bn_(model: nn.Module, batches: list) -> None:
    """Estimate BatchNorm statistics on ``batches`` (random-init statistics make deep nets' outputs constant)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for x, _ in batches:
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def prune_copies(name: str, args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    torch.manual_seed(0)
    dense = build_model(name, num_classes=args.num_classes)
    example = torch.randn(1, 3, args.image_size, args.image_size)
    data = [(torch.randn(32, 3, args.image_size, args.image_size), torch.randint(0, args.num_classes, (32,)))
            for _ in range(2)]
    calibrate_bn_(dense, data)
    method = get_method(args.method)
    models, info = {"dense": dense}, {}
    macs0, params0 = count_macs_params(dense, example)
    info["dense"] = {"macs": macs0, "params": params0, "channels_removed": 0.0}
    for round_to in args.round_to:
        for ratio in args.ratios:
            model = copy.deepcopy(dense)
            importance = build_importance(method, layer_widths(model))
            feed_importance_(method, importance, model, data, num_samples=64, progress=False)
            achieved = prune_round_(model, example, importance, ratio=ratio, round_to=round_to).channels_removed
            model.zero_grad(set_to_none=True)
            calibrate_bn_(model, data)  # downstream statistics changed with the removed channels
            macs, params = count_macs_params(model, example)
            key = f"{ratio:.0%}" + ("" if round_to == 1 else f" r{round_to}")
            models[key] = model
            info[key] = {"macs": macs, "params": params, "channels_removed": achieved, "round_to": round_to,
                         "macs_removed": 1 - macs / macs0, "params_removed": 1 - params / params0}
    return models, info


def latencies(models: dict[str, nn.Module], batch: int, device: torch.device, args: argparse.Namespace) -> dict:
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    moved = {k: m.to(device) for k, m in models.items()}

    def runner(m: nn.Module):
        def run() -> None:
            with torch.inference_mode():
                m(x)
        return run

    times = interleaved_times({k: runner(m) for k, m in moved.items()}, repeats=args.repeats, warmup=2,
                              device=device)
    for m in models.values():
        m.to("cpu")
    return {k: median(v) for k, v in times.items()}


def onnx_check(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Export to ONNX, run in onnxruntime, compare with PyTorch; ``{"skipped": reason}`` without the extras."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed: {', '.join(missing)} (pip install orthoreg-tp[onnx])"}
    import onnx
    import onnxruntime as ort

    x = torch.randn(4, 3, args.image_size, args.image_size)
    buffer = io.BytesIO()
    dynamo = importlib.util.find_spec("onnxscript") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["logits"], dynamo=dynamo,
                          dynamic_axes=None if dynamo else {"x": {0: "batch"}, "logits": {0: "batch"}})
    blob = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(blob))
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    diff = float((got - expected).abs().max())
    spread = float(expected.std(0).mean())  # outputs must vary with the input for the comparison to mean much
    start = time.perf_counter()
    for _ in range(args.repeats):
        session.run(None, {"x": x.numpy()})
    return {"exporter": "dynamo" if dynamo else "torchscript", "max_abs_diff": diff, "output_std": spread,
            "match": bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-4)),
            "ort_ms_batch4": (time.perf_counter() - start) / args.repeats * 1e3, "bytes": len(blob)}


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    start = time.perf_counter()
    results, rows, onnx_rows = [], [], []
    for name in args.models:
        models, info = prune_copies(name, args)
        entry: dict[str, Any] = {"model": name, "structure": info, "latency": {}, "onnx": {}}
        for device in devices:
            for batch in args.batch_sizes:
                lat = latencies(models, batch, device, args)
                entry["latency"][f"{device.type}/b{batch}"] = lat
                for key in models:
                    if key == "dense":
                        continue
                    macs_cut = info[key]["macs_removed"]
                    lat_cut = 1 - lat[key] / lat["dense"]
                    eff = lat_cut / macs_cut if macs_cut > 0 else float("nan")
                    rows.append([name, key, f"{info[key]['channels_removed']:.1%}", f"{macs_cut:.1%}",
                                 f"{info[key]['params_removed']:.1%}", device.type, batch,
                                 f"{lat['dense'] * 1e3:.1f}", f"{lat[key] * 1e3:.1f}", f"{lat_cut:.1%}", f"{eff:.2f}",
                                 "met" if eff >= GOAL else "missed"])
                print(f"{name} {device.type} batch {batch}: " + ", ".join(f"{k} {v * 1e3:.1f} ms"
                                                                          for k, v in lat.items()), flush=True)
        if not args.no_onnx:
            for key, model in models.items():
                if key != "dense":
                    check = onnx_check(model, args)
                    entry["onnx"][key] = check
                    onnx_rows.append([name, key, check.get("exporter", "-"),
                                      f"{check['max_abs_diff']:.1e}" if "max_abs_diff" in check else "-",
                                      f"{check['output_std']:.2f}" if "output_std" in check else "-",
                                      str(check.get("match", check.get("skipped"))),
                                      f"{check['ort_ms_batch4']:.1f}" if "ort_ms_batch4" in check else "-"])
        results.append(entry)
    wall = time.perf_counter() - start
    md = "\n\n".join([
        "### Speed-up of pruned models",
        f"Random-weight models (BatchNorm statistics calibrated on random data), inputs 3x{args.image_size}x"
        f"{args.image_size}, {args.num_classes} classes, {torch.get_num_threads()} CPU thread(s); channels "
        f"ranked by `{args.method}` globally (5% per-layer floor), pruned one-shot from dense (`rN`: layer widths "
        f"rounded to multiples of N with torch-pruning's `round_to`). Latency: median of "
        f"{args.repeats} interleaved forwards (`inference_mode`); efficiency = latency reduction / MACs reduction "
        f"(goal >= {GOAL}).",
        markdown_table(["model", "pruned", "channels removed", "MACs removed", "params removed", "device", "batch",
                        "dense ms", "pruned ms", "latency removed", "efficiency", f"goal >= {GOAL}"], rows),
    ])
    if onnx_rows:
        md += "\n\n### ONNX export of the pruned models (onnxruntime, CPU, batch 4)\n\n" + markdown_table(
            ["model", "pruned", "exporter", "max abs diff vs PyTorch", "output std over inputs", "outputs match (1e-4)",
             "onnxruntime ms"],
            onnx_rows)
    md += f"\n\nMachine: {machine_line()}. Wall time {wall / 60:.1f} min.\n"
    paths = write_results(args.name, {"config": vars(args), "wall_seconds": wall, "results": results}, md)
    print(md)
    print(f"wrote {paths[0]} and {paths[1]}")
    return {"results": results}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
