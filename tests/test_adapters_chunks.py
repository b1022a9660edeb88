"""A split into equal chunks sized from the width (``x.chunk(2)``) whose chunks are consumed apart (YOLO's C2f).

``chunk`` re-derives equal chunk sizes from the pruned width at run time, so pruning must keep the chunks equal:
channel ``i`` of one chunk goes with channel ``i`` of the other. And a concat fed two chunks of one split must
size each of them. Before the robust graph did both, a C2f-style block failed verification (both blocks frozen).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp
from orthoreg_tp.adapters import prune
from orthoreg_tp.adapters._internal.hostgraph import RobustDependencyGraph


def _cbs(c_in: int, c_out: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class C2f(nn.Module):
    """Ultralytics' C2f layout: ``cv1`` output halved with ``chunk``; both halves concatenated, one goes on."""

    def __init__(self, c_in: int, c_out: int, n: int = 2) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = _cbs(c_in, 2 * self.c)
        self.cv2 = _cbs((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(_cbs(self.c, self.c, 3) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SplitBySizes(nn.Module):
    """An explicit ``split([8, 24])``: unequal chunks, not coupled with each other."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbs(3, 32)
        self.a, self.b = _cbs(8, 8), _cbs(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.stem(x).split([8, 24], 1)
        return torch.cat((self.a(a), self.b(b)), 1)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_cbs(3, 16, 3), C2f(16, 32), C2f(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10)).eval()


def _group_idxs(graph: RobustDependencyGraph, layer: nn.Module, idx: int) -> dict[nn.Module, list[int]]:
    group = graph.get_pruning_group(layer, tp.prune_conv_out_channels, [idx])
    return {dep.target.module: sorted(idxs) for dep, idxs in group.items}


def test_equal_chunks_are_coupled_channel_by_channel():
    net, x = _net(), torch.randn(1, 3, 16, 16)
    block = net[1]
    graph = RobustDependencyGraph().build_dependency(net, example_inputs=x)
    for idx, mirror in ((3, 19), (19, 3)):
        idxs = _group_idxs(graph, block.cv1[0], idx)
        assert idxs[block.cv1[0]] == sorted((idx, mirror))
        assert idxs[block.m[0][0]] == [3]  # the second chunk's channel 3 feeds the bottleneck
        assert idxs[block.cv2[0]] == sorted((idx, mirror))  # both chunks' channels, in concat positions


def test_pruning_zeroed_chunk_channels_keeps_the_output():
    net, x = _net(), torch.randn(2, 3, 16, 16)
    block = net[1]
    bn = block.cv1[1]
    with torch.no_grad():  # channel 5 of each chunk outputs SiLU(0) = 0: removing both must change nothing
        for c in (5, 5 + block.c):
            bn.weight[c] = 0.0
            bn.bias[c] = 0.0
        expected = net(x)
    graph = RobustDependencyGraph().build_dependency(net, example_inputs=x)
    graph.get_pruning_group(block.cv1[0], tp.prune_conv_out_channels, [5]).prune()
    assert block.cv1[0].out_channels == 30 and block.m[0][0].in_channels == 15 and block.cv2[0].in_channels == 62
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_c2f_prunes_without_freezing():
    net, x = _net(), torch.randn(1, 3, 16, 16)
    report = prune(net, x, ratio=0.5, importance=tp.importance.MagnitudeImportance())
    assert not report.frozen
    assert report.params_after < 0.6 * report.params_before
    for block in (net[1], net[2]):
        assert block.cv1[0].out_channels % 2 == 0
        assert block.m[0][0].in_channels == block.cv1[0].out_channels // 2
    assert net(x).shape == (1, 10)


def test_explicit_unequal_split_sizes_are_not_coupled():
    net, x = SplitBySizes().eval(), torch.randn(1, 3, 8, 8)
    graph = RobustDependencyGraph().build_dependency(net, example_inputs=x)
    idxs = _group_idxs(graph, net.stem[0], 2)
    assert idxs[net.stem[0]] == [2]
    assert idxs[net.a[0]] == [2] and net.b[0] not in idxs


def test_chunks_stay_equal_over_iterative_steps():
    from orthoreg_tp.adapters import build_pruner

    net, x = _net(), torch.randn(1, 3, 16, 16)
    pruner = build_pruner(net, x, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.6,
                          global_pruning=False, iterative_steps=3)
    widths = set()
    for _ in range(3):  # the chunk width changes every step: the coupling follows it
        pruner.step()
        assert net(x).shape == (1, 10)
        for block in (net[1], net[2]):
            step = block.m[0][0].in_channels
            assert step * 2 == block.cv1[0].out_channels
            idxs = _group_idxs(pruner.DG, block.cv1[0], 1)
            assert idxs[block.cv1[0]] == [1, 1 + step]  # coupled at the current chunk width
            widths.add(step)
    assert len(widths) >= 2  # the chunk width did change
