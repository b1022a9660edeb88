"""The OrthoReg trainer over ultralytics' own trainers: the step it takes, the optimizer it pins.

Real ultralytics trainers on a four-image dataset each test module writes (no mocks); skipped without
``ultralytics`` (installed by the ``dev`` extra). The tests on a set-up trainer share one (about 6 s to set up on
a 2-core CPU): slow tier.
"""

from __future__ import annotations

import copy

import pytest
import torch

ultralytics = pytest.importorskip("ultralytics")

# Importing ultralytics replaces PIL.Image.open process-wide; the rest of the test session gets Pillow's own back.
import PIL.Image  # noqa: E402
from ultralytics.utils import patches as _patches  # noqa: E402

PIL.Image.open = getattr(_patches, "_image_open", PIL.Image.open)

from conftest import write_yolo_dataset  # noqa: E402

from orthoreg_tp.integrations.ultralytics import (  # noqa: E402
    CLIP_NORM,
    orthoreg_trainer,
    sync_split_widths_,
    trainer_class,
    yolo_regularizer,
)
from orthoreg_tp.metrics import orthonormality  # noqa: E402

write_dataset = write_yolo_dataset  # the four-image dataset both YOLO test files train on


def _overrides(data: str, root, name: str) -> dict:
    return dict(data=data, epochs=1, imgsz=64, batch=2, workers=0, device="cpu", plots=False, amp=False,
                project=str(root / "runs"), name=name, exist_ok=True, verbose=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(folder, data YAML) of the four-image dataset."""
    root = tmp_path_factory.mktemp("yolo-data")
    return root, write_dataset(root)


@pytest.fixture(scope="module")
def trainer(dataset):
    """An OrthoReg DetectionTrainer set up as train() sets it up (optimizer, scaler, loaders, EMA), not run."""
    root, data = dataset
    torch.manual_seed(0)
    model = ultralytics.YOLO("yolov8n.yaml").model
    trainer = orthoreg_trainer("detect")(overrides=_overrides(data, root, "reg"), model=model, coefficient=0.1)
    trainer._setup_train()
    return trainer


def _backward_one_batch(trainer) -> dict[str, torch.Tensor]:
    trainer.optimizer.zero_grad()
    batch = trainer.preprocess_batch(next(iter(trainer.train_loader)))
    loss, _ = trainer.model(batch)
    trainer.scaler.scale(loss.sum()).backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _grads_at_step(trainer) -> dict[str, torch.Tensor]:
    """Run trainer.optimizer_step(); return the gradients the optimizer's step saw."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    seen = {}

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    seen[names[p]] = p.grad.clone()

    handle = trainer.optimizer.register_step_pre_hook(hook)
    try:
        trainer.optimizer_step()
    finally:
        handle.remove()
    return seen


@pytest.mark.slow
def test_the_step_sees_the_loss_gradient_plus_the_autograd_penalty_gradient(trainer):
    plain = _backward_one_batch(trainer)
    model = trainer.model
    reference = yolo_regularizer(model, trainer.coefficient)
    params = [p for n, p in model.named_parameters() if n in plain]
    penalty_grads = torch.autograd.grad(reference.penalty(), params, allow_unused=True)
    expected = {n: plain[n] + (g if g is not None else 0.0) for (n, _), g in
                zip([(n, p) for n, p in model.named_parameters() if n in plain], penalty_grads)}
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected.values()]))
    clip = min(1.0, CLIP_NORM / (float(total) + 1e-6))  # torch's clip_grad_norm_, which ultralytics applies after
    seen = _grads_at_step(trainer)
    assert seen.keys() == expected.keys()
    changed = 0
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad * clip, rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.allclose(plain[name] * clip, seen[name], atol=1e-6)
    assert changed >= 50  # the regularizer moved most conv layers' gradients (57 are regularized in yolov8n)


