"""Group sensitivity analysis: how much the loss changes when one dependency group alone is pruned.

``sensitivity(model, example_inputs, data)`` prunes every group the adapters build, alone, at a few levels, on
the live model, and restores it; the :class:`SensitivityResult` ranks the groups, writes CSV / JSON / PNG and
turns the measurements into per-layer ratios for :func:`orthoreg_tp.adapters.prune` (docs/sensitivity.md).

Example:
    >>> from orthoreg_tp.analyze import sensitivity
    >>> result = sensitivity(model, x, loader, levels=(0.25, 0.5, 0.75), num_batches=4)  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
"""

from .result import CSV_COLUMNS, SensitivityResult
from .sensitivity import Measurement, measure, predicted_deltas, removal_indices, sensitivity

__all__ = [
    "CSV_COLUMNS",
    "Measurement",
    "SensitivityResult",
    "measure",
    "predicted_deltas",
    "removal_indices",
    "sensitivity",
]
