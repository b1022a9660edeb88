"""attach(): the OrthoReg gradient before every optimizer step, in the units GradScaler leaves the gradients in."""

import copy

import pytest
import torch
from torch import nn

from orthoreg_tp import OrthoRegularizer
from orthoreg_tp.integrations import attach, base_optimizer, grad_scale_of


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def _loss(model):
    x, y = _batch()
    return nn.functional.cross_entropy(model(x), y)


def _reference(opt_fn, steps=2, coefficient=0.5, every=1):
    """Hand-written loop: backward, regularize(), step."""
    model = _model()
    opt = opt_fn(model.parameters())
    reg = OrthoRegularizer(model, coefficient, every=every)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model).backward()
        reg.regularize(model)
        opt.step()
    return model


def _attached(opt_fn, steps=2, coefficient=0.5, every=1, scaler=None, unscale_first=False):
    model = _model()
    opt = opt_fn(model.parameters())
    handle = attach(opt, model, coefficient=coefficient, every=every, scaler=scaler)
    for _ in range(steps):
        opt.zero_grad()
        if scaler is None:
            _loss(model).backward()
            opt.step()
        else:
            scaler.scale(_loss(model)).backward()
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    assert handle.steps == steps
    return model


def _plain(opt_fn, steps=2):
    return _reference(opt_fn, steps, coefficient=0.0)


def _assert_same(a, b, atol=1e-6):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=n)


def _assert_differs(a, b):
    assert any(not torch.allclose(p, q, atol=1e-4) for p, q in zip(a.parameters(), b.parameters()))


SGD = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
ADAM = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731


@pytest.mark.parametrize("opt_fn", [SGD, ADAM], ids=["sgd", "adam"])
def test_attach_equals_hand_written_loop(opt_fn):
    ref = _reference(opt_fn)
    _assert_same(_attached(opt_fn), ref)
    _assert_differs(ref, _plain(opt_fn))  # the regularizer's gradient matters at this coefficient


def test_every_matches_the_regularizer_semantics():
    ref = _reference(SGD, steps=3, every=2)
    _assert_same(_attached(SGD, steps=3, every=2), ref)
    _assert_differs(ref, _reference(SGD, steps=3, every=1))


def test_remove_stops_regularizing():
    model, plain = _model(), _plain(SGD, steps=1)
    opt = SGD(model.parameters())
    attach(opt, model, coefficient=0.5).remove()
    _loss(model).backward()
    opt.step()
    _assert_same(model, plain)


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0**10)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler.step", "unscale_-then-step"])
@pytest.mark.parametrize("opt_fn", [SGD, ADAM], ids=["sgd", "adam"])
def test_grad_scaler_gives_the_unscaled_update(opt_fn, unscale_first):
    _assert_same(_attached(opt_fn, scaler=_scaler(), unscale_first=unscale_first), _reference(opt_fn), atol=1e-5)


FUSED_SGD = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)  # noqa: E731
FUSED_ADAMW = lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)  # noqa: E731


def _fused_supported() -> bool:
    try:
        opt = FUSED_SGD(nn.Linear(2, 2).parameters())
    except (RuntimeError, ValueError):
        return False
    return bool(getattr(opt, "_step_supports_amp_scaling", False))


@pytest.mark.skipif(not _fused_supported(), reason="this torch build has no fused SGD/AdamW on CPU")
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled-in-kernel", "unscale_-then-step"])
@pytest.mark.parametrize("opt_fn", [FUSED_SGD, FUSED_ADAMW], ids=["fused-sgd", "fused-adamw"])
def test_fused_optimizer_gets_the_gradient_in_scaled_units(opt_fn, unscale_first):
    ref = _reference(opt_fn)
    _assert_same(_attached(opt_fn, scaler=_scaler(), unscale_first=unscale_first), ref, atol=1e-5)
    # what adding the plain gradient to the still-scaled ones would give (regularizer 1/scale too weak)
    _assert_differs(ref, _reference(opt_fn, coefficient=0.5 / 2.0**10))


@pytest.mark.skipif(not _fused_supported(), reason="this torch build has no fused SGD on CPU")
def test_fused_step_outside_the_scaler_raises():
    model = _model()
    opt, scaler = FUSED_SGD(model.parameters()), _scaler()
    attach(opt, model, scaler=scaler)
    scaler.scale(_loss(model)).backward()
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.step()


def test_grad_scale_is_read_only_inside_scaler_step():
    model = _model()
    opt = SGD(model.parameters())
    assert grad_scale_of(opt) is None


def test_wrappers_and_bad_arguments():
    model = _model()
    opt = SGD(model.parameters())

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps the optimizer as .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    assert base_optimizer(Wrapper(opt)) is opt
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        base_optimizer(object())
    with pytest.raises(ValueError, match="scaler"):
        attach(opt, model, scaler="fp16")
    with pytest.raises(ValueError, match="every"):
        attach(opt, copy.deepcopy(model), every=0)


def test_accelerate_prepared_optimizer_is_unwrapped():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer run earlier in the session left bf16 set
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="no")
    model = _model()
    model, opt = accelerator.prepare(model, SGD(model.parameters()))
    handle = attach(opt, model, coefficient=0.5)
    assert handle.optimizer is opt.optimizer
    for _ in range(2):
        opt.zero_grad()
        accelerator.backward(_loss(model))
        opt.step()
    _assert_same(model, _reference(SGD))
