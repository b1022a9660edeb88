"""OrthoReg inside ultralytics' own trainers: a trainer subclass that regularizes every optimizer step.

Ultralytics offers no hook between ``backward()`` and the optimizer step: ``BaseTrainer.optimizer_step()`` never
fires its ``optimizer_step`` callback event and ``on_train_batch_end`` runs after ``zero_grad()``. The trainers
built here override ``optimizer_step()``: unscale the gradients (AMP), add the OrthoReg gradient
(:meth:`~orthoreg_tp.OrthoRegularizer.regularize`), then clip, step, update the scaler, zero the gradients and
update the EMA copy exactly as ultralytics does.

The regularized phase trains with plain SGD and no weight decay (the method's rule; ultralytics' default
``optimizer=auto`` picks ``MuSGD`` for long runs, whose update orthogonalizes conv gradients itself). The layers
the pruning keeps whole (the prediction convolutions of the head, the DFL, YOLO11's attention, a classifier's
last linear layer; :func:`orthoreg_tp.adapters.prepare`'s ``ignored_layers``) are not regularized, as the paper
leaves the classifier alone.

Nothing here imports ultralytics at module import: the trainer classes are made on first use.

Example:
    >>> from orthoreg_tp.integrations.ultralytics import orthoreg_trainer  # doctest: +SKIP
    >>> from ultralytics import YOLO  # doctest: +SKIP
    >>> yolo = YOLO("yolov8n.pt")  # doctest: +SKIP
    >>> Trainer = orthoreg_trainer(yolo.task)  # OrthoRegDetectionTrainer  # doctest: +SKIP
    >>> trainer = Trainer(overrides=dict(data="my.yaml", epochs=50, imgsz=640), model=yolo.model,
    ...                   coefficient=1e-2)  # doctest: +SKIP
    >>> trainer.train()  # trains yolo.model as it is (also a pruned one), saves trainer.best  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import nn

from ..regularizer import OrthoRegularizer

# task -> (module, class) of ultralytics' trainer for it
TASK_TRAINERS: dict[str, tuple[str, str]] = {
    "detect": ("ultralytics.models.yolo.detect", "DetectionTrainer"),
    "segment": ("ultralytics.models.yolo.segment", "SegmentationTrainer"),
    "pose": ("ultralytics.models.yolo.pose", "PoseTrainer"),
    "classify": ("ultralytics.models.yolo.classify", "ClassificationTrainer"),
    "obb": ("ultralytics.models.yolo.obb", "OBBTrainer"),
}
CLIP_NORM = 10.0  # ultralytics' BaseTrainer.optimizer_step clips the gradient norm at 10
PINNED_OPTIMIZER = "SGD"  # the regularized phase: SGD (ultralytics' "auto" may pick MuSGD)


def trainer_class(task: str) -> type:
    """Ultralytics' own trainer class for a task (``"detect"``, ``"segment"``, ``"pose"``, ``"classify"``, ``"obb"``).

    Raises:
        ValueError: An unknown task.

    Example:
        >>> trainer_class("detect").__name__  # doctest: +SKIP
        'DetectionTrainer'
    """
    if task not in TASK_TRAINERS:
        raise ValueError(f"task must be one of {sorted(TASK_TRAINERS)}, got {task!r}")
    module, name = TASK_TRAINERS[task]
    return getattr(importlib.import_module(module), name)


def check_module(model: Any) -> nn.Module:
    """The ``nn.Module`` to train: refuses ultralytics' ``YOLO`` wrapper (its forward runs the predictor).

    Raises:
        TypeError: ``model`` is the wrapper or not a module.

    Example:
        >>> check_module(nn.Linear(2, 2))
        Linear(in_features=2, out_features=2, bias=True)
    """
    if hasattr(model, "predictor") and isinstance(getattr(model, "model", None), nn.Module):
        raise TypeError(f"pass the module inside the YOLO wrapper (yolo.model), got {type(model).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (yolo.model), got {type(model).__name__}")
    return model


def sync_split_widths_(model: nn.Module) -> list[str]:
    """Set each pruned split block's half width ``c`` from its first convolution, in place; returns their names.

    :func:`orthoreg_tp.adapters.prune` does this itself (a fix-up of the ultralytics adapter); call it after
    pruning a YOLO model with plain torch-pruning, before exporting (ultralytics' export splits C2f-family blocks
    by ``c``).

    Example:
        >>> sync_split_widths_(nn.Sequential(nn.Conv2d(3, 4, 1)))
        []
    """
    from orthoreg_tp.adapters.libraries.ultralytics_models import sync_split_width

    return [name for name, m in model.named_modules() if sync_split_width(m)]


def yolo_regularizer(model: nn.Module, coefficient: float, **options: Any) -> OrthoRegularizer:
    """An :class:`~orthoreg_tp.OrthoRegularizer` over a YOLO module, sparing the layers pruning keeps whole.

    The spared layers are :func:`orthoreg_tp.adapters.prepare`'s ``ignored_layers`` (traced once on a 64x64
    input): the prediction convolutions, the DFL, YOLO11's attention, a classifier's linear layer.

    Args:
        model: The YOLO ``nn.Module`` (``yolo.model``), unwrapped.
        coefficient: ``lambda``.
        **options: More :class:`~orthoreg_tp.OrthoRegularizer` keywords (``norm``, ``every``, ...).

    Example:
        >>> reg = yolo_regularizer(YOLO("yolov8n.yaml").model, 1e-2)  # doctest: +SKIP
    """
    from ..adapters import prepare

    param = next(model.parameters())
    channels = int(_yaml(model).get("channels", 3))
    example = torch.zeros(1, channels, 64, 64, device=param.device, dtype=param.dtype)
    spec = prepare(model, example)
    ignored = list(options.pop("ignored_layers", ())) + list(spec.ignored_layers)
    return OrthoRegularizer(model, coefficient, ignored_layers=ignored, **options)


class OrthoRegTrainerMixin:
    """Mixed in before an ultralytics trainer class by :func:`orthoreg_trainer`; not used on its own.

    Args:
        cfg: Ultralytics' configuration (default: its ``DEFAULT_CFG``).
        overrides: Ultralytics' options (``data``, ``epochs``, ``imgsz``, ``batch``, ``device``...).
            ``optimizer`` must be ``"SGD"``, ``"auto"`` or unset and ``weight_decay`` 0 or unset: SGD without
            weight decay is pinned.
        _callbacks: Ultralytics' callbacks.
        model: An ``nn.Module`` to train as it is (``yolo.model``, pruned or not); ``None``: ultralytics builds
            one from ``overrides["model"]``.
        coefficient: OrthoReg's ``lambda`` (0 trains as the plain trainer would, with SGD kept).
        regularizer_options: More :class:`~orthoreg_tp.OrthoRegularizer` keywords (``every``, ``norm``, ...).

    Attributes:
        regularizer: The :class:`~orthoreg_tp.OrthoRegularizer`, built at the first optimizer step.
    """

    def __init__(self, cfg: Any = None, overrides: dict[str, Any] | None = None, _callbacks: dict | None = None,
                 *, model: nn.Module | None = None, coefficient: float = 1e-2,
                 regularizer_options: dict[str, Any] | None = None) -> None:
        if not float(coefficient) >= 0.0:
            raise ValueError(f"coefficient must be a non-negative number, got {coefficient!r}")
        overrides = _pinned_overrides(overrides, model)
        if cfg is None:
            from ultralytics.cfg import DEFAULT_CFG

            cfg = DEFAULT_CFG
        super().__init__(cfg, overrides, _callbacks)  # type: ignore[call-arg]
        self.coefficient = float(coefficient)
        self.regularizer_options = dict(regularizer_options or {})
        self.regularizer: OrthoRegularizer | None = None
        if getattr(self, "ddp", False):
            raise ValueError("OrthoReg trainers run on one device: ultralytics' multi-GPU mode re-launches the "
                             f"trainer in new processes without the model or the regularizer; got device="
                             f"{self.args.device!r}")
        if model is not None:
            self.model = check_module(model)

    def build_optimizer(self, model: nn.Module, name: str = "auto", lr: float = 0.001, momentum: float = 0.9,
                        decay: float = 1e-5, iterations: float = 1e5) -> torch.optim.Optimizer:
        """Ultralytics' optimizer construction with the optimizer pinned to SGD and no weight decay."""
        return super().build_optimizer(model, name=PINNED_OPTIMIZER,  # type: ignore[misc]
                                       lr=lr, momentum=momentum, decay=0.0, iterations=iterations)

    def optimizer_step(self) -> None:
        """Unscale, add the OrthoReg gradient, then ultralytics' clip, step, scaler update, zero_grad and EMA."""
        self.scaler.unscale_(self.optimizer)
        if self.coefficient > 0.0:
            self._regularizer().regularize()
        foreach = {"foreach": False} if self.device.type == "npu" else {}  # as ultralytics does on NPU
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=CLIP_NORM, **foreach)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def _regularizer(self) -> OrthoRegularizer:
        from ultralytics.utils.torch_utils import unwrap_model

        module = unwrap_model(self.model)
        if self.regularizer is None or self.regularizer.model is not module:
            self.regularizer = yolo_regularizer(module, self.coefficient, **self.regularizer_options)
        return self.regularizer