@pytest.mark.slow
def test_the_prediction_layers_are_not_regularized(trainer):
    head = trainer.model.model[-1]
    regularized = {id(m) for _, m in trainer._regularizer().layers}
    for branch in (*head.cv2, *head.cv3):
        last = [m for m in branch.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        assert id(last) not in regularized
        assert any(id(m) in regularized for m in branch.modules() if m is not last)
    assert id(head.dfl.conv) not in regularized


@pytest.mark.slow
def test_with_coefficient_zero_the_step_is_ultralytics_own(trainer):
    """Against BaseTrainer.optimizer_step on the same gradients and optimizer state (clip, step, EMA)."""
    _backward_one_batch(trainer)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    params = copy.deepcopy(trainer.model.state_dict())
    ema = copy.deepcopy(trainer.ema.ema.state_dict())
    optimizer, updates = copy.deepcopy(trainer.optimizer.state_dict()), trainer.ema.updates
    trainer.coefficient = 0.0
    try:
        trainer.optimizer_step()
    finally:
        trainer.coefficient = 0.1
    ours = ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.ema.ema.state_dict().items()})
    trainer.model.load_state_dict(params)
    trainer.ema.ema.load_state_dict(ema)
    trainer.optimizer.load_state_dict(optimizer)
    trainer.ema.updates = updates
    for n, p in trainer.model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    trainer_class("detect").optimizer_step(trainer)  # ultralytics' own
    for theirs, mine in zip((trainer.model.state_dict(), trainer.ema.ema.state_dict()), ours):
        for k, v in theirs.items():
            torch.testing.assert_close(mine[k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(params[k], v) for k, v in trainer.model.state_dict().items())  # a step was taken


@pytest.mark.slow
def test_the_optimizer_is_sgd_without_weight_decay(trainer):
    assert type(trainer.optimizer) is torch.optim.SGD
    assert all(group["weight_decay"] == 0.0 for group in trainer.optimizer.param_groups)
    # a long run would make ultralytics' "auto" pick MuSGD; the OrthoReg trainer keeps SGD
    long_run = dict(model=trainer.model, name="auto", lr=0.01, momentum=0.9, decay=5e-4, iterations=1e6)
    assert type(trainer.build_optimizer(**long_run)) is torch.optim.SGD
    assert type(trainer_class("detect").build_optimizer(trainer, **long_run)).__name__ == "MuSGD"


@pytest.mark.slow
def test_training_with_the_regularizer_raises_every_layers_orthonormality(dataset):
    """The same two epochs (same seed, SGD, four steps) with and without the regularizer, through train()."""
    root, data = dataset
    trained = {}
    for coefficient in (0.0, 1.0):
        torch.manual_seed(0)
        model = ultralytics.YOLO("yolov8n.yaml").model
        overrides = {**_overrides(data, root, f"ortho-{coefficient}"), "epochs": 2, "nbs": 2, "val": False}
        orthoreg_trainer("detect")(overrides=overrides, model=model, coefficient=coefficient).train()
        trained[coefficient] = orthonormality(model)
    layers = [name for name, _ in yolo_regularizer(model, 1.0).layers]
    assert all(trained[1.0][name] > trained[0.0][name] for name in layers)


@pytest.mark.parametrize("overrides, match", [
    ({"optimizer": "AdamW"}, "trains with SGD"),
    ({"weight_decay": 5e-4}, "without weight decay"),
], ids=["adamw", "weight-decay"])
def test_a_conflicting_optimizer_setting_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        orthoreg_trainer("detect")(overrides=overrides)


def test_the_yolo_wrapper_and_unknown_tasks_are_refused():
    with pytest.raises(TypeError, match=r"yolo\.model"):
        orthoreg_trainer("detect")(overrides={"data": "x.yaml"}, model=ultralytics.YOLO("yolov8n.yaml"))
    with pytest.raises(ValueError, match="task must be one of"):
        orthoreg_trainer("depth-of-field")
    with pytest.raises(ValueError, match="coefficient"):
        orthoreg_trainer("detect")(overrides={}, coefficient=-1.0)


@pytest.mark.parametrize("task", ["detect", "segment", "pose", "classify", "obb"])
def test_every_task_gets_a_subclass_of_its_ultralytics_trainer(task):
    cls = orthoreg_trainer(task)
    assert issubclass(cls, trainer_class(task)) and cls.__name__ == f"OrthoReg{trainer_class(task).__name__}"
    assert orthoreg_trainer(task) is cls  # made once


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_split_widths_follow_the_pruned_first_convolution(cfg):
    """Ultralytics' export runs C2f-family blocks through forward_split, which splits by the stored width ``c``:
    prune()'s ultralytics fix-up keeps it in step with the pruned cv1; sync_split_widths_ repairs a hand prune."""
    import torch_pruning as tp
    from orthoreg_tp.adapters import prune
    from ultralytics.nn.modules.block import C2f

    model = ultralytics.YOLO(cfg).model.eval()
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, C2f)}
    widths = {name: m.c for name, m in blocks.items()}
    prune(model, torch.randn(1, 3, 64, 64), ratio=0.5, importance=tp.importance.MagnitudeImportance())
    assert any(m.c != widths[name] for name, m in blocks.items())  # the widths did change
    with torch.no_grad():
        for m in blocks.values():
            assert 2 * m.c == m.cv1.conv.out_channels
            x = torch.randn(1, m.cv1.conv.in_channels, 8, 8)
            torch.testing.assert_close(m.forward_split(x), m.forward(x))
    stale = sorted(name for name, m in blocks.items() if m.c != widths[name])[:2]
    for name in stale:  # as plain torch-pruning leaves them
        blocks[name].c = widths[name]
    assert sorted(sync_split_widths_(model)) == stale
    assert sync_split_widths_(model) == []
