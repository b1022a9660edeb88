import pytest
import torch
from torch import nn

from orthoreg_tp.latency import compare_latency, measure_latency


def test_interleaved_medians_order_models_by_work():
    torch.manual_seed(0)
    x = torch.randn(128, 512)
    heavy = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))  # ~128x the multiply-adds of `light`
    light = nn.Sequential(nn.Linear(512, 4), nn.Linear(4, 4))
    dense, pruned = compare_latency([heavy, light], x, repeats=7, warmup=1)
    assert pruned.median_ms < 0.5 * dense.median_ms
    assert (dense.samples, dense.interleaved_with, dense.batch_size, dense.device) == (7, 2, 128, "cpu")
    assert dense.to_dict()["clock"] == "cpu-process-time"


def test_modes_are_restored_and_inputs_unpacked():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, a, b):
            return self.drop(a) + b

    model = TwoInputs().train()
    model.drop.eval()
    m = measure_latency(model, (torch.ones(3, 2), torch.ones(3, 2)), repeats=2, warmup=1)
    assert m.samples == 2 and m.batch_size == 3
    assert model.training and not model.drop.training
    kw = measure_latency(model, {"a": torch.ones(1), "b": torch.ones(1)}, repeats=1, warmup=0)
    assert kw.batch_size is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"repeats": True}, "repeats")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare_latency([nn.Identity()], torch.zeros(1), **kwargs)
    with pytest.raises(ValueError, match="at least one model"):
        compare_latency([], torch.zeros(1))
