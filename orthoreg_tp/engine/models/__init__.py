"""Models: the paper's CIFAR architectures, tiny test models, and :func:`build_model` for timm/torchvision.

Example:
    >>> from orthoreg_tp.engine.models import build_model
    >>> model = build_model("vgg13", num_classes=100)
"""

from .catalog import build_model, list_models, register_model
from .mobilenet import MobileNetV1, mobilenet_v1
from .resnet import BasicBlock, CifarResNet, resnet34, resnet56
from .tiny import TinyCNN, tiny_cnn, tiny_resnet
from .vgg import VGG, vgg13

__all__ = [
    "VGG", "BasicBlock", "CifarResNet", "MobileNetV1", "TinyCNN",
    "build_model", "list_models", "mobilenet_v1", "register_model",
    "resnet34", "resnet56", "tiny_cnn", "tiny_resnet", "vgg13",
]
