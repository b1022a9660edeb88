"""Latency of a model being pruned, measured against a frozen copy of it as it was before pruning."""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from orthoreg_tp._inputs import latency_inputs
from orthoreg_tp.latency import LatencyMeasurement, compare_latency

from ..prune_config import PruneConfig

__all__ = ["LatencyProbe"]


class LatencyProbe:
    """Times the model being pruned against a copy of it taken at construction (interleaved, same inputs).

    Args:
        model: The unpruned model (copied once; the copy is never pruned).
        example_inputs: The inputs of the pruning call.
        cfg: The call's options (repeats, warm-up, batch size).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, cfg: PruneConfig) -> None:
        self.model_class = type(model).__name__
        self.dense = copy.deepcopy(model)
        self.inputs = latency_inputs(example_inputs, cfg.latency_batch_size)
        self.repeats, self.warmup = cfg.latency_repeats, cfg.latency_warmup
        self.last: tuple[float, LatencyMeasurement, LatencyMeasurement] | None = None

    def measure(self, model: nn.Module) -> tuple[float, LatencyMeasurement, LatencyMeasurement]:
        """``(pruned / dense median latency, dense measurement, pruned measurement)``; kept as :attr:`last`."""
        dense, pruned = compare_latency([self.dense, model], self.inputs, repeats=self.repeats, warmup=self.warmup)
        self.last = (pruned.median_ms / max(dense.median_ms, 1e-9), dense, pruned)
        return self.last

    def report(self, model: nn.Module, candidates: dict[int, float], *, reuse_last: bool = False) -> dict[str, Any]:
        """What :class:`~orthoreg_tp.adapters.PruneReport` records: both measurements, their ratio, candidates.

        ``reuse_last``: report the last measurement (the one a latency budget accepted ``model`` on) instead of
        timing again, so the report shows the figure the budget was checked against.
        """
        ratio, dense, pruned = self.last if reuse_last and self.last is not None else self.measure(model)
        out: dict[str, Any] = {"dense": dense.to_dict(), "pruned": pruned.to_dict(), "ratio": ratio}
        if candidates:
            out["candidates"] = {str(k): v for k, v in candidates.items()}
        return out