def _pinned_overrides(overrides: dict[str, Any] | None, model: nn.Module | None) -> dict[str, Any]:
    overrides = dict(overrides or {})
    name = overrides.get("optimizer", "auto")
    if str(name).lower() not in ("auto", "sgd"):
        raise ValueError(f"the regularized phase trains with SGD (OrthoReg's rule); got optimizer={name!r}")
    decay = overrides.get("weight_decay", 0.0)
    if decay:
        raise ValueError(f"the regularized phase trains without weight decay (OrthoReg's rule); got "
                         f"weight_decay={decay!r}")
    overrides.update(optimizer=PINNED_OPTIMIZER, weight_decay=0.0)
    if model is not None and "model" not in overrides:  # ultralytics reads a name from it (records, save dir)
        overrides["model"] = str(_yaml(check_module(model)).get("yaml_file") or type(model).__name__)
    return overrides


def _yaml(model: nn.Module) -> dict[str, Any]:
    yaml = getattr(model, "yaml", None)
    return yaml if isinstance(yaml, dict) else {}


@functools.cache
def orthoreg_trainer(task: str | type = "detect") -> type:
    """An ultralytics trainer class that trains with the OrthoReg regularizer.

    The class subclasses ultralytics' own trainer for the task (``DetectionTrainer``, ``SegmentationTrainer``,
    ``PoseTrainer``, ``ClassificationTrainer``, ``OBBTrainer``, or any trainer class given) and takes its
    arguments plus ``model=``, ``coefficient=`` and ``regularizer_options=`` (see :class:`OrthoRegTrainerMixin`).

    Args:
        task: A task name (``yolo.task``) or an ultralytics trainer class.

    Raises:
        ValueError: An unknown task.

    Example:
        >>> Trainer = orthoreg_trainer("detect")  # doctest: +SKIP
        >>> Trainer.__name__  # doctest: +SKIP
        'OrthoRegDetectionTrainer'
    """
    base = task if isinstance(task, type) else trainer_class(task)
    return type(f"OrthoReg{base.__name__}", (OrthoRegTrainerMixin, base), {"__module__": __name__})
