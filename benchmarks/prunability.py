"""Prunability sweep: can ``orthoreg_tp.adapters.prune`` prune every timm family and torchvision model?

One smallest model per timm model module (by parameter count, counted on the meta device), every torchvision
classification model, and the detection/segmentation models of torch-pruning's torchvision example (plus
RAFT), each pruned at one ratio in its own subprocess under a memory limit (address space above the
post-import baseline, ``RLIMIT_AS``) and a wall-clock timeout, so no model can take the machine down.

Per model the worker creates the model with random weights, finds the smallest input size it accepts from a
short list (passing ``img_size`` to timm models that take it), accumulates OrthoReg's importance on one
random batch, and calls ``prune``. It records status, seconds (accumulation, prune, total; wall and CPU),
peak RSS, params/MACs before and after, automatically frozen blocks and the adapter's unhandled layers.

Usage:
    python benchmarks/prunability.py --suite timm torchvision
    python benchmarks/prunability.py --suite timm --only vit resnet   # re-run some, merged into the JSON
    python benchmarks/prunability.py --suite timm --importance magnitude --name prunability_magnitude --fresh
    python benchmarks/prunability.py --suite transformers --name prunability_transformers --fresh
    python benchmarks/prunability.py --suite smp --name prunability_smp --fresh
    python benchmarks/prunability.py --suite ultralytics --name prunability_ultralytics --fresh --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES_PATH = RESULTS / "prunability.families.json"
SIZES = (64, 96, 128, 160, 192, 224, 256)

# torchvision models outside torchvision.models.list_models(module=torchvision.models) that the sweep covers:
# those of torch-pruning's torchvision example (detection, segmentation) and RAFT.
TV_DETECTION = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "keypointrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn_v2",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
)
TV_SEGMENTATION = (
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
)
TV_FLOW = ("raft_small", "raft_large")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("sweep")
    group.add_argument("--suite", nargs="+", default=["timm", "torchvision"],
                       choices=["timm", "torchvision", "transformers", "smp", "ultralytics"])
    group.add_argument("--only", nargs="*", default=None, help="substrings of family/model names to (re)run")
    group.add_argument("--ratio", type=float, default=0.5, help="torch-pruning pruning_ratio")
    group.add_argument("--importance", default="orthoreg", choices=["orthoreg", "magnitude"])
    group.add_argument("--ranking", default="global", choices=["global", "per-layer"],
                       help="rank channels of all layers together (prune's default) or per layer")
    group.add_argument("--limit-s", type=float, default=10.0, help="time budget a model must prune within")
    group.add_argument("--mem-gb", type=float, default=4.0, help="memory budget above the import baseline")
    group.add_argument("--timeout-s", type=float, default=240.0, help="hard wall-clock kill per model")
    group.add_argument("--threads", type=int, default=2)
    group.add_argument("--fresh", action="store_true", help="drop earlier results instead of merging")
    group.add_argument("--name", default="prunability", help="results file stem under benchmarks/results/")
    worker = parser.add_argument_group("worker (internal)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--lib", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--model", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--family", default=None, help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------------------------- model lists
def timm_families(refresh: bool = False) -> dict[str, str]:
    """``{timm model module: its smallest model}``, cached in ``prunability.families.json``."""
    if FAMILIES_PATH.exists() and not refresh:
        return json.loads(FAMILIES_PATH.read_text())["families"]
    import timm
    import torch
    from timm.models import _registry

    families: dict[str, str] = {}
    for module in sorted(_registry._module_to_models):
        best: tuple[int, str] | None = None
        for name in sorted(_registry._module_to_models[module]):
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
            except Exception:
                continue
            count = sum(p.numel() for p in model.parameters())
            if best is None or count < best[0]:
                best = (count, name)
        if best is not None:
            families[module] = best[1]
    RESULTS.mkdir(parents=True, exist_ok=True)
    FAMILIES_PATH.write_text(json.dumps({"timm": timm.__version__, "families": families}, indent=1) + "\n")
    return families


def torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models)) + list(
        TV_DETECTION + TV_SEGMENTATION + TV_FLOW
    )


# Hugging Face transformers vision models, random weights from small configs: {name: (class, config class, kwargs)}
_HF_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
HF_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "vit": ("ViTForImageClassification", "ViTConfig", {**_HF_SMALL, "intermediate_size": 128}),
    "deit": ("DeiTForImageClassification", "DeiTConfig", {**_HF_SMALL, "intermediate_size": 128}),
    "dinov2": ("Dinov2Model", "Dinov2Config", {**_HF_SMALL, "mlp_ratio": 2}),
    "dinov2-classifier": ("Dinov2ForImageClassification", "Dinov2Config", {**_HF_SMALL, "mlp_ratio": 2}),
    "swin": ("SwinForImageClassification", "SwinConfig", {"image_size": 32, "patch_size": 4, "embed_dim": 16,
                                                         "depths": [1, 1], "num_heads": [2, 4], "window_size": 4}),
}
# segmentation_models_pytorch architectures x encoders, random weights (encoder_weights=None)
SMP_MODELS = tuple(f"{arch}:{enc}" for arch in ("Unet", "FPN", "DeepLabV3Plus")
                   for enc in ("resnet18", "mobilenet_v2", "efficientnet-b0"))
# Ultralytics task models built from their YAML (random weights, nothing downloaded): YOLO(name).model, and
# RTDETR(name).model for RT-DETR (its backbone and encoder convolutions pruned, the decoder kept)
YOLO_MODELS = ("yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-cls.yaml", "yolo11n.yaml",
               "yolo11n-seg.yaml", "yolo11n-pose.yaml", "yolo11n-cls.yaml", "yolo11n-obb.yaml",
               "yolov5nu.yaml", "yolov9t.yaml", "yolov10n.yaml", "yolo12n.yaml", "yolo26n.yaml", "yolo26n-seg.yaml",
               "yolo26n-pose.yaml", "rtdetr-l.yaml")
YOLO_TASKS = ("seg", "pose", "cls", "obb")


def _hf_model(name: str) -> tuple[Any, Any]:
    import torch
    import transformers

    cls, config_cls, kwargs = HF_MODELS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, cls)(config).eval()
    return model, torch.randn(1, 3, config.image_size, config.image_size)


def _smp_model(name: str) -> tuple[Any, Any]:
    import segmentation_models_pytorch as smp
    import torch

    arch, encoder = name.split(":")
    model = getattr(smp, arch)(encoder, encoder_weights=None, classes=3).eval()
    return model, torch.randn(1, 3, 64, 64)


def _yolo_model(name: str) -> tuple[Any, Any]:
    import torch
    import ultralytics

    wrapper = ultralytics.RTDETR if name.startswith("rtdetr") else ultralytics.YOLO
    model = wrapper(name).model.eval()
    return model, torch.randn(1, 3, 64, 64)


def _build(lib: str, name: str) -> tuple[Any, Any]:
    builders = {"timm": _timm_model, "torchvision": _torchvision_model, "transformers": _hf_model, "smp": _smp_model,
                "ultralytics": _yolo_model}
    return builders[lib](name)


# ----------------------------------------------------------------------------------------------- worker
def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fits(model: Any, x: Any) -> bool:
    import torch

    try:
        with torch.no_grad():
            out = model(x)
        return bool(torch.isfinite(out).all())
    except Exception:
        return False


def _timm_model(name: str) -> tuple[Any, Any]:
    """The model with random weights at the smallest input size it accepts (``img_size`` passed if taken)."""
    import inspect

    import timm
    import torch

    default = timm.create_model(name, pretrained=False).eval()
    channels, full = default.pretrained_cfg.get("input_size", (3, 224, 224))[0], default.pretrained_cfg.get(
        "input_size", (3, 224, 224)
    )[-1]
    sizes = [s for s in SIZES if s < full]
    for size in sizes:  # models that take any input size
        x = torch.randn(1, channels, size, size)
        if _fits(default, x):
            return default, x
    if "img_size" in inspect.signature(type(default).__init__).parameters:
        for size in sizes:  # models built for one size: build them for a smaller one
            try:
                model = timm.create_model(name, pretrained=False, img_size=size).eval()
            except Exception:
                continue
            x = torch.randn(1, channels, size, size)
            if _fits(model, x):
                return model, x
    return default, torch.randn(1, channels, full, full)


def _torchvision_model(name: str) -> tuple[Any, Any]:
    import torch
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None}
    if name in TV_DETECTION or name in TV_SEGMENTATION:
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    if name in TV_SEGMENTATION:
        kwargs["aux_loss"] = False
    if name in TV_DETECTION:
        model = builder(**kwargs).eval()
        return model, [[torch.rand(3, 320, 320)]]
    if name in TV_FLOW:
        model = builder(**kwargs).eval()
        return model, (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
    for size in (64, 96, 128, 160, 224, 299):
        try:
            extra = {"image_size": size} if name.startswith("vit_") else {}
            model = builder(**kwargs, **extra).eval()
            x = torch.randn(1, 3, size, size)
            with torch.no_grad():
                model(x)
            return model, x
        except Exception:
            continue
    raise RuntimeError(f"no input size runs through {name}")


def _loss(output: Any, target: Any) -> Any:
    import torch.nn.functional as F

    from orthoreg_tp._inputs import flatten_tensors

    tensors = [t for t in flatten_tensors(output) if t.is_floating_point() and t.requires_grad]
    if len(tensors) == 1 and tensors[0].dim() == 2:
        return F.cross_entropy(tensors[0], target % tensors[0].shape[1])
    return sum(t.float().mean() for t in tensors)  # a stand-in loss for dense/detection outputs


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch_pruning as tp
    from orthoreg_tp.adapters import prune

    from orthoreg_tp import OrthoRegImportance
    from orthoreg_tp._inputs import run_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    limit = _vm_bytes() + int(args.mem_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    record: dict[str, Any] = {"lib": args.lib, "family": args.family, "model": args.model}
    start_wall, start_cpu = time.perf_counter(), _cpu_s()
    try:
        model, x = _build(args.lib, args.model)
        record["input"] = list(x.shape) if isinstance(x, torch.Tensor) else "list"
        record["create_s"] = round(time.perf_counter() - start_wall, 2)
        record["params_before"] = sum(p.numel() for p in model.parameters())
        t0, c0 = time.perf_counter(), _cpu_s()
        record["importance"] = args.importance
        imp = None
        if args.importance == "orthoreg":
            model.zero_grad(set_to_none=True)
            # YOLO computes its loss in training mode, where every head branch runs (YOLO26-seg's semantic
            # branch only then); RT-DETR's training forward needs targets
            model.train(args.lib == "ultralytics" and not args.model.startswith("rtdetr"))
            loss = _loss(run_model(model, x), torch.randint(0, 1000, (1,)))
            model.eval()
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                imp = OrthoRegImportance()
                loss.backward()
                imp.accumulate_grad(model, num_samples=1, consume=True)  # no second copy of the gradients
            else:  # e.g. a detector that returned no boxes: nothing to differentiate
                record["importance"] = "magnitude (no differentiable output)"
            model.zero_grad(set_to_none=True)
        if imp is None:
            imp = tp.importance.GroupMagnitudeImportance()
        t1, c1 = time.perf_counter(), _cpu_s()
        report = prune(model, x, importance=imp, ratio=args.ratio, global_ranking=args.ranking == "global")
        t2, c2 = time.perf_counter(), _cpu_s()
        record.update(
            status="ok" if report.params_fraction < 0.95 else "no-op",
            accumulate_s=round(t1 - t0, 2),
            prune_s=round(t2 - t1, 2),
            total_s=round(t2 - t0, 2),
            prune_cpu_s=round(c2 - c1, 2),
            total_cpu_s=round(c2 - c0, 2),
            params_before=report.params_before,
            params_after=report.params_after,
            macs_before=report.macs_before,
            macs_after=report.macs_after,
            frozen=list(report.frozen),
            unhandled=report.spec.get("unhandled", []),
        )
    except MemoryError:
        record.update(status="memory", error=f"MemoryError above {args.mem_gb} GB")
    except Exception as exc:
        record.update(status="fail", error=f"{type(exc).__name__}: {exc}"[:600], trace=traceback.format_exc()[-1500:])
    record["peak_rss_gb"] = round(_rss_gb(), 2)
    record["wall_s"] = round(time.perf_counter() - start_wall, 2)
    record["cpu_s"] = round(_cpu_s() - start_cpu, 2)
    return record


# ----------------------------------------------------------------------------------------------- parent
def _run_child(args: argparse.Namespace, lib: str, family: str, model: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--lib", lib, "--family", family, "--model", model,
           "--ratio", str(args.ratio), "--importance", args.importance, "--ranking", args.ranking,
           "--mem-gb", str(args.mem_gb),
           "--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"lib": lib, "family": family, "model": model, "status": "timeout",
                "error": f"killed after {args.timeout_s:.0f} s", "wall_s": round(time.perf_counter() - start, 1)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    status = "memory" if proc.returncode in (-9, 137) or "MemoryError" in proc.stderr else "crash"
    return {"lib": lib, "family": family, "model": model, "status": status,
            "error": f"exit code {proc.returncode}: {proc.stderr.strip()[-400:]}",
            "wall_s": round(time.perf_counter() - start, 1)}


def _passes(rec: dict[str, Any], limit_s: float) -> bool:
    return rec.get("status") == "ok" and rec.get("total_s", 1e9) <= limit_s


def _failure(rec: dict[str, Any]) -> str:
    size = f", {rec['params_before'] / 1e6:.1f}M params" if rec.get("params_before") else ""
    return f"`{rec['model']}` ({rec['status']}{size})"


def _removed(rec: dict[str, Any]) -> str:
    """Parameters removed, as a count and a share (shallow pruning shows as a small share)."""
    if rec.get("params_after") is None or not rec.get("params_before"):
        return ""
    gone = rec["params_before"] - rec["params_after"]
    return f"{gone / 1e6:.2f}M ({gone / rec['params_before']:.0%})"


def _extra_jobs(suites: list[str]) -> list[tuple[str, str, str]]:
    """Jobs of the optional-library suites (transformers, smp, ultralytics)."""
    jobs: list[tuple[str, str, str]] = []
    if "transformers" in suites:
        jobs += [("transformers", name.split("-")[0], name) for name in HF_MODELS]
    if "smp" in suites:
        jobs += [("smp", name.split(":")[0], name) for name in SMP_MODELS]
    if "ultralytics" in suites:  # family: the task (detect, seg, pose, cls, obb)
        jobs += [("ultralytics", _yolo_task(name), name) for name in YOLO_MODELS]
    return jobs


def _yolo_task(name: str) -> str:
    suffix = name.removesuffix(".yaml").split("-")[-1]
    return suffix if suffix in YOLO_TASKS else "detect"


def write_markdown(records: list[dict[str, Any]], meta: dict[str, Any], limit_s: float) -> str:
    lines = [f"Command: `{meta['command']}`  "]
    lines += [f"Re-run since, merged in: `{cmd}`  " for cmd in meta.get("reruns", [])]
    lines += [f"Machine: {meta['machine']}  ", f"Versions: {meta['versions']}  ", ""]
    for lib in ("timm", "torchvision", "transformers", "smp", "ultralytics"):
        rows = [r for r in records if r["lib"] == lib]
        if not rows:
            continue
        ok = sum(r.get("status") == "ok" for r in rows)
        clean = sum(r.get("status") == "ok" and not r.get("frozen") for r in rows)
        fast = sum(_passes(r, limit_s) for r in rows)
        unit = "families" if lib == "timm" else "models"
        lines.append(f"**{lib}**: {ok}/{len(rows)} {unit} pruned and verified ({ok / len(rows):.0%}), "
                     f"{clean} of them without any block frozen by the repair loop; {fast}/{len(rows)} within "
                     f"{limit_s:.0f} s (accumulate + prune).  ")
        failed = [_failure(r) for r in rows if r.get("status") != "ok"]
        repaired = [f"`{r['model']}` ({len(r['frozen'])})" for r in rows if r.get("status") == "ok" and r.get("frozen")]
        slow = [f"`{r['model']}` ({r.get('total_s')} s)" for r in rows
                if r.get("status") == "ok" and r.get("total_s", 0) > limit_s]
        for label, items in (("not pruned", failed), ("pruned after freezing blocks (count)", repaired),
                             (f"over {limit_s:.0f} s", slow)):
            if items:
                lines.append(f"- {lib} {label}: {', '.join(items)}  ")
    lines += ["", f"<details><summary>Per-model table ({len(records)} models)</summary>", "",
              "| lib | family | model | input | status | params kept | params removed | MACs kept | accumulate+prune s "
              "| CPU s | peak RSS GB | frozen / error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["lib"], r.get("family") or "", r["model"])):
        note = "; ".join(r.get("frozen", []))[:160] or (r.get("error") or "")[:160]
        note = note.replace("|", "/").replace("\n", " ")
        kept = f"{r['params_after'] / r['params_before']:.0%}" if r.get("params_after") is not None else ""
        macs = f"{r['macs_after'] / r['macs_before']:.0%}" if r.get("macs_after") is not None else ""
        removed = _removed(r)
        shape = "x".join(map(str, r["input"][2:])) if isinstance(r.get("input"), list) else r.get("input", "")
        lines.append(f"| {r['lib']} | {r.get('family') or ''} | {r['model']} | {shape} | {r['status']} | {kept} "
                     f"| {removed} "
                     f"| {macs} | {r.get('total_s', '')} | {r.get('total_cpu_s', '')} | {r.get('peak_rss_gb', '')} "
                     f"| {note} |")
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    if args.worker:
        record = run_worker(args)
        sys.stdout.flush()
        print(json.dumps(record), flush=True)
        return
    import platform
    from importlib.metadata import version

    import timm
    import torch
    import torch_pruning  # noqa: F401
    import torchvision

    jobs: list[tuple[str, str, str]] = []
    if "timm" in args.suite:
        jobs += [("timm", fam, name) for fam, name in timm_families().items()]
    if "torchvision" in args.suite:
        jobs += [("torchvision", "", name) for name in torchvision_models()]
    jobs += _extra_jobs(args.suite)
    if args.only:
        jobs = [j for j in jobs if any(s in j[1] or s in j[2] for s in args.only)]
    old: list[dict[str, Any]] = []
    old_meta: dict[str, Any] = {}
    json_path, md_path = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.md"
    if json_path.exists() and not args.fresh:
        saved = json.loads(json_path.read_text())
        old, old_meta = saved["records"], saved.get("meta", {})
    keep = [r for r in old if (r["lib"], r["model"]) not in {(j[0], j[2]) for j in jobs}]
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    meta = {
        "command": "python benchmarks/prunability.py " + " ".join(sys.argv[1:]),
        "machine": f"{cpu}, {os.cpu_count()} cores, {args.threads} torch threads, load average at start "
                   f"{os.getloadavg()[0]:.1f}",
        "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
                    f"torch-pruning {version('torch-pruning')}" + _extra_versions(args.suite),
        "ratio": args.ratio, "importance": args.importance, "ranking": args.ranking,
        "limit_s": args.limit_s, "mem_gb": args.mem_gb,
    }
    if old and old_meta.get("command"):  # a partial re-run merged into an earlier sweep: say so
        meta["reruns"] = [*old_meta.get("reruns", []), meta["command"]]
        meta["command"] = old_meta["command"]
    records = list(keep)
    for i, (lib, fam, name) in enumerate(jobs):
        rec = _run_child(args, lib, fam, name)
        rec["load_average"] = round(os.getloadavg()[0], 1)
        records.append(rec)
        print(f"[{i + 1}/{len(jobs)}] {lib} {fam} {name}: {rec['status']} "
              f"{rec.get('total_s', '')} s {rec.get('error', '')[:200]}", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
        md_path.write_text(write_markdown(records, meta, args.limit_s))
    print(f"results: {json_path} and {md_path}", flush=True)


def _extra_versions(suites: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = ""
    for suite, package in (("transformers", "transformers"), ("smp", "segmentation-models-pytorch"),
                           ("ultralytics", "ultralytics")):
        if suite in suites:
            with contextlib.suppress(PackageNotFoundError):
                out += f", {package} {version(package)}"
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
