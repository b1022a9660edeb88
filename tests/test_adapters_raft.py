"""RAFT (torchvision optical flow): the split hidden state and the correlation volume keep their widths."""

import torch
import torch_pruning as tp
import torchvision
from orthoreg_tp.adapters import prune


def test_raft_small_prunes_without_repairs():
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small().eval()
    images = [torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)]  # RAFT needs >= 128 pixels
    report = prune(model, images, importance=tp.importance.GroupMagnitudeImportance(), ratio=0.5)
    assert report.frozen == ()  # no block needed the repair loop
    assert report.params_after < 0.9 * report.params_before
    assert model.context_encoder.conv.out_channels == 160  # hidden state (96) + context (64) kept
    with torch.no_grad():
        flows = model(*images, num_flow_updates=2)
    assert flows[-1].shape == (1, 2, 128, 128) and torch.isfinite(flows[-1]).all()
