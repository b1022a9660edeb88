"""Registries: module adapters keyed by module class, model adapters keyed by the library a model comes from.

A *module adapter* ``fn(module, name, ctx) -> SpecPart | None`` describes one module (an attention block, a
layer-scale wrapper); returning ``None`` declines, and the lookup then tries the next class in the module's MRO.
A *model adapter* describes the model as a whole (where its classifier is, which input it expects).
Built-in adapters for timm and torchvision are imported lazily, on the first :func:`prepare` call; those of
optional libraries (transformers, ultralytics) once the process has imported the library.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .spec import SpecPart

__all__ = [
    "AdapterContext",
    "ModelAdapter",
    "ModuleAdapterFn",
    "find_module_adapters",
    "model_adapters",
    "register_model_adapter",
    "register_module_adapter",
]


@dataclass(frozen=True)
class AdapterContext:
    """What a module adapter may look at besides the module itself.

    Attributes:
        model: The whole model.
        names: ``{module: qualified name}`` for every submodule.
        source: Library the model comes from (``"timm"``, ``"torchvision"`` or ``"generic"``).
    """

    model: nn.Module
    names: dict[nn.Module, str]
    source: str


ModuleAdapterFn = Callable[[nn.Module, str, AdapterContext], "SpecPart | None"]


@dataclass(frozen=True)
class ModelAdapter:
    """Whole-model adapter: ``detect(model)`` says whether it applies, ``describe(model, ctx)`` contributes.

    ``outputs(model_output)`` picks the predictions out of what the model returns; the rest (feature maps a
    detector hands back for its loss, say) may change width with pruning. ``None``: every output tensor counts
    (its producers keep their widths and verification checks its shape).
    """

    source: str
    detect: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module, AdapterContext], SpecPart]
    check_output_shape: Callable[[nn.Module], bool] = lambda model: True
    outputs: Callable[[Any], Any] | None = None


_MODULE_ADAPTERS: dict[type, list[ModuleAdapterFn]] = {}
_MODEL_ADAPTERS: list[ModelAdapter] = []
_BUILTINS = ("orthoreg_tp.adapters.libraries.timm_models", "orthoreg_tp.adapters.libraries.torchvision_models")
# (adapter module, the package it needs): one entry per optional library
_OPTIONAL_BUILTINS: tuple[tuple[str, str], ...] = (
    ("orthoreg_tp.adapters.libraries.transformers_models", "transformers"),
    ("orthoreg_tp.adapters.libraries.ultralytics_models", "ultralytics"),
)
_loaded = False


def register_module_adapter(*classes: type) -> Callable[[ModuleAdapterFn], ModuleAdapterFn]:
    """Register ``fn`` as the adapter of every class in ``classes`` (decorator).

    Args:
        *classes: Module classes the adapter understands; subclasses inherit it unless they register their own.

    Returns:
        A decorator returning ``fn`` unchanged.

    Example:
        >>> import torch.nn as nn
        >>> from orthoreg_tp.adapters import SpecPart, register_module_adapter
        >>> class Scale(nn.Module):
        ...     def __init__(self, c):
        ...         super().__init__(); self.gamma = nn.Parameter(torch.ones(c))
        >>> @register_module_adapter(Scale)
        ... def _scale(module, name, ctx):
        ...     return SpecPart(unwrapped_parameters=[(module.gamma, 0)], handled={id(module)})
    """
    if not classes:
        raise ValueError("register_module_adapter needs at least one module class")

    def decorator(fn: ModuleAdapterFn) -> ModuleAdapterFn:
        for cls in classes:
            if not isinstance(cls, type):
                raise ValueError(f"register_module_adapter expects classes, got {cls!r}")
            _MODULE_ADAPTERS.setdefault(cls, []).insert(0, fn)
        return fn

    return decorator


def register_model_adapter(adapter: ModelAdapter, *, first: bool = True) -> ModelAdapter:
    """Register a whole-model adapter; ``first`` puts it ahead of the built-in ones."""
    if first:
        _MODEL_ADAPTERS.insert(0, adapter)
    else:
        _MODEL_ADAPTERS.append(adapter)
    return adapter


def load_builtin_adapters() -> None:
    """Import the timm and torchvision adapters (once), and those of optional libraries the process has imported.

    An optional library's adapter is loaded once the library is in ``sys.modules`` (a model of that library means
    the library was imported): this package never imports ultralytics or transformers itself, so it never
    triggers what importing them does (ultralytics, for one, replaces ``PIL.Image.open`` process-wide).
    """
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTINS:
            importlib.import_module(mod)
    for mod, needs in _OPTIONAL_BUILTINS:
        if needs in sys.modules and mod not in sys.modules:
            importlib.import_module(mod)


def find_module_adapters(module: nn.Module) -> list[ModuleAdapterFn]:
    """Adapters for ``module``, most specific class first (an empty list when none is registered)."""
    out: list[ModuleAdapterFn] = []
    for cls in type(module).__mro__:
        out.extend(_MODULE_ADAPTERS.get(cls, ()))
    return out


def model_adapters() -> list[ModelAdapter]:
    """Registered whole-model adapters in lookup order."""
    load_builtin_adapters()
    return list(_MODEL_ADAPTERS)


def registered_module_classes() -> list[type[Any]]:
    """Every module class with a registered adapter."""
    load_builtin_adapters()
    return list(_MODULE_ADAPTERS)
