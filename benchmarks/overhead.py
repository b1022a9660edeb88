"""What OrthoReg costs: training-step overhead of the regularizer, importance-estimation time and memory.

1. Training step (forward, cross-entropy, backward, SGD step) without the regularizer, with the autograd
   ``penalty()`` added to the loss, with the analytic ``regularize()`` after ``backward()``, and with the
   previous release's ``regularize()`` (a copy kept here as the "before" reference); ratios of median step times
   measured interleaved in the same run, with process CPU time on CPU (goal <= 1.06x at batch 128), beside the
   FLOP floor (the regularizer's matrix products over the step's). Also timed: the library's lazy regularization
   ``OrthoRegularizer(every=k)`` (the gradient every k-th step, scaled by k).
2. ``OrthoRegImportance.accumulate`` vs. a plain forward+backward loop over the same samples (goal <= 1.10x).
3. Peak memory of both over one batch, N and 4N samples, each in a fresh process (CPU: heap in use from glibc's
   ``mallinfo2``, sampled; CUDA: the allocator's peak), against the parameter size (goal: O(parameters),
   independent of N).

    python benchmarks/overhead.py --threads 1          # CPU, batch 32, ~13 min on 2 (busy) cores
    python benchmarks/overhead.py --threads 1 --models resnet34 --batch-size 128 --sections steps --every-k \
        --no-penalty-step --name overhead_b128         # the paper's batch: 18 min on 2 busy cores
    python benchmarks/overhead.py --threads 1 --sections steps --every-k --no-penalty-step --name overhead_b32  # 8 min
    python benchmarks/overhead.py --device cuda --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import interleaved_times, machine_line, markdown_table, median, resolve_device, sync, write_results
from torch import Tensor, nn

from orthoreg_tp import OrthoRegImportance, OrthoRegularizer
from orthoreg_tp.engine.models import build_model
from orthoreg_tp.functional import filter_matrix, filter_matrix_grad_to_params, ortho_penalty_grad

MODELS = {  # name -> (build_model name, kwargs, coefficient: the paper's lambda)
    "resnet34": ("resnet34", {}, 1e-2),
    "vgg13": ("vgg13", {}, 1e-2),
    "mobilenet_v1": ("mobilenet_v1", {}, 1e-3),
    "vit_tiny": ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 1e-2),
}
STEP_GOAL, IMPORTANCE_GOAL = 1.06, 1.10  # step: at batch 128 (issue 15; the FLOP floor rises at smaller batches)
CLOCKS = {"process": time.process_time, "wall": time.perf_counter}


def clock(args: argparse.Namespace) -> str:
    """``process`` (this process's CPU time: steadier on shared cores) on CPU, ``wall`` on GPUs (asynchronous)."""
    if args.clock != "auto":
        return args.clock
    return "wall" if resolve_device(args.device).type == "cuda" else "process"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32, help="CIFAR-sized inputs (ViT: 4x4 patches, 64 tokens)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (after one warm-up)")
    p.add_argument("--every-k", type=int, nargs="*", default=[4, 10],
                   help="OrthoRegularizer(every=k) periods (none: --every-k with no value)")
    p.add_argument("--clock", default="auto", choices=["auto", "process", "wall"],
                   help="step timer: process CPU time (auto on CPU) or wall time (auto on CUDA)")
    p.add_argument("--extrapolate-batch", type=int, default=128, help="report the step ratio extrapolated here")
    p.add_argument("--penalty-step", action=argparse.BooleanOptionalAction, default=True,
                   help="also time steps with the autograd penalty() in the loss")
    p.add_argument("--importance-batches", type=int, default=2, help="N = batches x batch size samples")
    p.add_argument("--sections", nargs="+", default=["steps", "importance", "memory"],
                   choices=["steps", "importance", "memory"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--name", default="overhead")
    p.add_argument("--memory-child", nargs=3, metavar=("MODEL", "MODE", "BATCHES"), help=argparse.SUPPRESS)
    return p


def make(name: str, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Tensor, Tensor, float]:
    arch, kwargs, coefficient = MODELS[name]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=args.num_classes, **kwargs).to(device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    return model, x, y, coefficient


# ------------------------------------------------------------------------------------------------ reference
@torch.no_grad()
def regularize_before(reg: OrthoRegularizer) -> None:
    """``OrthoRegularizer.regularize`` as it was before the cheaper step (the "before" row): per layer, the filter
    matrix (a copy with a concatenated bias column), its Gram, the gradient of the blocks, scaled, mapped back and
    added to ``.grad``."""
    alphas = reg.weights()
    for name, m in reg.layers:
        bias = m.bias.detach() if reg.include_bias and m.bias is not None else None
        groups, transposed = getattr(m, "groups", 1), bool(getattr(m, "transposed", False))
        blocks = filter_matrix(m.weight.detach(), bias, groups=groups, transposed=transposed)
        grad_blocks = ortho_penalty_grad(blocks, reg.norm) * (reg.coefficient * reg.every * alphas[name])
        gw, gb = filter_matrix_grad_to_params(grad_blocks, m.weight.shape, has_bias=bias is not None, groups=groups,
                                              transposed=transposed)
        _add(m.weight, gw)
        if bias is not None:
            _add(m.bias, gb)


def _add(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype).clone()
    else:
        param.grad.add_(grad.to(param.grad.dtype))


def _grads_after(model: nn.Module, fn) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    fn()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ 1. step time
def step_overhead(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, x, y, coefficient = make(name, args, device)
    model.train()
    reg = OrthoRegularizer(model, coefficient)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    # the library's regularize() computes the same gradient as the reference copy (relative max difference)
    after, before = _grads_after(model, reg.regularize), _grads_after(model, lambda: regularize_before(reg))
    max_diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before))

    def forward_backward() -> None:
        F.cross_entropy(model(x), y).backward()

    # FLOP floor: the matrix products of the reference regularizer (Grams and gradients) against those of a step
    # (the library's regularize() is not counted: FlopCounterMode skips the in-place addmm_ it accumulates with)
    flops = {"step": _flops(forward_backward), "regularize_before": _flops(lambda: regularize_before(reg))}
    model.zero_grad(set_to_none=True)

    def step(extra=None, penalty: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if penalty:
            loss = loss + reg.penalty()
        loss.backward()
        if extra is not None:
            extra()
        optimizer.step()

    def penalty_alone() -> None:
        reg.penalty().backward()

    def lazy_steps(k: int):
        lazy = OrthoRegularizer(model, coefficient, every=k)  # the library's lazy regularization

        def run() -> None:  # one timed call = k steps, so every call holds exactly one regularized step
            for _ in range(k):
                step(lazy.regularize)

        return run

    variants = {
        "plain": lambda: step(),
        **({"penalty": lambda: step(penalty=True)} if args.penalty_step else {}),
        "regularize_before": lambda: step(lambda: regularize_before(reg)),
        "regularize": lambda: step(reg.regularize),
        **{f"every{k}": lazy_steps(k) for k in args.every_k},
        "regularize_alone": reg.regularize,
        "regularize_before_alone": lambda: regularize_before(reg),
        "penalty_alone": penalty_alone,
    }
    times = interleaved_times(variants, repeats=args.repeats, warmup=1, device=device, clock=CLOCKS[clock(args)])
    for k in args.every_k:
        times[f"every{k}"] = [t / k for t in times[f"every{k}"]]
    med = {k: median(v) for k, v in times.items()}
    lazy_names = [f"every{k}" for k in args.every_k]
    plain = med["plain"]
    scale = args.extrapolate_batch / args.batch_size
    return {
        "model": name, "batch_size": args.batch_size, "input": [3, args.image_size, args.image_size],
        "clock": clock(args), "params": sum(p.numel() for p in model.parameters()),
        "regularized_layers": len(reg.layers), "coefficient": coefficient, "median_seconds": med, "times": times,
        "ratio": {v: med[v] / plain for v in ("penalty", "regularize_before", "regularize", *lazy_names) if v in med},
        "flops": flops, "flop_floor": 1 + flops["regularize_before"] / flops["step"],
        "max_relative_grad_diff": max_diff,
        # regularizer cost is independent of the batch; the rest of the step scales with it
        f"regularize_ratio_extrapolated_b{args.extrapolate_batch}": 1 + med["regularize_alone"] / (plain * scale),
        f"regularize_before_ratio_extrapolated_b{args.extrapolate_batch}":
            1 + med["regularize_before_alone"] / (plain * scale),
    }


# ------------------------------------------------------------------------------------------------ 2. importance
def importance_cost(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, x, y, _ = make(name, args, device)
    batches = [(x, y)] * args.importance_batches
    samples = args.batch_size * args.importance_batches
    params = [p for p in model.parameters() if p.requires_grad]
    imp = OrthoRegImportance(min_keep_ratio=None)

    def plain() -> None:
        model.eval()
        for xb, yb in batches:
            torch.autograd.grad(F.cross_entropy(model(xb), yb), params)
        model.train()

    def accumulate() -> None:
        imp.reset()
        imp.accumulate(model, batches, samples, progress=False)

    times = interleaved_times({"forward_backward": plain, "accumulate": accumulate}, repeats=max(2, args.repeats // 2),
                              warmup=1, device=device)
    med = {k: median(v) for k, v in times.items()}
    return {"model": name, "samples": samples, "median_seconds": med, "times": times,
            "ratio": med["accumulate"] / med["forward_backward"]}


# ------------------------------------------------------------------------------------------------ 3. memory
class HeapMeter:
    """Bytes in use on the heap (glibc ``mallinfo2``: torch's CPU tensors included) and their peak over a block.

    A sampling thread polls while the block runs (torch releases the GIL inside ops); CUDA uses the allocator's own
    statistics instead.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type != "cuda":
            import ctypes

            class Mallinfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                           "fsmblks", "uordblks", "fordblks", "keepcost")]

            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallinfo2.restype = Mallinfo2

    def in_use(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        info = self._libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def peak_during(self, fn) -> int:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        peak, done = [self.in_use()], threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], self.in_use())
                time.sleep(2e-4)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return max(peak[0], self.in_use())


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: heap peak of one mode over ``BATCHES`` batches, printed as JSON."""
    name, mode, nb = args.memory_child[0], args.memory_child[1], int(args.memory_child[2])
    device = resolve_device(args.device)
    model, x, y, _ = make(name, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    imp = OrthoRegImportance(min_keep_ratio=None)
    meter = HeapMeter(device)
    # warm-up: one forward+backward so lazy initialization is in the baseline of both modes
    torch.autograd.grad(F.cross_entropy(model.eval()(x), y), params)
    sync(device)
    before = meter.in_use()

    def run() -> None:
        batches = ((x, y) for _ in range(nb))
        if mode.startswith("accumulate"):
            imp.accumulate(model, batches, nb * args.batch_size, progress=False)
        else:
            for xb, yb in batches:
                torch.autograd.grad(F.cross_entropy(model(xb), yb), params)

    peak = meter.peak_during(run)
    sync(device)
    print(json.dumps({"before": before, "peak": peak, "retained": meter.in_use() - before,
                      "param_bytes": sum(p.numel() * p.element_size() for p in params)}))


def memory(name: str, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for mode in ("forward_backward", "accumulate"):
        for nb in (1, args.importance_batches, 4 * args.importance_batches):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name, mode, str(nb),
                   "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                   "--num-classes", str(args.num_classes), "--device", args.device,
                   *(["--threads", str(args.threads)] if args.threads else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"mode": mode, "samples": nb * args.batch_size, **r, "extra_peak": r["peak"] - r["before"]})
    return {"model": name, "rows": rows}


# ------------------------------------------------------------------------------------------------ main
def summarize(steps: list, imps: list, mems: list, args: argparse.Namespace, device: torch.device) -> str:
    b = args.extrapolate_batch
    step_rows = [_step_row(s, args) for s in steps]
    at_b = f"batch {b}" + ("" if args.batch_size == b else " (extrap.)")
    parts = [] if not steps else [
        "### Overhead of the regularizer (training step)",
        f"Batch {args.batch_size}, inputs 3x{args.image_size}x{args.image_size}, {args.num_classes} classes, "
        f"device {device.type}; median of {args.repeats} interleaved steps after one warm-up, timed with "
        f"{'process CPU time' if clock(args) == 'process' else 'wall time'}; ratio = step time / plain step time. "
        "Before = the regularizer of the previous release (a copy kept in this script). 1 + alone / plain = the "
        "regularizer timed alone over the plain step (steadier than the ratio of two noisy step times"
        + (")" if args.batch_size == b else f"; the rest of the step scaled linearly to batch {b}: the regularizer's "
           "cost does not depend on the batch)")
        + ". FLOP floor = 1 + the matrix products of the before-regularizer's Grams and gradients / those of the "
        "step's forward and backward (torch's FlopCounterMode).",
        markdown_table(["model", "params", "plain step ms", "penalty() ratio", "regularize() before ratio",
                        "regularize() ratio", "regularize() alone ms, before -> after",
                        f"1 + alone / plain @ {at_b}, before -> after", "FLOP floor",
                        *(f"regularize() every={k}" for k in args.every_k),
                        f"goal <= {STEP_GOAL}x at batch {b}"], step_rows),
    ]
    if imps:
        parts += ["### Importance estimation (`OrthoRegImportance.accumulate`) vs. forward+backward",
                  markdown_table(["model", "samples", "forward+backward s", "accumulate s", "ratio",
                                  f"goal <= {IMPORTANCE_GOAL}x"],
                                 [[i["model"], i["samples"], f"{i['median_seconds']['forward_backward']:.2f}",
                                   f"{i['median_seconds']['accumulate']:.2f}", f"{i['ratio']:.3f}",
                                   "met" if i["ratio"] <= IMPORTANCE_GOAL else "missed"] for i in imps])]
    if mems:
        rows = []
        samples = sorted({r["samples"] for r in mems[0]["rows"]})
        ns = " / ".join(str(n) for n in samples)
        for m in mems:
            by = {(r["mode"], r["samples"]): r for r in m["rows"]}
            pb = m["rows"][0]["param_bytes"]
            cells = [m["model"], f"{pb / 2**20:.0f}"]
            for mode in ("forward_backward", "accumulate"):
                cells.append(" / ".join(f"{by[(mode, n)]['extra_peak'] / 2**20:.0f}" for n in samples))
            diff = [(by[("accumulate", n)]["extra_peak"] - by[("forward_backward", n)]["extra_peak"]) / pb
                    for n in samples]
            cells.append(" / ".join(f"{d:.2f}" for d in diff))
            cells.append(" / ".join(f"{by[('accumulate', n)]['retained'] / pb:.2f}" for n in samples))
            rows.append(cells)
        parts += ["### Peak memory of importance estimation (fresh process per cell)",
                  f"Peak heap in use above the model, data and one warm-up backward already in memory (CPU: glibc "
                  f"`mallinfo2` sampled every 0.2 ms; CUDA: allocator peak), MiB, over N = {ns} samples (batch "
                  f"{args.batch_size}); then the differences in units of the parameter size.",
                  markdown_table(["model", "params MiB", f"fwd+bwd (N = {ns})", f"accumulate (N = {ns})",
                                  "accumulate - fwd+bwd peak, x params", "retained after accumulate, x params"],
                                 rows)]
    return "\n\n".join(parts)


def _step_row(s: dict[str, Any], args: argparse.Namespace) -> list[str]:
    b, med = args.extrapolate_batch, s["median_seconds"]
    return [
        s["model"], f"{s['params'] / 1e6:.1f}M", f"{med['plain'] * 1e3:.0f}",
        f"{s['ratio']['penalty']:.3f}" if "penalty" in s["ratio"] else "not run",
        f"{s['ratio']['regularize_before']:.3f}", f"{s['ratio']['regularize']:.3f}",
        " -> ".join(f"{med[k] * 1e3:.0f}" for k in ("regularize_before_alone", "regularize_alone")),
        " -> ".join(f"{s[f'regularize{v}_ratio_extrapolated_b{b}']:.3f}" for v in ("_before", "")),
        f"{s['flop_floor']:.3f}", *(f"{s['ratio'][f'every{k}']:.3f}" for k in args.every_k), _goal(s, args),
    ]


def _goal(s: dict[str, Any], args: argparse.Namespace) -> str:
    b = args.extrapolate_batch
    if args.batch_size == b:
        return "met" if s["ratio"]["regularize"] <= STEP_GOAL else "missed"
    return ("met" if s[f"regularize_ratio_extrapolated_b{b}"] <= STEP_GOAL else "missed") + " (extrap.)"


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return {}
    device = resolve_device(args.device)
    start = time.perf_counter()
    steps, imps, mems = [], [], []
    for name in args.models:
        if "steps" in args.sections:
            steps.append(step_overhead(name, args, device))
            print(f"{name}: step ratios {steps[-1]['ratio']}", flush=True)
        if "importance" in args.sections:
            imps.append(importance_cost(name, args, device))
            print(f"{name}: importance ratio {imps[-1]['ratio']:.3f}", flush=True)
        if "memory" in args.sections:
            mems.append(memory(name, args))
    md = summarize(steps, imps, mems, args, device)
    wall = time.perf_counter() - start
    md += f"\n\nMachine: {machine_line()}. Wall time {wall / 60:.1f} min.\n"
    payload = {"config": vars(args), "wall_seconds": wall, "steps": steps, "importance": imps, "memory": mems}
    paths = write_results(args.name, payload, md)
    print(md)
    print(f"wrote {paths[0]} and {paths[1]}")
    return payload


if __name__ == "__main__":
    main(get_args_parser().parse_args())
