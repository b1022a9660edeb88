"""What :func:`orthoreg_tp.adapters.prune` returns, and the error it raises."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PruneReport", "PruningError"]


class PruningError(RuntimeError):
    """Pruning failed and the model was restored; names the model class, the layer and the reason.

    Attributes:
        model_class: Class name of the model.
        layer: Qualified name of the layer at fault (``None`` when it could not be located).
        reason: What went wrong.
    """

    def __init__(self, model_class: str, layer: str | None, reason: str) -> None:
        self.model_class = model_class
        self.layer = layer
        self.reason = reason
        where = f" at layer {layer!r}" if layer else ""
        super().__init__(f"pruning {model_class} failed{where}: {reason} (the model was restored)")


@dataclass(frozen=True)
class PruneReport:
    """Outcome of one :func:`~orthoreg_tp.adapters.prune` call.

    Attributes:
        model_class: Class name of the model.
        source: Adapter family (``"timm"``, ``"torchvision"``, ``"generic"``).
        params_before: Parameter count before pruning.
        params_after: Parameter count after pruning.
        macs_before: Conv/linear multiply-accumulates per sample (the batch of ``example_inputs`` divided out, as
            ``tp.utils.count_ops_and_params`` counts) before pruning.
        macs_after: The same after pruning.
        widths: ``{layer: (width before, width after)}`` for every conv, linear and MHA layer.
        seconds: Wall time of the whole call.
        ratio: The torch-pruning ``pruning_ratio`` finally used.
        target: The ``(kind, fraction)`` budget asked for, or ``None``.
        trials: ``(ratio, achieved fraction of the budgeted quantity)`` for every pruning attempt kept.
        frozen: ``"layer: reason"`` for layers frozen automatically after a failed attempt.
        spec: :meth:`PruningSpec.summary` of the spec used.
        history: torch-pruning's ``[layer name, is_out_channel, indices]`` entries of the pruning (replay them on
            the unpruned model with :func:`~orthoreg_tp.adapters.replay`).
        channels_before: Prunable channels (as torch-pruning's ranking counts them) before pruning.
        channels_after: The same after pruning.
        prunable_layers: ``{root layer: width}`` of every group the ranking considered.
        requested_ratio: The ratio asked for (``None`` for a budget); ``ratio`` is lower when the floor capped it.
        dry_run: The model was restored after computing all of this.
        config: :meth:`PruneConfig.to_dict` of the options used.
        latency: When latency was measured (a latency budget or ``round_to="auto"``): ``dense`` and ``pruned``
            (:class:`~orthoreg_tp.latency.LatencyMeasurement` dictionaries, timed interleaved), their ``ratio``,
            and for ``round_to="auto"`` the ``candidates`` tried (``{round_to: latency ratio}``). Under a latency
            budget these are the timings the budget accepted the pruned model on (not timed again).
        unused: ``"module (N parameters)"`` for blocks the traced forward never reads: not pruned (their
            parameters are still counted in ``params_after``).
    """

    model_class: str
    source: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    widths: dict[str, tuple[int, int]]
    seconds: float
    ratio: float
    target: tuple[str, float] | None = None
    trials: tuple[tuple[float, float], ...] = ()
    frozen: tuple[str, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)
    history: tuple[list, ...] = ()
    channels_before: int = 0
    channels_after: int = 0
    prunable_layers: dict[str, int] = field(default_factory=dict)
    requested_ratio: float | None = None
    dry_run: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None
    unused: tuple[str, ...] = ()

    @property
    def params_fraction(self) -> float:
        """Fraction of parameters kept."""
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_fraction(self) -> float:
        """Fraction of MACs kept."""
        return self.macs_after / max(self.macs_before, 1)

    @property
    def channels_removed(self) -> float:
        """Fraction of the prunable channels removed (the achieved ratio)."""
        return 1.0 - self.channels_after / max(self.channels_before, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (widths as ``[before, after]`` lists)."""
        out = asdict(self)
        out["widths"] = {k: list(v) for k, v in self.widths.items()}
        out["params_fraction"] = self.params_fraction
        out["macs_fraction"] = self.macs_fraction
        out["channels_removed"] = self.channels_removed
        return out

    def __str__(self) -> str:
        changed = sum(1 for b, a in self.widths.values() if a != b)
        return (
            f"{self.model_class}: params {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_fraction:.1%}), MACs {self.macs_before:,} -> {self.macs_after:,} "
            f"({self.macs_fraction:.1%}), {changed} layers narrowed, ratio {self.ratio:.3f}, "
            f"{self.seconds:.2f} s{' (dry run, model unchanged)' if self.dry_run else ''}"
            + (f"; not pruned, never used by the forward: {', '.join(self.unused)}" if self.unused else "")
        )
