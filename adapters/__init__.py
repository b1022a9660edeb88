"""Adapters: prune timm, torchvision, Hugging Face, Ultralytics and generic models with torch-pruning, in one call.

The public face is this module: the entry points (:func:`prepare`, :func:`prune`, :func:`replay`,
:func:`build_pruner`), their options (:class:`PruneConfig`), results and errors (:class:`PruneReport`,
:class:`PruningError`), the spec adapters build (:class:`PruningSpec` and its parts) and the registry adapters
register in. ``libraries/`` holds the adapters of timm, torchvision, transformers and ultralytics; ``_internal/``
the machinery behind the entry points (tracing, the generic adapter, the session, the host fixes), which may
change without notice.

Example:
    >>> import timm, torch, torch_pruning as tp
    >>> from orthoreg_tp.adapters import prepare, prune
    >>> model, x = timm.create_model("test_vit", pretrained=False), torch.randn(1, 3, 160, 160)
    >>> report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
"""

from ._internal.host import adapted_pruner_class
from ._internal.hostgraph import GroupExplosion, RobustDependencyGraph
from ._internal.transaction import Snapshot, restore, snapshot
from ._internal.verify import count_macs_params
from .api import build_pruner, prepare, prune, replay
from .prune_config import PruneConfig
from .registry import AdapterContext, ModelAdapter, register_model_adapter, register_module_adapter
from .report import PruneReport, PruningError
from .spec import Fixup, FixupContext, FixupError, PruningSpec, SpecPart

__all__ = [
    "AdapterContext",
    "Fixup",
    "FixupContext",
    "FixupError",
    "GroupExplosion",
    "ModelAdapter",
    "PruneConfig",
    "PruneReport",
    "PruningError",
    "PruningSpec",
    "RobustDependencyGraph",
    "Snapshot",
    "SpecPart",
    "adapted_pruner_class",
    "build_pruner",
    "count_macs_params",
    "prepare",
    "prune",
    "register_model_adapter",
    "register_module_adapter",
    "replay",
    "restore",
    "snapshot",
]
