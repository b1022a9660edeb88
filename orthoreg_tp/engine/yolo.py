"""The ``orthoreg-tp yolo`` command: OrthoReg on an Ultralytics YOLO model, end to end.

Steps (each in ultralytics' own machinery; the run folder keeps every phase's ultralytics run):

1. **Regularized training** (``--epochs``): ultralytics' trainer for the model's task with the OrthoReg gradient
   added at every optimizer step (:func:`orthoreg_tp.integrations.ultralytics.orthoreg_trainer`), SGD, no
   weight decay. Saved as ``dense.pt``.
2. **Importance**: :class:`~orthoreg_tp.OrthoRegImportance` from ultralytics' own loss over
   ``--importance-batches`` training batches (no extra data).
3. **Prune** with :func:`orthoreg_tp.adapters.prune`: ``--prune-percent`` of the channels, or a budget
   (``--target-macs``, ``--target-params``, ``--target-latency``: the fraction of the dense model to keep).
4. **Fine-tune** (``--finetune-epochs``) with ultralytics' plain trainer (``--distill``: its knowledge
   distillation from ``dense.pt``, when the installed ultralytics has ``distill_model=``). Saved as
   ``pruned.pt``, a checkpoint ``YOLO("pruned.pt")`` loads, predicts with and exports.
5. **Validate** ``dense.pt`` and ``pruned.pt`` with ultralytics' validator; ``results.json``, a table and
   ``report.html`` (:func:`orthoreg_tp.engine.html_report.write_yolo_report`).

Example:
    >>> main(["yolo", "--model", "yolov8n.pt", "--data", "my.yaml", "--epochs", "50",
    ...       "--finetune-epochs", "50", "--prune-percent", "50", "--output-dir", "runs/yolo"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

YOLO_HELP = "OrthoReg on an Ultralytics YOLO model: regularized training, importance, prune, fine-tune, validate"
TARGETS = ("macs", "params", "latency")


@dataclass(frozen=True)
class YoloConfig:
    """The ``yolo`` command's options (``config.json`` of a run).

    Raises:
        ValueError: An option out of range, or more than one budget.

    Example:
        >>> YoloConfig(model="yolov8n.yaml", data="my.yaml", target_macs=0.5).target
        ('macs', 0.5)
    """

    model: str  # what YOLO() takes: a .pt checkpoint or a model .yaml
    data: str  # ultralytics dataset YAML
    imgsz: int = 640  # ultralytics' default
    epochs: int = 50  # regularized training; 0 prunes the given model as it is
    finetune_epochs: int = 50  # 0 saves the pruned model without fine-tuning
    prune_percent: float = 50.0  # % of the prunable channels removed (when no target is given)
    target_macs: float | None = None  # fraction of the dense MACs to keep, instead of prune_percent
    target_params: float | None = None  # fraction of the dense parameters to keep
    target_latency: float | None = None  # fraction of the dense latency (on --device, batch 1) to keep
    coefficient: float = 1e-2  # OrthoReg lambda (the paper's value for VGG/ResNet)
    importance_batches: int = 32  # training batches the importance averages (as the paper's recipes)
    batch: int = 16  # ultralytics' default batch size
    workers: int = 0  # dataloader workers (0: in-process, safe everywhere)
    device: str = "cpu"
    distill: bool = False  # fine-tune with ultralytics' distillation from the dense model
    finetune_optimizer: str = "auto"  # ultralytics' choice for the fine-tuning phase
    seed: int = 0  # a .yaml model's random weights and ultralytics' trainers (seed=)
    output_dir: str = "runs/yolo"

    def __post_init__(self) -> None:
        for name in ("imgsz", "batch", "importance_batches"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("epochs", "finetune_epochs", "workers"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not 0.0 < self.prune_percent < 100.0:
            raise ValueError(f"prune_percent must be in (0, 100), got {self.prune_percent!r}")
        if not float(self.coefficient) >= 0.0:
            raise ValueError(f"coefficient must be a non-negative number, got {self.coefficient!r}")
        given = [k for k in TARGETS if getattr(self, f"target_{k}") is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of --target-macs, --target-params, --target-latency, got {given}")
        for kind in given:
            value = getattr(self, f"target_{kind}")
            if not 0.0 < value < 1.0:
                raise ValueError(f"target_{kind} must be a fraction of the dense model in (0, 1), got {value!r}")

    @property
    def target(self) -> tuple[str, float] | None:
        """``(kind, fraction)`` for :func:`orthoreg_tp.adapters.prune`, or ``None`` (prune ``prune_percent``)."""
        for kind in TARGETS:
            if getattr(self, f"target_{kind}") is not None:
                return kind, float(getattr(self, f"target_{kind}"))
        return None

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> YoloConfig:
        """Build from a dict (unknown keys raise ``ValueError``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown yolo options {unknown}")
        return cls(**values)


# --------------------------------------------------------------------------- command line
def yolo_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``yolo`` subcommand's options.

    Example:
        >>> yolo_parser().parse_args(["--model", "yolov8n.pt", "--data", "my.yaml"]).prune_percent
        50.0
    """
    d = YoloConfig(model="", data="")
    if parser is None:
        parser = argparse.ArgumentParser(description=YOLO_HELP)
    parser.add_argument("--model", required=True, help="what YOLO() takes: a .pt checkpoint or a model .yaml")
    parser.add_argument("--data", required=True, help="ultralytics dataset YAML")
    parser.add_argument("--imgsz", type=int, default=d.imgsz)
    parser.add_argument("--epochs", type=int, default=d.epochs, help="regularized training epochs (0: none)")
    parser.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs, help="fine-tuning epochs (0: none)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--prune-percent", type=float, default=d.prune_percent, help="%% of channels removed")
    budget.add_argument("--target-macs", type=float, default=None, help="fraction of dense MACs to keep")
    budget.add_argument("--target-params", type=float, default=None, help="fraction of dense parameters to keep")
    budget.add_argument("--target-latency", type=float, default=None,
                        help="fraction of the dense latency to keep (timed on --device at batch 1)")
    parser.add_argument("--coefficient", type=float, default=d.coefficient, help="OrthoReg lambda (0: no regularizer)")
    parser.add_argument("--importance-batches", type=int, default=d.importance_batches,
                        help="training batches the importance averages")
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--device", default=d.device, help="ultralytics' device string: cpu, 0, ...")
    parser.add_argument("--distill", action="store_true",
                        help="fine-tune with ultralytics' distillation from the dense model (distill_model=)")
    parser.add_argument("--finetune-optimizer", default=d.finetune_optimizer,
                        help="ultralytics' optimizer for fine-tuning (auto, SGD, AdamW, ...)")
    parser.add_argument("--seed", type=int, default=d.seed, help="random weights of a .yaml model; trainers' seed")
    parser.add_argument("--output-dir", default=d.output_dir)
    parser.set_defaults(handler=run_yolo_args)
    return parser


def run_yolo_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``yolo`` handler: options -> :class:`YoloConfig` -> :func:`run_yolo`."""
    names = {f.name for f in dataclasses.fields(YoloConfig)}
    return run_yolo(YoloConfig(**{k: v for k, v in vars(args).items() if k in names}))


# --------------------------------------------------------------------------- the run
def run_yolo(config: YoloConfig) -> dict[str, Any]:
    """Regularized training, importance, prune, fine-tune and validation of a YOLO model (see the module doc).

    Returns:
        ``results.json``'s content.

    Raises:
        ValueError: Missing model or data file, ``--distill`` without ultralytics support, a bad option.
    """
    check_inputs(config)
    import ultralytics

    from ..integrations.ultralytics import check_module

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .records import atomic_write_json

    atomic_write_json(out / "config.json", config.to_dict())
    seconds: dict[str, float] = {}
    torch.manual_seed(config.seed)  # a .yaml model starts from random weights
    try:
        yolo = ultralytics.YOLO(config.model)
    except FileNotFoundError as err:
        raise ValueError(f"cannot load --model {config.model!r}: {err}") from None
    task, model = yolo.task, check_module(yolo.model)
    clock = time.perf_counter()
    model, trainer = regularized_training(model, config, task)
    seconds["regularize"] = time.perf_counter() - clock
    dense_path = save_yolo_checkpoint(model, out / "dense.pt", task=task, config=config)
    before = _measure(model, config, dense_path, "val_dense", seconds, "validate_before")
    clock = time.perf_counter()
    importance, used = yolo_importance(model, trainer, config.importance_batches)
    seconds["importance"] = time.perf_counter() - clock
    clock = time.perf_counter()
    report = _prune(model, importance, config)
    seconds["prune"] = time.perf_counter() - clock
    clock = time.perf_counter()
    model = finetune(model, config, task, teacher=dense_path)
    seconds["finetune"] = time.perf_counter() - clock
    pruned_path = save_yolo_checkpoint(model, out / "pruned.pt", task=task, config=config)
    after = _measure(model, config, pruned_path, "val_pruned", seconds, "validate_after")
    results = _results(config, task, before, after, report, used, seconds, dense_path, pruned_path)
    atomic_write_json(out / "results.json", results)
    from .html_report import try_write_yolo_report
    from .records import print_safely

    try_write_yolo_report(out, results)  # from results.json's content; a warning, never a failure
    print_safely(results_table(results))
    return results


def check_inputs(config: YoloConfig) -> None:
    """One-line errors for a missing model file, a missing data YAML, or ``--distill`` without support.

    Example:
        >>> check_inputs(YoloConfig(model="missing.pt", data="my.yaml"))
        Traceback (most recent call last):
        ...
        ValueError: model file not found: 'missing.pt' (--model takes a .pt checkpoint or a model .yaml)
    """
    model = Path(config.model)
    if model.suffix.lower() not in (".pt", ".yaml", ".yml"):
        raise ValueError(f"--model must be a .pt checkpoint or a model .yaml, got {config.model!r}")
    if model.suffix.lower() == ".pt" and not model.is_file():  # ultralytics would try to download it
        raise ValueError(f"model file not found: {config.model!r} (--model takes a .pt checkpoint or a model .yaml)")
    if not Path(config.data).exists():
        raise ValueError(f"data file not found: {config.data!r} (--data takes an ultralytics dataset YAML, or a "
                         "classification dataset's folder)")
    if importlib.util.find_spec("ultralytics") is None:
        raise ValueError('orthoreg-tp yolo needs ultralytics: pip install "orthoreg-tp[yolo]"')
    if config.distill and not distill_supported():
        from importlib.metadata import version

        raise ValueError(f"--distill needs an ultralytics with knowledge distillation (distill_model=); "
                         f"the installed {version('ultralytics')} has none")


def distill_supported() -> bool:
    """Whether the installed ultralytics trainers take ``distill_model=``."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return "distill_model" in DEFAULT_CFG_DICT


def _overrides(config: YoloConfig, name: str, **more: Any) -> dict[str, Any]:
    return dict(model=str(config.model), data=str(config.data), imgsz=config.imgsz, batch=config.batch,
                workers=config.workers, device=config.device, plots=False,
                project=str(Path(config.output_dir).resolve()), name=name, exist_ok=True, seed=config.seed, **more)


def regularized_training(model: nn.Module, config: YoloConfig, task: str) -> tuple[nn.Module, Any]:
    """Train ``config.epochs`` epochs with the OrthoReg trainer; returns (the saved best model, the trainer).

    With ``epochs=0`` no training runs: returns the model and a plain trainer over the data (for its loaders).
    A model whose class count differs from the data's is rebuilt for the data first, as ultralytics' own
    training does (its YAML with the data's ``nc``, the matching weights transferred).
    """
    from ..integrations.ultralytics import orthoreg_trainer, trainer_class

    if config.epochs == 0:
        trainer = trainer_class(task)(overrides=_overrides(config, "importance", epochs=1))
    else:
        trainer = orthoreg_trainer(task)(overrides=_overrides(config, "regularize", epochs=config.epochs),
                                         coefficient=config.coefficient)
    trainer.model = model = match_classes(model, trainer)
    if config.epochs == 0:
        return model, trainer
    trainer.train()
    return load_yolo_checkpoint(trainer.best if trainer.best.exists() else trainer.last), trainer


def match_classes(model: nn.Module, trainer: Any) -> nn.Module:
    """``model`` itself when it predicts the data's classes, else ultralytics' rebuild for them (``get_model``)."""
    nc = (getattr(model, "yaml", None) or {}).get("nc")
    if nc is None or nc == trainer.data["nc"]:
        return model
    return trainer.get_model(cfg=copy.deepcopy(model.yaml), weights=model, verbose=False)


def yolo_importance(model: nn.Module, trainer: Any, batches: int) -> tuple[Any, int]:
    """:class:`~orthoreg_tp.OrthoRegImportance` from ultralytics' loss over ``batches`` training batches.

    Returns:
        The accumulated importance and the number of batches it saw (fewer when the data has fewer).
    """
    from ..importance import OrthoRegImportance

    model.to(trainer.device)
    loader = trainer.get_dataloader(trainer.data["train"], batch_size=trainer.batch_size, rank=-1, mode="train")
    model.args, model.criterion = trainer.args, None  # the loss gains a trainer sets
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    importance, used = OrthoRegImportance(), 0
    model.train()
    for batch in loader:
        if used == batches:
            break
        batch = trainer.preprocess_batch(batch)
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(batch)
        n = batch["img"].shape[0]
        (loss.sum() / n).backward()
        importance.accumulate_grad(model, num_samples=n, consume=True)
        used += 1
    model.eval()
    model.criterion = None
    if hasattr(loader, "close"):
        loader.close()
    return importance, used


def _prune(model: nn.Module, importance: Any, config: YoloConfig) -> Any:
    from ..adapters import prune

    example = torch.randn(1, 3, config.imgsz, config.imgsz, device=next(model.parameters()).device)
    if config.target is not None:
        report = prune(model, example, importance=importance, target=config.target)
    else:
        report = prune(model, example, importance=importance, ratio=config.prune_percent / 100.0)
    return report  # the ultralytics adapter's fix-up already set each C2f block's split width for export


def finetune(model: nn.Module, config: YoloConfig, task: str, *, teacher: Path) -> nn.Module:
    """Fine-tune ``config.finetune_epochs`` epochs with ultralytics' own trainer; returns its saved best model."""
    if config.finetune_epochs == 0:
        return model
    from ..integrations.ultralytics import trainer_class

    more: dict[str, Any] = {"distill_model": str(teacher)} if config.distill else {}
    trainer = trainer_class(task)(overrides=_overrides(config, "finetune", epochs=config.finetune_epochs,
                                                       optimizer=config.finetune_optimizer, **more))
    trainer.model = model  # trained as it is, not rebuilt from its YAML
    trainer.train()
    return load_yolo_checkpoint(trainer.best if trainer.best.exists() else trainer.last)


# --------------------------------------------------------------------------- checkpoints and measurements
def load_yolo_checkpoint(path: str | Path) -> nn.Module:
    """The float32 module of an ultralytics checkpoint (the student of a distillation run), trainable."""
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(path))
    model = getattr(model, "student_model", model)
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    return model


def save_yolo_checkpoint(model: nn.Module, path: str | Path, *, task: str, config: YoloConfig) -> Path:
    """Save ``model`` in ultralytics' checkpoint format (``YOLO(path)`` loads, predicts and exports it).

    The module is pickled whole in half precision, as ultralytics saves ``best.pt``; nothing of orthoreg_tp is
    pickled, so the file loads wherever ultralytics is installed.
    """
    import ultralytics

    from .records import atomic_torch_save

    saved = copy.deepcopy(model).cpu().half().eval().requires_grad_(False)
    if hasattr(saved, "criterion"):
        saved.criterion = None
    args = {"task": task, "data": str(config.data), "imgsz": config.imgsz, "model": str(config.model)}
    saved.args = dict(args)
    atomic_torch_save({"model": saved, "train_args": args, "epoch": -1, "version": ultralytics.__version__,
                       "date": datetime.datetime.now().astimezone().isoformat()}, path)
    return Path(path)


def count_macs_params(model: nn.Module, imgsz: int) -> tuple[int, int]:
    """(MACs, parameters) at batch 1 and ``imgsz``, as ``torch_pruning.utils.count_ops_and_params`` counts them."""
    import torch_pruning as tp

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        device = next(model.parameters()).device
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, imgsz, imgsz, device=device))
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return int(macs), int(params)


