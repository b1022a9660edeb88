"""What OrthoReg costs per training step inside each framework: a plain loop with ``attach``, Lightning, transformers.

Each framework trains the same small CNN (CIFAR-shaped inputs) for ``--steps`` optimizer steps without and with
the regularizer; runs alternate (without, with, without, with, ...) ``--repeats`` times so drifts on shared cores
hit both alike. A step is timed in this process's CPU time (``time.process_time``), from the framework's own
step-begin event to its step-end event (plain loop: forward, loss, backward, step, zero_grad), skipping the
first ``--warmup`` steps of every run; the table gives the median over all kept steps and the ratio.

    python benchmarks/integrations_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import machine_line, markdown_table, median, write_results
from torch import nn

CLOCK = time.process_time


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """Four 3x3 conv blocks (32-64-128-128 channels) and a linear classifier, for 32x32 inputs."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), *block(128, 128, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---------------------------------------------------------------- plain loop + attach
def run_plain(args: argparse.Namespace, regularize: bool) -> list[float]:
    from orthoreg_tp.integrations import attach

    torch.manual_seed(0)
    model, (x, y) = small_cnn(), data(args.steps * args.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle = attach(opt, model, coefficient=args.coefficient) if regularize else None
    times = []
    for i in range(args.steps):
        xb, yb = x[i * args.batch_size:(i + 1) * args.batch_size], y[i * args.batch_size:(i + 1) * args.batch_size]
        start = CLOCK()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(CLOCK() - start)
    if handle is not None:
        handle.remove()
    return times[args.warmup:]


# ---------------------------------------------------------------- Lightning
def run_lightning(args: argparse.Namespace, regularize: bool) -> list[float]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from orthoreg_tp.integrations.lightning import OrthoRegCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_cnn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *a: Any) -> None:
            self.start = CLOCK()

        def on_train_batch_end(self, *a: Any) -> None:
            self.times.append(CLOCK() - self.start)

    torch.manual_seed(0)
    timer = Timer()
    callbacks: list[pl.Callback] = [timer] + ([OrthoRegCallback(coefficient=args.coefficient)] if regularize else [])
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    loader = DataLoader(TensorDataset(*data(args.steps * args.batch_size)), batch_size=args.batch_size)
    trainer.fit(Module(), loader)
    return timer.times[args.warmup:]


# ---------------------------------------------------------------- transformers Trainer
def run_transformers(args: argparse.Namespace, regularize: bool) -> list[float]:
    import tempfile

    import transformers

    from orthoreg_tp.integrations.transformers import OrthoRegCallback

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_cnn()

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            logits = self.net(pixel_values)
            return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class Images(torch.utils.data.Dataset):
        def __init__(self, n: int) -> None:
            self.x, self.y = data(n)

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    class Timer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = CLOCK()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.times.append(CLOCK() - self.start)

    torch.manual_seed(0)
    timer = Timer()
    callbacks = [timer] + ([OrthoRegCallback(coefficient=args.coefficient)] if regularize else [])
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, num_train_epochs=1, learning_rate=0.01,
            optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="constant", max_grad_norm=0.0,
            save_strategy="no", report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
            remove_unused_columns=False, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=Model(), args=targs, train_dataset=Images(args.steps * args.batch_size),
                                       callbacks=callbacks)
        trainer.train()
    return timer.times[args.warmup:]


def regularize_alone(args: argparse.Namespace, calls: int = 200) -> float:
    """Median seconds of one ``OrthoRegularizer.regularize()`` call on the same CNN (the cost every step adds)."""
    from orthoreg_tp import OrthoRegularizer

    model = small_cnn()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg = OrthoRegularizer(model, args.coefficient)
    times = []
    for _ in range(calls):
        start = CLOCK()
        reg.regularize(model)
        times.append(CLOCK() - start)
    return median(times[10:])


FRAMEWORKS: dict[str, tuple[str, Callable[[argparse.Namespace, bool], list[float]], str | None]] = {
    "plain": ("plain loop + attach()", run_plain, None),
    "lightning": ("Lightning + OrthoRegCallback", run_lightning, "lightning"),
    "transformers": ("transformers Trainer + OrthoRegCallback", run_transformers, "accelerate"),
}


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("lightning", "transformers", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=list(FRAMEWORKS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps of every run not timed")
    p.add_argument("--repeats", type=int, default=3, help="runs without and with the regularizer, alternating")
    p.add_argument("--coefficient", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="integrations_overhead")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results: dict[str, Any] = {}
    rows = []
    for key in args.frameworks:
        label, run, needs = FRAMEWORKS[key]
        if needs is not None and importlib.util.find_spec(needs) is None:
            results[key] = {"skipped": f"{needs} is not installed"}
            rows.append([label, "-", "-", f"skipped: {needs} not installed"])
            continue
        times: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(args.repeats):
            for mode in ("without", "with"):
                times[mode] += run(args, mode == "with")
        base, reg = median(times["without"]), median(times["with"])
        results[key] = {"label": label, "median_step_s": {"without": base, "with": reg}, "ratio": reg / base,
                        "steps_timed": {k: len(v) for k, v in times.items()}, "step_times_s": times}
        rows.append([label, f"{base * 1e3:.1f}", f"{reg * 1e3:.1f}", f"{reg / base:.3f}x"])
        print(f"{label}: {base * 1e3:.1f} ms -> {reg * 1e3:.1f} ms per step ({reg / base:.3f}x)", flush=True)
    alone = regularize_alone(args)
    results["regularize_alone_s"] = alone
    plain = results.get("plain", {}).get("median_step_s", {}).get("without")
    share = f" ({alone / plain:.1%} of the plain loop's step)" if plain else ""
    table = markdown_table(["framework", "step without (ms)", "step with OrthoReg (ms)", "ratio"], rows)
    table += f"\n\n`OrthoRegularizer.regularize()` alone on this CNN: {alone * 1e3:.2f} ms per call{share}."
    md = (f"# OrthoReg overhead per training step inside each framework\n\nSmall CNN (4 conv blocks, 32-128 "
          f"channels), batch {args.batch_size}, 32x32 inputs, SGD, coefficient {args.coefficient}; median process "
          f"CPU time per step over {args.repeats} alternating runs of {args.steps} steps (first {args.warmup} "
          f"of each not timed).\n\n{table}\n\n{machine_line()}; "
          + ", ".join(f"{k} {v}" for k, v in _versions().items()) + "\n")
    payload = {"settings": vars(args), "results": results, "versions": _versions()}
    write_results(args.name, payload, md)
    print(table)
    return payload


if __name__ == "__main__":
    main(get_args_parser().parse_args())
