"""The engine the recipes drive: data, model, training phases, pruning steps and records, all resumable.

A recipe is a straight-line sequence of *stages* (``train``, ``prune``, ``record_round``). Every stage ends
with an atomic checkpoint; training stages also checkpoint after every epoch. With ``--resume``, the recipe
runs the same sequence again: stages the checkpoint already holds are skipped, the interrupted one continues
from its last completed epoch, so ``results.json`` gets exactly the rows of an uninterrupted run.

A run starts from random weights, timm / torchvision pretrained weights (``pretrained``) or a checkpoint file
(``checkpoint``; see :mod:`orthoreg_tp.engine.weights`); the starting model's test accuracy is recorded as
``initial_test_acc`` before any training, and a trained start skips the ``base`` phase unless ``train_base``.
With ``distill``, the model as it was before the first prune is a frozen teacher for every later phase.
Under :func:`run_cli`, SIGINT / SIGTERM stop the run between file writes and print how to resume it.

Example:
    >>> with Experiment(RecipeConfig(output_dir="/tmp/demo").resolved()) as exp:  # doctest: +SKIP
    ...     exp.train("base")
    ...     exp.record_round(0, target=0.0)
    ...     exp.prune(ratio=0.5, round_index=1)
    ...     exp.train("retrain", round_index=1)
    ...     exp.record_round(1, target=0.5)
    ...     results = exp.finish()
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from .._inputs import latency_inputs
from ..adapters import replay
from ..latency import compare_latency
from ..metrics import layer_widths, mean_orthonormality
from ..regularizer import OrthoRegularizer, find_classifier
from .config import RecipeConfig
from .data import DataUnavailableError, build_datasets
from .distill import Teacher
from .distributed import (
    ShardSampler,
    barrier,
    broadcast_buffers_,
    check_same_on_all_ranks,
    cleanup_distributed,
    init_distributed,
    train_sampler,
    wrap_ddp,
)
from .export import ModelSpec, save_pruned
from .html_report import try_write_run_report
from .interrupts import RunInterrupted, stop_on_signals
from .methods import build_importance, feed_importance_, get_method
from .models import build_model
from .pruning import count_macs_params, prune_round_, save_pruned_model
from .records import (
    CheckpointError,
    RunRecord,
    check_writable_dir,
    plot_results,
    remove_stale_temporaries,
    safe_torch_load,
    summary_table,
)
from .training import build_optimizer, evaluate, scheduled_lr, set_lr, train_one_epoch
from .weights import build_pretrained_model, load_start_checkpoint_, model_from_state

logger = logging.getLogger(__name__)

# Fields that may differ between a run and its resumption (they do not change the results).
_RESUME_FREE = ("output_dir", "resume", "device", "progress", "workers", "threads")


class Experiment:
    """One recipe run: builds everything from a resolved :class:`~orthoreg_tp.engine.config.RecipeConfig`.

    Validation happens before anything is written: a bad option, missing data or an output folder that
    already holds a run (without ``resume``) raises and leaves no files behind.

    Args:
        cfg: A resolved config (:meth:`RecipeConfig.resolved`).

    Raises:
        ValueError: Bad options, or ``output_dir`` holds another run.
        DataUnavailableError: The dataset is not on disk and cannot be downloaded.
    """

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.record = RunRecord(cfg.output_dir)
        self._check_output_dir()
        resume_ckpt = self._read_checkpoint() if cfg.resume else None
        self.method = get_method(cfg.method)
        train_set, test_set, self.data_info = build_datasets(
            cfg.dataset, data_path=cfg.data_path, image_size=cfg.image_size, in_chans=cfg.in_chans,
            download=cfg.download)
        self._init_runtime()
        self._seed(0)
        self._build_loaders(train_set, test_set)
        start_history = self._init_model(resume_ckpt)
        self.state: dict[str, Any] = {"stages_done": 0, "epoch_in_stage": 0, "global_epoch": 0, "history": [],
                                      "remaining": 1.0, "rows": [], "last_prune": None, "extra": {}, "notes": {},
                                      "start_history": start_history}
        self._stage = 0
        self._optimizer_state: dict | None = None
        self._log_handler: logging.Handler | None = None
        self.teacher: Teacher | None = None  # with --distill: the model before the first prune, frozen
        self._start(resume_ckpt)
        self._open_record()

    def _check_output_dir(self) -> None:
        cfg = self.cfg
        if not cfg.resume and (self.record.checkpoint_path.exists() or self.record.results_path.exists()):
            raise ValueError(f"output dir {cfg.output_dir!r} already holds a run; pass --resume to continue it "
                             "or choose another --output-dir")
        check_writable_dir(cfg.output_dir)

    def _init_runtime(self) -> None:
        """Threads, the (distributed) device, AMP and the per-process batch."""
        cfg = self.cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.env = init_distributed(cfg.device)
        self.record.enabled = self.env.is_main
        self.device = self.env.device
        self.amp = cfg.amp and self.device.type == "cuda"
        if cfg.amp and not self.amp:
            logger.warning("--amp needs CUDA; training in float32 on %s", self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        if cfg.batch_size % self.env.world_size:
            raise ValueError(f"batch_size is the total over {self.env.world_size} processes and must divide "
                             f"evenly, got {cfg.batch_size!r}")
        self.latency_batch_size = cfg.batch_size // self.env.world_size  # latency is timed at the trained batch
        self._latency_reference: torch.nn.Module | None = None

    def _build_loaders(self, train_set: Any, test_set: Any) -> None:
        cfg, env, batch = self.cfg, self.env, self.latency_batch_size
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(train_set, batch_size=batch, num_workers=cfg.workers,
                                       sampler=train_sampler(train_set, env, seed=cfg.seed), pin_memory=pin)
        self.test_loader = DataLoader(test_set, batch_size=max(256, batch), num_workers=cfg.workers,
                                      sampler=ShardSampler(test_set, rank=env.rank, world_size=env.world_size),
                                      pin_memory=pin)

    def _init_model(self, resume_ckpt: dict | None) -> list:
        """The starting model, its dense cost and widths, and the importance; returns the start's history."""
        info = self.data_info
        self.example_inputs = torch.randn(1, info.in_chans, info.image_size, info.image_size, device=self.device)
        self.model, start_history = self._starting_model(resume_ckpt)
        self.dense_widths = layer_widths(self.model)
        self.dense_macs, self.dense_params = count_macs_params(self.model, self.example_inputs)
        head = find_classifier(self.model)
        self._head_names = {n for n, m in self.model.named_modules() if head is not None and m is head}
        self.importance = build_importance(self.method, self.dense_widths, seed=self.cfg.seed,
                                           normalizer=self.cfg.normalizer)
        return start_history

    def _start(self, resume_ckpt: dict | None) -> None:
        """Load the checkpoint, or evaluate the starting model before any training or file."""
        cfg = self.cfg
        if resume_ckpt is not None:
            self._load_checkpoint(resume_ckpt)
        else:
            if cfg.resume:
                logger.info("--resume: no checkpoint in %s, starting a new run", cfg.output_dir)
            self.notes["initial_test_acc"] = evaluate(self.model, self.test_loader, device=self.device,
                                                      amp=self.amp)["acc"]
            logger.info("starting model (%s): test accuracy %.2f", self._start_label(),
                        self.notes["initial_test_acc"])
        if cfg.resume and self.env.is_main:
            for stale in remove_stale_temporaries(cfg.output_dir):
                logger.info("--resume: removed %s, left by an interrupted write", stale)

    def _open_record(self) -> None:
        """The run folder's log file and config.json (main process only), then the run's one-line summary."""
        cfg, info = self.cfg, self.data_info
        if self.record.enabled:
            self.record.dir.mkdir(parents=True, exist_ok=True)
            self._log_handler = logging.FileHandler(self.record.dir / "log.txt")
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(self._log_handler)
            self.record.write_config({**cfg.to_dict(), "data": info.to_dict(), "world_size": self.env.world_size,
                                      "dense_params": self.dense_params, "dense_macs": self.dense_macs})
        logger.info("%s | %s on %s (%d classes, %dpx) | method %s | %d params, %.3g MACs | %s x%d",
                    cfg.recipe, cfg.model, cfg.dataset, info.num_classes, info.image_size, cfg.method,
                    self.dense_params, self.dense_macs, self.device, self.env.world_size)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Detach the log file and leave the process group."""
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        cleanup_distributed()

    @property
    def extra(self) -> dict[str, Any]:
        """Recipe state saved in every checkpoint (tensors and plain values)."""
        return self.state["extra"]

    @property
    def notes(self) -> dict[str, Any]:
        """JSON-serializable facts the recipe wants in ``results.json``."""
        return self.state["notes"]

    @property
    def remaining(self) -> float:
        """Fraction of the dense model's prunable channels still present."""
        return float(self.state["remaining"])

    def _seed(self, offset: int) -> None:
        value = self.cfg.seed * 1_000_003 + offset
        torch.manual_seed(value)
        random.seed(value)

    # ------------------------------------------------------------------ stages
    def _begin_stage(self) -> int | None:
        """``None`` if a resumed run already completed this stage, else the epoch to start it from."""
        index, self._stage = self._stage, self._stage + 1
        if index < self.state["stages_done"]:
            return None
        return self.state["epoch_in_stage"] if index == self.state["stages_done"] else 0

    def _end_stage(self) -> None:
        self.state["stages_done"] += 1
        self.state["epoch_in_stage"] = 0
        self._checkpoint(None)

    def train(self, phase: str, *, regularized: bool = False, round_index: int = 0,
              on_epoch_end: Callable[[int], bool] | None = None) -> None:
        """Train for a phase of the config's schedules (a stage).

        Args:
            phase: A phase name (``"base"``, ``"ortho"``, ``"retrain"``, ...).
            regularized: Add the OrthoReg gradient (weight decay 0).
            round_index: The pruning round, for the logs.
            on_epoch_end: ``fn(epoch) -> stop``, called after every epoch (early-bird detection).
        """
        if phase == "base" and self.cfg.trained_start and not self.cfg.train_base:
            logger.info("base: skipped, the run starts from trained weights (--train-base trains it anyway)")
            return
        start = self._begin_stage()
        if start is None:
            return
        cfg, sched = self.cfg, self.cfg.schedule(phase)

        def lr_at(epoch: int) -> float:
            return scheduled_lr(sched, epoch, shape=cfg.lr_schedule, warmup_epochs=cfg.warmup_epochs)

        reg = OrthoRegularizer(self.model, cfg.coefficient) if regularized else None
        optimizer = build_optimizer(self.model, lr=lr_at(start), momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, regularized=regularized,
                                    optimizer=cfg.optimizer)
        if start > 0 and self._optimizer_state is not None:
            optimizer.load_state_dict(self._optimizer_state)
        self._optimizer_state = None
        net = wrap_ddp(self.model, self.env)  # rebuilt per stage: pruning replaces the parameters
        total = sched.total_epochs
        for epoch in range(start, total):
            began = time.perf_counter()
            global_epoch = self.state["global_epoch"]
            self._seed(global_epoch)
            self.train_loader.sampler.set_epoch(global_epoch)
            set_lr(optimizer, lr_at(epoch))
            stats = train_one_epoch(net, self.train_loader, optimizer, device=self.device, regularizer=reg,
                                    scaler=self.scaler, amp=self.amp, progress=self._progress,
                                    desc=f"{phase} {epoch + 1}/{total}", label_smoothing=cfg.label_smoothing,
                                    teacher=self.teacher)
            broadcast_buffers_(self.model)
            test = evaluate(self.model, self.test_loader, device=self.device, amp=self.amp)
            row = {"global_epoch": global_epoch, "stage": self._stage - 1, "phase": phase, "round": round_index,
                   "epoch": epoch, "lr": lr_at(epoch), "regularized": regularized,
                   "train_loss": stats["loss"], "train_acc": stats["acc"], "test_loss": test["loss"],
                   "test_acc": test["acc"], "penalty": _penalty(reg), "orthonormality": mean_orthonormality(
                       self.model), "params": sum(p.numel() for p in self.model.parameters()),
                   "distilled": self.teacher is not None}
            self.state["global_epoch"] += 1
            stop = bool(on_epoch_end(epoch)) if on_epoch_end is not None else False
            row["seconds"] = round(time.perf_counter() - began, 3)
            self.record.log_epoch(row)
            logger.info("%s %d/%d lr %g | loss %.4f acc %.2f | test %.2f%s", phase, epoch + 1, total, row["lr"],
                        stats["loss"], stats["acc"], test["acc"], "" if reg is None else
                        f" | penalty {row['penalty']:.4g}")
            if stop or epoch + 1 == total:
                break
            self.state["epoch_in_stage"] = epoch + 1
            self._checkpoint(optimizer)
        self._end_stage()

    def feed_importance(self) -> None:
        """Give the method's importance its data (dataset gradient etc.), identically on every rank.

        The samples depend only on the current stage, so repeated estimates within a stage (early-bird masks)
        see the same data and differ only through the weights.
        """
        tag = 1_000_000 + self._stage
        self._seed(tag)
        self.train_loader.sampler.set_epoch(tag)
        feed_importance_(self.method, self.importance, self.model, self.train_loader,
                         num_samples=self.cfg.importance_samples, world_size=self.env.world_size,
                         progress=self._progress)

    def prune(self, *, ratio: float | None = None, target_macs: float | None = None,
              target_latency: float | None = None, round_index: int) -> None:
        """Estimate importance and prune physically: a ratio of current channels, a MACs or a latency budget."""
        if self._begin_stage() is None:
            return
        if self.cfg.distill and self.teacher is None:  # the model as it was before the first prune
            self.teacher = Teacher(self.model, alpha=self.cfg.distill_alpha, temperature=self.cfg.distill_temperature)
        self.feed_importance()
        report = prune_round_(self.model, self.example_inputs, self.importance, ratio=ratio,
                              target_macs=target_macs, target_latency=target_latency,
                              latency_batch_size=self.latency_batch_size, round_to=self.cfg.round_to,
                              seed=self.cfg.seed + round_index)
        history = [list(e) for e in report.history]
        check_same_on_all_ranks(history, what=f"round {round_index}'s pruning")
        self.state["history"] += history
        self.state["remaining"] *= 1.0 - report.channels_removed
        after = evaluate(self.model, self.test_loader, device=self.device, amp=self.amp)
        requested = report.ratio if ratio is None else ratio
        self.state["last_prune"] = {"requested": requested, "applied": report.ratio,
                                    "achieved": report.channels_removed, "acc_after_prune": after["acc"]}
        if report.latency is not None:  # this round's own measurement (against the model before the round)
            self.state["last_prune"]["round_latency"] = report.latency
        logger.info("round %d: pruned %.2f%% of current channels (asked %.2f%%), %.2f%% of the dense model "
                    "gone; accuracy before retraining %.2f", round_index, 100 * report.channels_removed,
                    100 * requested, 100 * (1 - self.remaining), after["acc"])
        self._end_stage()

    def record_round(self, round_index: int, *, target: float | None, **extra: Any) -> None:
        """Evaluate the current model and add a row to ``results.json`` (a stage); save the pruned model."""
        if self._begin_stage() is None:
            return
        test = evaluate(self.model, self.test_loader, device=self.device, amp=self.amp)
        macs, params = count_macs_params(self.model, self.example_inputs)
        widths = layer_widths(self.model)
        body = [k for k in widths if k not in self._head_names]
        last = self.state["last_prune"] or {}
        row = {
            "round": round_index, "method": self.cfg.method,
            "target_pct": None if target is None else round(100 * target, 3),
            "pruned_pct": round(100 * (1 - self.remaining), 3),
            "filters_pruned_pct": round(100 * (1 - sum(widths[k] for k in body) /
                                                sum(self.dense_widths[k] for k in body)), 3),
            "params": params, "macs": macs, "params_pct": round(100 * params / self.dense_params, 3),
            "macs_pct": round(100 * macs / self.dense_macs, 3), "test_acc": test["acc"],
            "test_loss": test["loss"], "acc_after_prune": last.get("acc_after_prune"),
            "epochs": self.state["global_epoch"], **extra, **self._latency_columns(last), "widths": widths,
        }
        self.state["rows"].append(row)
        self.state["last_prune"] = None
        logger.info("round %d: %.2f%% pruned, %d params, %.3g MACs, test accuracy %.2f", round_index,
                    row["pruned_pct"], params, macs, test["acc"])
        if self.record.enabled:
            save_pruned_model(self.record.dir / f"model_round{round_index}.pt", self.model,
                              [*self.state["start_history"], *self.state["history"]],
                              {"model": self.cfg.model, "num_classes": self.data_info.num_classes,
                               "in_chans": self.data_info.in_chans, "image_size": self.data_info.image_size})
        self._write_results(complete=False)
        self._end_stage()

    def finish(self) -> dict[str, Any]:
        """Write ``model_final.safetensors`` (+ ``.json``), the final ``results.json`` and plot; return the results."""
        artifact = None
        if self.record.enabled and self.state["rows"]:  # the portable artifact of the final model
            info = self.data_info
            artifact = save_pruned(self.record.dir / "model_final", self.model,
                                   self.state["start_history"] + self.state["history"],
                                   ModelSpec(self.cfg.model, info.num_classes, info.in_chans, info.image_size),
                                   extra={"round": self.state["rows"][-1]["round"]})
            self.notes["final_model"] = artifact.name
        results = self._write_results(complete=True)
        if self.env.is_main and self.state["rows"]:
            print(f"\n{self.cfg.recipe}: {self.cfg.model} on {self.cfg.dataset}, method {self.cfg.method} "
                  f"(starting model: {self._start_label()}, test accuracy {self.notes.get('initial_test_acc', 0):.2f})"
                  f"\n{summary_table(results)}", flush=True)
            if artifact is not None:
                print(f"final model: {artifact} (+ {artifact.with_suffix('.json').name}; load it with "
                      "orthoreg_tp.load_pruned)", flush=True)
        barrier()
        return results

    @property
    def tracks_latency(self) -> bool:
        """Whether rows record measured latency (a latency budget or ``round_to="auto"``)."""
        return self.cfg.target_latency is not None or self.cfg.round_to == "auto"

    def _latency_columns(self, last_prune: dict[str, Any]) -> dict[str, Any]:
        """The current model timed against the starting architecture (interleaved; how it was timed in notes)."""
        if not self.tracks_latency:
            return {}
        if self._latency_reference is None:  # latency depends on the widths only: no weights to keep
            info = self.data_info
            self._latency_reference = build_model(self.cfg.model, num_classes=info.num_classes,
                                                  in_chans=info.in_chans).to(self.device)
            if self.state["start_history"]:
                replay(self._latency_reference, self.example_inputs, self.state["start_history"])
        inputs = latency_inputs(self.example_inputs, self.latency_batch_size)
        dense, pruned = compare_latency([self._latency_reference, self.model], inputs)
        self.notes["latency"] = {k: v for k, v in pruned.to_dict().items() if k != "median_ms"}
        columns = {"latency_ms": round(pruned.median_ms, 4), "dense_latency_ms": round(dense.median_ms, 4),
                   "latency_pct": round(100 * pruned.median_ms / max(dense.median_ms, 1e-9), 3)}
        if "round_latency" in last_prune:  # the prune's own measurement, against the model before the round
            columns["round_latency"] = last_prune["round_latency"]
        return columns

    def _start_label(self) -> str:
        cfg = self.cfg
        return "pretrained" if cfg.pretrained else f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else "random"

    def _starting_model(self, resume_ckpt: dict | None) -> tuple[torch.nn.Module, list]:
        """The model the run starts from (random, pretrained or a checkpoint) and its start pruning history."""
        cfg, info = self.cfg, self.data_info
        if resume_ckpt is not None:  # the structure comes from the run's own checkpoint: no network, no file
            history = list(resume_ckpt["state"].get("start_history", []))
            model = build_model(cfg.model, num_classes=info.num_classes, in_chans=info.in_chans).to(self.device)
            if history:
                replay(model, self.example_inputs, history)
            return model, history
        if cfg.pretrained:
            model = build_pretrained_model(cfg.model, num_classes=info.num_classes, in_chans=info.in_chans)
            return model.to(self.device), []
        model = build_model(cfg.model, num_classes=info.num_classes, in_chans=info.in_chans).to(self.device)
        if cfg.checkpoint:
            return model, load_start_checkpoint_(model, self.example_inputs, cfg.checkpoint, model_name=cfg.model)
        return model, []

    # ------------------------------------------------------------------ files
    @property
    def _progress(self) -> bool:
        return self.cfg.progress and self.env.is_main

    def _write_results(self, *, complete: bool) -> dict[str, Any]:
        cfg = self.cfg
        results = {"recipe": cfg.recipe, "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset,
                   "seed": cfg.seed, "complete": complete, "dense_params": self.dense_params,
                   "dense_macs": self.dense_macs, **self.notes, "rows": self.state["rows"]}
        if self.record.enabled:
            self.record.write_results(results)
            plot_results([(cfg.method, self.state["rows"])], self.record.plot_path,
                         title=f"{cfg.recipe}: {cfg.model} on {cfg.dataset}")
            try_write_run_report(self.record.dir, results)  # report.html: tables and embedded plots
        return results

    def _checkpoint(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.record.save_checkpoint({
            "config": self.cfg.to_dict(), "model": self.model.state_dict(), "state": self.state,
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "teacher": None if self.teacher is None else self.teacher.state_dict()})

    def _read_checkpoint(self) -> dict | None:
        """``--resume``: the run checkpoint (settings checked), or ``None`` for an empty folder.

        Raises:
            ValueError: The folder holds results but no checkpoint, or the settings differ.
            CheckpointError: The checkpoint is unreadable or not a run checkpoint.
        """
        path = self.record.checkpoint_path
        if not path.exists():
            if self.record.results_path.exists() or (self.record.dir / "epochs.jsonl").exists():
                raise ValueError(f"--resume: {self.cfg.output_dir!r} holds results but no checkpoint.pt, so there is "
                                 "nothing to resume; choose another --output-dir")
            return None
        ckpt = safe_torch_load(path, map_location="cpu")  # before the device is set up; copied over on load
        if not isinstance(ckpt, dict) or not {"config", "model", "state"} <= set(ckpt):
            raise CheckpointError(f"{str(path)!r} is not a run checkpoint of orthoreg_tp (expected keys config, "
                                  "model, state)")
        saved = RecipeConfig.from_dict(dict(ckpt["config"])).to_dict()  # fields added since: their defaults
        now = self.cfg.to_dict()
        changed = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
        if changed:
            raise ValueError(f"--resume with different settings than the checkpoint in {self.cfg.output_dir!r}: "
                             + ", ".join(f"{k}={now[k]!r} (was {saved.get(k)!r})" for k in changed))
        return ckpt

    def _load_checkpoint(self, ckpt: dict) -> None:
        replay(self.model, self.example_inputs, ckpt["state"]["history"])
        self.model.load_state_dict(ckpt["model"])
        self.state = {"start_history": [], **ckpt["state"]}
        self._optimizer_state = ckpt["optimizer"]
        if ckpt.get("teacher") is not None:
            info = self.data_info
            self.teacher = Teacher(model_from_state(self.cfg.model, info.num_classes, info.in_chans,
                                                    self.example_inputs, self.state["start_history"],
                                                    ckpt["teacher"]),
                                   alpha=self.cfg.distill_alpha, temperature=self.cfg.distill_temperature)
        self.record.truncate_epochs(self.state["global_epoch"])
        logger.info("resumed %s: %d stages done, epoch %d of the next, %d epochs so far", self.cfg.output_dir,
                    self.state["stages_done"], self.state["epoch_in_stage"], self.state["global_epoch"])


def _penalty(reg: OrthoRegularizer | None) -> float | None:
    if reg is None:
        return None
    with torch.no_grad():
        return float(reg.penalty())


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], Any],
            argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv``, set up logging, run ``main(args)``; bad options or missing data exit with a message.

    Example:
        >>> run_cli(get_args_parser(), main)  # in a recipe's ``if __name__ == "__main__":``  # doctest: +SKIP
    """
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        with stop_on_signals():
            return main(args)
    except RunInterrupted as stop:
        words = list(sys.argv[1:] if argv is None else argv)
        command = shlex.join(["python", sys.argv[0] if argv is None else parser.prog, *words,
                              *([] if "--resume" in words else ["--resume"])])
        where = getattr(args, "output_dir", "the output dir")
        parser.exit(stop.exit_code, f"{parser.prog}: interrupted by {stop.name}; {where} keeps the last checkpoint; "
                                    f"continue with: {command}\n")
    except (ValueError, DataUnavailableError) as err:
        parser.exit(2, f"{parser.prog}: error: {one_line(err)}\n")


def one_line(err: BaseException) -> str:
    r"""An error's message on one line; for an error re-raised from a DataLoader worker, the original message.

    Example:
        >>> one_line(ValueError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\n"
        ...                     "orthoreg_tp.engine.data.DataError: cannot read image 'a.png'"))
        "cannot read image 'a.png'"
    """
    lines = [line for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "Original Traceback" in str(err):  # torch.utils.data's ExceptionWrapper: the last line is "Type: message"
        return lines[-1].split(": ", 1)[-1].strip()
    return " ".join(line.strip() for line in lines)