def validate(path: Path, config: YoloConfig, name: str) -> dict[str, float]:
    """Ultralytics' validator on a saved checkpoint: its ``results_dict`` (mAP, precision, ... or top-1)."""
    import ultralytics

    metrics = ultralytics.YOLO(str(path)).val(**_overrides(config, name, verbose=False))
    return {k: float(v) for k, v in metrics.results_dict.items()}


def _measure(model: nn.Module, config: YoloConfig, path: Path, name: str, seconds: dict[str, float],
             key: str) -> dict[str, Any]:
    macs, params = count_macs_params(model, config.imgsz)
    clock = time.perf_counter()
    metrics = validate(path, config, name)
    seconds[key] = time.perf_counter() - clock
    return {"macs": macs, "params": params, "metrics": metrics}


def _results(config: YoloConfig, task: str, before: dict[str, Any], after: dict[str, Any], report: Any,
             used: int, seconds: dict[str, float], dense: Path, pruned: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"command": "yolo", "task": task}
    for stage, values in (("before", before), ("after", after)):
        m = values["metrics"]
        out[f"map50_95_{stage}"] = m.get("metrics/mAP50-95(B)")
        out[f"map50_{stage}"] = m.get("metrics/mAP50(B)")
        if "metrics/accuracy_top1" in m:  # classification
            out[f"top1_{stage}"] = m["metrics/accuracy_top1"]
        out[f"params_{stage}"] = values["params"]
        out[f"macs_{stage}"] = values["macs"]
        out[f"metrics_{stage}"] = m
    out.update(model_class=report.model_class, importance="OrthoRegImportance", prune_ratio=report.ratio,
               target=report.target, channels_removed=report.channels_removed, frozen=list(report.frozen),
               unused=list(report.unused), notes=list(report.spec.get("notes", ())), latency=report.latency,
               widths={k: list(v) for k, v in report.widths.items()}, importance_batches_used=used,
               seconds={k: round(v, 2) for k, v in seconds.items()}, dense_checkpoint=str(dense),
               pruned_checkpoint=str(pruned), dense_checkpoint_bytes=dense.stat().st_size,
               pruned_checkpoint_bytes=pruned.stat().st_size, config=config.to_dict())
    return out


def results_table(results: Mapping[str, Any]) -> str:
    """The before/after table printed at the end of a run (Markdown).

    Example:
        >>> print(results_table({"map50_95_before": 0.5, "map50_95_after": 0.25, "params_before": 10,
        ...                      "params_after": 5}))
        | metric | before | after |
        |---|---|---|
        | map50_95 | 0.5000 | 0.2500 |
        | params | 10 | 5 |
    """
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key in ("map50_95", "map50", "top1", "params", "macs"):
        if f"{key}_before" not in results:
            continue
        pair = [results.get(f"{key}_{s}") for s in ("before", "after")]
        rows.append(f"| {key} | " + " | ".join("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                                               for v in pair) + " |")
    return "\n".join(rows)
