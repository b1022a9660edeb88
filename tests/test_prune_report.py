"""What a PruneReport says: MACs per sample as torch-pruning counts them, blocks the forward never uses."""

import pytest
import torch
import torch_pruning as tp
import torchvision
from orthoreg_tp.adapters import count_macs_params, prune
from torch import nn


def magnitude():
    return tp.importance.GroupMagnitudeImportance()


def test_macs_are_per_sample_as_torch_pruning_counts_them():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    seen = set()
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        tp_macs, _ = tp.utils.count_ops_and_params(model, x)
        report = prune(model, x, importance=magnitude(), ratio=0.5, dry_run=True)
        # torch-pruning also counts BN, ReLU and pooling; the project counts conv/linear/attention projections
        assert report.macs_before == pytest.approx(tp_macs, rel=0.01)
        assert count_macs_params(model, x)[0] == report.macs_before
        seen.add((report.macs_before, report.macs_after))
    assert len(seen) == 1  # the same figures for a batch of 1 and of 4


class WithUnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.deep = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))  # built, never called
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


def test_blocks_the_forward_never_uses_are_named_and_left_unpruned():
    model = WithUnusedBranch()
    report = prune(model, torch.randn(1, 3, 8, 8), importance=magnitude(), ratio=0.5)
    assert report.unused == ("deep (1,168 parameters)",)
    assert "never used by the forward: deep" in str(report)
    assert [m.out_channels for m in model.deep] == [8, 8] and model.stem.out_channels == 4


def test_a_model_whose_forward_uses_everything_reports_nothing_unused():
    report = prune(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), torch.randn(1, 3, 8, 8),
                   importance=magnitude(), ratio=0.5)
    assert report.unused == ()


@pytest.mark.slow
def test_pspnet_reports_the_encoder_stages_its_forward_skips():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.PSPNet("resnet34", encoder_weights=None, classes=2)  # encoder_depth=3: layer3/layer4 never run
    report = prune(model, torch.randn(1, 3, 64, 64), importance=magnitude(), ratio=0.5)
    assert [u.split(" ")[0] for u in report.unused] == ["encoder.layer3", "encoder.layer4"]
    assert report.params_fraction > 0.9  # most weights sit in the unused stages, as the report now says


def _frozen_first_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def _old_build(model):  # what prune() did before: every parameter left requiring grad from the graph build on
    import contextlib

    for p in model.parameters():
        p.requires_grad_(True)
    return contextlib.nullcontext()


@pytest.mark.parametrize("old", [False, True], ids=["now", "before"])
def test_an_importance_accumulated_with_frozen_parameters_ranks_them_as_frozen(monkeypatch, old):
    from orthoreg_tp.adapters._internal import session

    from orthoreg_tp import OrthoRegImportance

    if old:
        monkeypatch.setattr(session, "requires_grad_all", _old_build)
    model, x, y = _frozen_first_conv(), torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
    imp = OrthoRegImportance()
    imp.accumulate(model, [(x, y)], progress=False)
    if old:
        with pytest.raises(RuntimeError, match="accumulat"):
            prune(model, x[:1], importance=imp, ratio=0.5)
        return
    report = prune(model, x[:1], importance=imp, ratio=0.5)
    assert report.params_after < report.params_before
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
