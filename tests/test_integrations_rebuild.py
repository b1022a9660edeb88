"""kept_flat_indices / remap_optimizer_: an optimizer built before a prune keeps working, its state sliced."""

import copy

import pytest
import torch
from orthoreg_tp.adapters import replay
from torch import nn

from orthoreg_tp.integrations import kept_flat_indices, remap_optimizer_
from orthoreg_tp.integrations.rebuild import to_float64

KEEP = [0, 2, 3, 5]  # channels 1 and 4 of the first conv go
HISTORY = [["0", True, [1, 4]]]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


X = torch.randn(2, 3, 8, 8)


def test_kept_flat_indices_of_a_hand_pruned_conv():
    model = _model()
    kept = kept_flat_indices(model, X, HISTORY)
    assert set(kept) == {"0.weight", "0.bias", "2.weight"}  # the second conv's bias and the linear keep all
    assert torch.equal(kept["0.weight"], torch.arange(6 * 3 * 9).view(6, 3, 3, 3)[KEEP].flatten())
    assert torch.equal(kept["0.bias"], torch.tensor(KEEP))
    assert torch.equal(kept["2.weight"], torch.arange(4 * 6 * 9).view(4, 6, 3, 3)[:, KEEP].flatten())
    assert model[0].out_channels == 6  # the model itself is not touched


def _trained(opt_fn, steps=2):
    model = _model()
    opt = opt_fn(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(
    ("opt_fn", "keys"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), ["momentum_buffer"]),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2), ["exp_avg", "exp_avg_sq"]),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_remap_slices_the_state_and_keeps_training(opt_fn, keys):
    model, opt = _trained(opt_fn)
    before, old = copy.deepcopy(model), dict(model.named_parameters())
    old_state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in old.items()}
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    replay(model, X, HISTORY)
    kept = kept_flat_indices(before, X, HISTORY)
    assert remap_optimizer_(opt, old, model, kept) == 3
    new = dict(model.named_parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in new.values()}
    for key in keys:
        torch.testing.assert_close(opt.state[new["0.weight"]][key], old_state["0.weight"][key][KEEP])
        torch.testing.assert_close(opt.state[new["2.weight"]][key], old_state["2.weight"][key][:, KEEP])
        torch.testing.assert_close(opt.state[new["4.weight"]][key], old_state["4.weight"][key])
    if "step" in old_state["0.weight"]:
        assert float(opt.state[new["0.weight"]]["step"]) == float(old_state["0.weight"]["step"])
    w = model[0].weight.detach().clone()
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()
    sched.step()
    assert not torch.equal(model[0].weight, w)  # the optimizer updates the new (pruned) parameter
    assert opt.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] * 0.5)


def test_state_of_unknown_shape_is_dropped_with_a_warning():
    model, opt = _trained(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    before, old = copy.deepcopy(model), dict(model.named_parameters())
    opt.state[old["0.weight"]]["factored"] = torch.zeros(6, 27)
    replay(model, X, HISTORY)
    with pytest.warns(UserWarning, match="starts afresh"):
        remap_optimizer_(opt, old, model, kept_flat_indices(before, X, HISTORY))
    assert model[0].weight not in opt.state


def test_to_float64_keeps_integer_inputs():
    out = to_float64((torch.zeros(1), {"ids": torch.zeros(1, dtype=torch.long)}))
    assert out[0].dtype == torch.float64 and out[1]["ids"].dtype == torch.long
