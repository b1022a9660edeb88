"""``recalibrate_bn_``: BN statistics re-estimated after a prune, nothing else changed."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from orthoreg_tp.engine.training import recalibrate_bn_

CPU = torch.device("cpu")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_statistics_are_the_average_over_the_batches_and_weights_untouched():
    net = _net().eval()
    batches = [(torch.randn(16, 3, 8, 8) * 2 + 1, torch.zeros(16)) for _ in range(3)]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_bn_(net, batches, device=CPU, batches=2) == 2
    # reference: the first BN's input over the two batches; momentum=None averages the per-batch statistics
    with torch.no_grad():
        acts = [net[0](x) for x, _ in batches[:2]]
    expected_mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    torch.testing.assert_close(net[1].running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    assert not net.training and net[1].momentum == 0.1 and net[4].momentum == 0.1


def test_recalibration_recovers_a_pruned_network_evaluated_with_stale_statistics():
    net = _net()
    data = [(torch.randn(32, 3, 8, 8), torch.zeros(32)) for _ in range(4)]
    net.train()
    with torch.no_grad():
        for x, _ in data * 5:
            net(x)  # running statistics of the dense network
    pruner = tp.pruner.MetaPruner(net, torch.randn(1, 3, 8, 8), importance=tp.importance.RandomImportance(),
                                  pruning_ratio=0.5, ignored_layers=[net[-1]])
    pruner.step()
    x = data[0][0]
    with torch.no_grad():
        net.train()
        batch_stats_out = net[:5](x)  # what the pruned network computes with its own statistics
        net.eval()
        stale = (net[:5](x) - batch_stats_out).abs().mean()
        recalibrate_bn_(net, data, device=CPU, batches=4)
        fresh = (net[:5](x) - batch_stats_out).abs().mean()
    assert fresh < stale


def test_no_batch_norm_and_bad_batches():
    net = nn.Sequential(nn.Linear(2, 2))
    assert recalibrate_bn_(net, [(torch.randn(1, 2), None)], device=CPU) == 0
    with pytest.raises(ValueError, match="batches"):
        recalibrate_bn_(_net(), [], device=CPU, batches=0)
