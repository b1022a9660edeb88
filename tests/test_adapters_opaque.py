"""Parameters the dependency graph cannot follow (einsum/matmul) and tied parameters are kept whole, by name."""

import torch
import torch_pruning as tp
from orthoreg_tp.adapters import prepare, prune
from orthoreg_tp.adapters._internal.opaque import describe_opaque_parameters, opaque_parameter_uses, tied_parameters
from torch import nn


class EinsumMix(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) * 0.1)

    def forward(self, x):
        return torch.einsum("bchw,oc->bohw", x, self.weight)


class EinsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.mix, self.bn2 = EinsumMix(16, 24), nn.BatchNorm2d(24)
        self.conv2, self.bn3 = nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.mix(x)).relu()
        x = self.bn3(self.conv2(x)).relu()
        return self.fc(x.mean((2, 3)))


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.head = nn.Conv2d(8, 32, 1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = self.b(self.a(self.stem(x).relu()).relu()).relu()
        return self.fc(self.head(x).relu().mean((2, 3)))


def test_einsum_weight_is_detected_but_layer_weights_are_not():
    model = EinsumNet()
    out = model(torch.randn(1, 3, 8, 8))
    uses = opaque_parameter_uses([out])
    assert uses[id(model.mix.weight)] == "Bmm"
    assert id(model.bn1.weight) not in uses  # element-wise use
    parts = describe_opaque_parameters(model, uses)  # conv/linear weights are the graph's own business
    assert [p.pinned_inputs for p in parts] == [[model.mix]]


def test_product_with_a_constant_is_not_opaque():
    table = nn.Parameter(torch.randn(5, 8))
    lookup = nn.functional.one_hot(torch.tensor([0, 3]), 5).float() @ table  # a position-table lookup
    assert opaque_parameter_uses([lookup]) == {}
    assert list(opaque_parameter_uses([torch.randn(2, 5, requires_grad=True) @ table]).values()) == ["Mm"]


def test_einsum_module_is_kept_whole_and_named():
    torch.manual_seed(0)
    model, x = EinsumNet(), torch.randn(2, 3, 16, 16)
    spec = prepare(model, x)
    assert any(n.startswith("mix (EinsumMix): weight used through") for n in spec.notes), spec.notes
    report = prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
    assert model.mix.weight.shape == (24, 16)
    assert model.conv2.out_channels < 32  # the rest is still pruned
    assert report.params_after < report.params_before
    assert model(x).shape == (2, 10)


def test_tied_parameters_stay_tied():
    torch.manual_seed(0)
    model, x = TiedNet(), torch.randn(2, 3, 8, 8)
    assert tied_parameters(model) == {"a.weight": ["a", "b"]}
    before = model.a.weight.detach().clone()
    prune(model, x, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
    assert model.a.weight is model.b.weight
    assert torch.equal(model.a.weight, before)
    assert model.head.out_channels < 32
    assert model(x).shape == (2, 4)
