"""orthoreg_tp: OrthoReg filter pruning (arXiv 2009.05014) for torch-pruning.

Example:
    >>> import torch_pruning as tp
    >>> from orthoreg_tp import OrthoRegImportance, OrthoRegularizer
    >>> reg = OrthoRegularizer(model, coefficient=1e-2)  # doctest: +SKIP
    >>> imp = OrthoRegImportance(); imp.accumulate(model, loader)  # doctest: +SKIP
"""

from .baselines import GraSPImportance, RDTImportance, TFOImportance
from .floor import FloorImportance, LayerFloor, RoundedFloorImportance, keep_floor
from .functional import cumulative_schedule, paper_schedule
from .grouping import along, register_param_slices
from .importance import AccumulatingImportance, FisherImportance, OrthoRegImportance
from .metrics import filter_correlations, layer_widths, mean_orthonormality, orthonormality, prunable_channels
from .pruner import OrthoRegPruner
from .regularizer import OrthoRegularizer, find_classifier
from .ties import TieBreakImportance, break_ties

__all__ = [
    "AccumulatingImportance",
    "FisherImportance",
    "FloorImportance",
    "LayerFloor",
    "GraSPImportance",
    "OrthoRegImportance",
    "OrthoRegPruner",
    "OrthoRegularizer",
    "RDTImportance",
    "RoundedFloorImportance",
    "TFOImportance",
    "TieBreakImportance",
    "along",
    "break_ties",
    "cumulative_schedule",
    "filter_correlations",
    "find_classifier",
    "keep_floor",
    "layer_widths",
    "load_pruned",
    "mean_orthonormality",
    "orthonormality",
    "paper_schedule",
    "prunable_channels",
    "register_param_slices",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy attributes: ``load_pruned`` imports the engine (safetensors, the model registry) on first use only."""
    if name == "load_pruned":
        from .engine.export import load_pruned

        return load_pruned
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
