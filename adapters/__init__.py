"""Adapters: prune timm, torchvision and generic models with torch-pruning, consistently, in one call.

Example:
    >>> import timm, torch, torch_pruning as tp
    >>> from orthoreg_tp.adapters import prepare, prune
    >>> model, x = timm.create_model("test_vit", pretrained=False), torch.randn(1, 3, 160, 160)
    >>> report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
"""

from .api import prepare, prune, replay
from .config import PruneConfig
from .graph import GroupExplosion, RobustDependencyGraph
from .hostfix import host_fixes
from .pruner import adapted_pruner_class, build_pruner
from .registry import (
    AdapterContext,
    ModelAdapter,
    register_model_adapter,
    register_module_adapter,
)
from .report import PruneReport, PruningError
from .spec import Fixup, FixupContext, FixupError, PruningSpec, SpecPart
from .transaction import Snapshot, restore, snapshot

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
    "SpecPart",
    "Snapshot",
    "adapted_pruner_class",
    "build_pruner",
    "host_fixes",
    "prepare",
    "prune",
    "register_model_adapter",
    "register_module_adapter",
    "replay",
    "restore",
    "snapshot",
]
