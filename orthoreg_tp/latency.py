"""Robust forward-latency measurement for comparing a dense and a pruned model on the same device.

Wall-clock medians of two models timed one after the other drift with whatever else the machine runs (on a
shared 2-core CPU the ratio of the same model pair was seen anywhere between 0.55 and 0.80). Two measures make
the comparison stable:

* the models are timed **interleaved** (dense, pruned, dense, pruned, ...), so a slow period hits both;
* on CPU the clock is the **process CPU time** (``time.process_time_ns``: every thread of this process, so
  torch's intra-op threads count, while time spent waiting for other processes does not); on CUDA it is
  **CUDA events** around each forward, after a synchronize.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from orthoreg_tp.latency import compare_latency
    >>> big, small = nn.Linear(256, 256), nn.Linear(256, 8)
    >>> dense, pruned = compare_latency([big, small], torch.randn(64, 256), repeats=5, warmup=1)
    >>> dense.clock, pruned.samples
    ('cpu-process-time', 5)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._inputs import flatten_tensors, run_model

__all__ = ["LatencyMeasurement", "compare_latency", "measure_latency"]


@dataclass(frozen=True)
class LatencyMeasurement:
    """The median forward latency of one model and how it was timed.

    Attributes:
        median_ms: Median of the timed forwards, in milliseconds.
        samples: Number of timed forwards.
        warmup: Untimed forwards run first.
        clock: ``"cpu-process-time"`` or ``"cuda-events"``.
        device: Device of the model's parameters (``"cpu"``, ``"cuda:0"``...).
        batch_size: Leading dimension of the example input (``None`` when it has none).
        interleaved_with: How many models were timed in turn with this one (1: alone).
    """

    median_ms: float
    samples: int
    warmup: int
    clock: str
    device: str
    batch_size: int | None
    interleaved_with: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (for ``results.json``)."""
        return asdict(self)


def _device_of(model: nn.Module, example_inputs: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs.device
    return torch.device("cpu")


def _batch_of(example_inputs: Any) -> int | None:
    if isinstance(example_inputs, dict):
        return None  # keyword inputs: which one carries the batch is the model's business
    tensors = flatten_tensors(example_inputs)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else None


def _timer(device: torch.device) -> tuple[str, Callable[[Callable[[], Any]], float]]:
    """``(clock name, time_ms(fn))`` for a device."""
    if device.type == "cuda":

        def cuda_ms(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return float(start.elapsed_time(end))

        return "cuda-events", cuda_ms

    def cpu_ms(fn: Callable[[], Any]) -> float:
        t0 = time.process_time_ns()
        fn()
        return (time.process_time_ns() - t0) / 1e6

    return "cpu-process-time", cpu_ms


def compare_latency(
    models: Sequence[nn.Module], example_inputs: Any, *, repeats: int = 30, warmup: int = 5
) -> list[LatencyMeasurement]:
    """Time several models on the same inputs, interleaved, and return one measurement per model.

    Every model runs in eval mode under ``torch.inference_mode()`` (train/eval modes are restored). All models
    must live on the same device as ``example_inputs``.

    Args:
        models: The models to compare (e.g. ``[dense, pruned]``).
        example_inputs: One batch (tensor, tuple/list of positional inputs, or dict of keyword inputs).
        repeats: Timed forwards per model.
        warmup: Untimed forwards per model first (allocator, cuDNN autotuning, caches).

    Returns:
        One :class:`LatencyMeasurement` per model, in order.

    Raises:
        ValueError: No model, ``repeats < 1``, ``warmup < 0``, or models on different devices.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> [m.samples for m in compare_latency([nn.Identity(), nn.Identity()], torch.zeros(1), repeats=3)]
        [3, 3]
    """
    if not models:
        raise ValueError("compare_latency needs at least one model, got none")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    devices = {str(_device_of(m, example_inputs)) for m in models}
    if len(devices) > 1:
        raise ValueError(f"models to compare must share one device, got {sorted(devices)}")
    device = _device_of(models[0], example_inputs)
    clock, time_ms = _timer(device)
    modes = [{m: m.training for m in model.modules()} for model in models]
    samples: list[list[float]] = [[] for _ in models]
    try:
        for model in models:
            model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                for model in models:
                    run_model(model, example_inputs)
            for _ in range(repeats):
                for i, model in enumerate(models):
                    samples[i].append(time_ms(lambda model=model: run_model(model, example_inputs)))
    finally:
        for saved in modes:
            for module, training in saved.items():
                module.training = training
    return [
        LatencyMeasurement(
            median_ms=statistics.median(s),
            samples=len(s),
            warmup=warmup,
            clock=clock,
            device=str(device),
            batch_size=_batch_of(example_inputs),
            interleaved_with=len(models),
        )
        for s in samples
    ]


def measure_latency(model: nn.Module, example_inputs: Any, *, repeats: int = 30, warmup: int = 5) -> LatencyMeasurement:
    """Median forward latency of one model (see :func:`compare_latency` for comparing two robustly).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> measure_latency(nn.Linear(8, 8), torch.zeros(2, 8), repeats=3, warmup=0).batch_size
        2
    """
    return compare_latency([model], example_inputs, repeats=repeats, warmup=warmup)[0]
