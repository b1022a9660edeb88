import pytest
import torch
from torch import nn

from orthoreg_tp import find_classifier, layer_widths
from orthoreg_tp.engine.methods import build_importance, get_method
from orthoreg_tp.engine.models import build_model, list_models
from orthoreg_tp.engine.pruning import count_macs_params, prune_round_

# Parameter counts of the CIFAR architectures (10 classes), a fingerprint of the layer configuration.
EXPECTED_PARAMS = {"vgg13": 9_416_010, "mobilenet_v1": 3_217_226, "resnet34": 21_282_122, "resnet56": 855_770}


@pytest.mark.parametrize("name", list_models())
def test_registered_models_forward(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert isinstance(find_classifier(model), nn.Linear)
    assert find_classifier(model).out_features == 7


@pytest.mark.parametrize("name,count", sorted(EXPECTED_PARAMS.items()))
def test_paper_architecture_sizes(name, count):
    assert sum(p.numel() for p in build_model(name, num_classes=10).parameters()) == count


def test_vgg13_is_conv_bias_relu_bn():
    layers = list(build_model("vgg13", num_classes=100).features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10
    for i in convs:
        assert layers[i].bias is not None
        assert isinstance(layers[i + 1], nn.ReLU) and isinstance(layers[i + 2], nn.BatchNorm2d)


def test_mobilenet_v1_blocks():
    model = build_model("mobilenet_v1", num_classes=100)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.classifier.in_features == 1024


def test_in_chans():
    model = build_model("tiny_cnn", num_classes=10, in_chans=1)
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:mobilenet_v2"])
def test_library_models_random_weights(name):
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("name", ["vgg99", "timm:not_a_model", "torchvision:not_a_model"])
def test_unknown_model_names(name):
    with pytest.raises(ValueError, match="unknown"):
        build_model(name, num_classes=10)


def test_torchvision_rejects_grayscale():
    with pytest.raises(ValueError, match="in_chans"):
        build_model("torchvision:resnet18", num_classes=10, in_chans=1)


def test_residual_channels_removed_physically():
    model = build_model("tiny_resnet", num_classes=10)
    x = torch.randn(1, 3, 16, 16)
    widths = layer_widths(model)
    macs, params = count_macs_params(model, x)
    imp = build_importance(get_method("l1"), widths)
    report = prune_round_(model, x, imp, ratio=0.5)
    after = layer_widths(model)
    # the residual stream of stage 1 (stem + both block outputs) shrinks together, for real
    assert after["stem.0"] == after["layers.0.0.conv2"] < widths["stem.0"]
    assert after["layers.1.0.conv2"] == after["layers.1.0.shortcut.0"] < widths["layers.1.0.conv2"]
    assert count_macs_params(model, x)[1] < params
    assert model(x).shape == (1, 10)
    assert report.channels_removed == pytest.approx(0.5, abs=0.02)
