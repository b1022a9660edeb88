"""Model registry: the paper's CIFAR networks by name, plus any timm or torchvision model.

``build_model("vgg13", num_classes=100)`` builds a registered model; ``"timm:NAME"`` and
``"torchvision:NAME"`` build a model of those libraries with random weights (never downloads).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}
_PREFIXES = ("timm:", "torchvision:")


def register_model(fn: ModelFactory) -> ModelFactory:
    """Register a model factory under its function name (a decorator, like timm's ``@register_model``).

    Args:
        fn: A callable ``fn(num_classes=..., **kwargs) -> nn.Module``.

    Returns:
        ``fn`` unchanged.

    Example:
        >>> @register_model
        ... def my_net(num_classes: int = 10) -> nn.Module:
        ...     return nn.Linear(4, num_classes)
    """
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`build_model` without a ``timm:``/``torchvision:`` prefix.

    Example:
        >>> "vgg13" in list_models()
        True
    """
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, *, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a model with random weights.

    Args:
        name: A registered name (see :func:`list_models`), ``"timm:NAME"`` or ``"torchvision:NAME"``.
        num_classes: Number of output classes.
        in_chans: Input channels (torchvision models take 3 only).
        **kwargs: Forwarded to the model factory.

    Returns:
        The model, in train mode.

    Raises:
        ValueError: For an unknown name.

    Example:
        >>> model = build_model("resnet56", num_classes=10)
        >>> model = build_model("timm:resnet18", num_classes=10)
    """
    if name.startswith("timm:"):
        import timm

        arch = name.split(":", 1)[1]
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm model, got {arch!r}")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model, got {arch!r}")
        if in_chans != 3:
            raise ValueError(f"torchvision models take 3 input channels, got in_chans={in_chans!r}")
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model, got {name!r}; choose one of {list_models()} or prefix 'timm:' / 'torchvision:'"
        )
    return _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, **kwargs)

