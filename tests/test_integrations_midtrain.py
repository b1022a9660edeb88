"""OrthoRegTraining (what both callbacks share) in a hand-written loop: window, scaled gradients, prune, errors."""

import copy

import pytest
import torch
from torch import nn

from orthoreg_tp.integrations import OrthoRegTraining, load_pruned_checkpoint, pruning_history

X = torch.randn(2, 3, 8, 8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))


def _backward(model, scale=1.0):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    (nn.functional.cross_entropy(model(x), y) * scale).backward()


def test_window_is_the_last_steps_of_the_pruning_epoch():
    state = OrthoRegTraining(prune_epoch=1, ratio=0.5, example_inputs=X, importance_batches=2)
    assert [state.in_window(1, s, 5) for s in range(5)] == [False, False, False, True, True]
    assert not state.in_window(0, 4, 5) and not state.in_window(1, 4, float("inf"))


def test_hand_loop_prunes_and_the_optimizer_follows():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = OrthoRegTraining(coefficient=1e-2, prune_epoch=0, ratio=0.5, example_inputs=X, importance_batches=2)
    state.start(model)
    for step in range(3):
        opt.zero_grad()
        _backward(model)
        state.before_step(epoch=0, step=step, steps_in_epoch=3, num_samples=4)
        opt.step()
    assert state.should_prune(0)
    report = state.prune([opt])
    assert report.params_after < report.params_before and state.pruned and not state.should_prune(0)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert state.state_dict()["history"] == [list(h) for h in report.history]
    w = model[2].weight.detach().clone()
    opt.zero_grad()
    _backward(model)
    state.before_step(epoch=1, step=0, steps_in_epoch=3, num_samples=4)  # the regularizer follows the new shapes
    opt.step()
    assert not torch.equal(w, model[2].weight)

    ckpt = {"state_dict": model.state_dict(), "orthoreg_tp": state.state_dict()}
    fresh = load_pruned_checkpoint(_model(), ckpt, X)
    torch.testing.assert_close(fresh(X), model(X))


def test_scaled_gradients_give_the_same_importance():
    scores = []
    for scale in (None, 2.0**10):
        model = _model()
        state = OrthoRegTraining(coefficient=0.0, prune_epoch=0, ratio=0.5, example_inputs=X, importance_batches=1)
        state.start(model)
        _backward(model, 1.0 if scale is None else scale)
        grads = [p.grad.clone() for p in model.parameters()]
        state.before_step(epoch=0, step=0, steps_in_epoch=1, num_samples=4, scale=scale)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))  # left as they were
        scores.append([state.importance.stats.mean(p).clone() for p in model.parameters()])
    for a, b in zip(*scores):
        torch.testing.assert_close(a, b)


def test_non_finite_gradients_are_not_accumulated():
    model = _model()
    state = OrthoRegTraining(coefficient=0.0, prune_epoch=0, ratio=0.5, example_inputs=X, importance_batches=1)
    state.start(model)
    _backward(model)
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    state.before_step(epoch=0, step=0, steps_in_epoch=1, num_samples=4)
    with pytest.raises(RuntimeError, match="no importance was accumulated"):
        state.prune([])
    assert model[0].out_channels == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"importance_batches": 0}, "importance_batches"),
        ({"prune_epoch": -1, "ratio": 0.5, "example_inputs": X}, "prune_epoch"),
        ({"prune_epoch": 0, "ratio": 0.5, "target": ("macs", 0.5), "example_inputs": X}, "exactly one"),
        ({"target": ("macs", 0.5)}, "need prune_epoch"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthoRegTraining(**kwargs)


def test_checkpoint_helpers_report_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        pruning_history(tmp_path / "nope.ckpt")
    assert pruning_history(tmp_path) == []  # a checkpoint folder written before any prune
    model = _model()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pruned_checkpoint(copy.deepcopy(model), tmp_path, X)


def test_transformers_callback_adopts_a_checkpoint_history(tmp_path):
    pytest.importorskip("transformers")
    from orthoreg_tp.integrations.transformers import OrthoRegCallback

    (tmp_path / "orthoreg_tp.json").write_text('{"history": [["0", true, [1, 2]]], "pruned": true}')
    cb = OrthoRegCallback(prune_epoch=0, ratio=0.5, example_inputs=X).load_history(tmp_path)
    assert cb.core.history == [["0", True, [1, 2]]] and not cb.core.should_prune(0)
