"""The recipes' configuration: one dataclass, the ``paper`` and ``quick`` presets, and their command line.

Every field can be set on the command line; the preset only fills what was not given. The resolved config is
written to ``config.json`` and stored in every checkpoint.

Example:
    >>> cfg = RecipeConfig(recipe="iterative", preset="paper", model="vgg13", dataset="cifar100").resolved()
    >>> cfg.batch_size, str(cfg.schedule("base")), cfg.coefficient
    (128, '0.1:80,0.01:40,0.001:40', 0.01)
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..floor import NORMALIZERS
from .data import DATASETS, IN_MEMORY
from .distill import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
from .distributed import DEVICES
from .methods import METHODS
from .training import LR_SHAPES, OPTIMIZERS, LRSchedule

RECIPES: tuple[str, ...] = ("iterative", "early_bird")
MAX_PERCENT = 95.0  # the per-layer floor keeps >5% of every layer, so at most 95% of filters can go

# Phases (docs/method.md, section 4): base = dense training; ortho = regularized training before the first estimate;
# retrain = baseline retraining after a round; ortho_retrain + ortho_finetune = OrthoReg's between rounds;
# eb_train = early-bird training (regularized for OrthoReg); eb_retrain = training the early-bird ticket.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "phases": {
            "base": "0.1:80,0.01:40,0.001:40",
            "ortho": "0.1:24,0.01:1",
            "retrain": "0.1:40,0.01:40,0.001:20",
            "ortho_retrain": "0.1:35,0.01:35,0.001:10",
            "ortho_finetune": "0.1:24,0.01:1",
            "eb_train": "0.1:24,0.01:1",
            "eb_retrain": "0.1:60,0.01:40,0.001:40",
        },
        "batch_size": 128,  # the paper's SGD batch
        "importance_samples": 10_000,  # ~10,000 training samples for the averaged gradient
    },
    "quick": {  # digits + tiny_cnn: a whole recipe in a couple of CPU minutes
        "phases": {
            "base": "0.1:8,0.01:4",
            "ortho": "0.1:4,0.01:1",
            "retrain": "0.1:3,0.01:2,0.001:1",
            "ortho_retrain": "0.1:3,0.01:2,0.001:1",
            "ortho_finetune": "0.1:2,0.01:1",
            "eb_train": "0.1:12,0.01:3",  # long enough for --eb-detect (patience 5) to stop it early
            "eb_retrain": "0.1:6,0.01:4,0.001:2",
        },
        "batch_size": 64,  # digits has 1,437 training images: smaller batches, more steps per epoch
        "importance_samples": 1_000,
    },
}


@dataclass
class RecipeConfig:
    """Everything a recipe run depends on (``None`` = take the preset's or the model's default).

    Example:
        >>> RecipeConfig(prune_percent=120.0).validate()
        Traceback (most recent call last):
        ...
        ValueError: prune_percent must be in [0, 95], got 120.0
    """

    recipe: str = "iterative"
    preset: str = "quick"
    # model and data
    model: str = "tiny_cnn"  # any registered model, or timm:NAME / torchvision:NAME
    dataset: str = "digits"  # the offline default
    data_path: str | None = None
    download: bool = True
    image_size: int | None = None  # dataset default: 16 digits, 32 CIFAR and chars, 64 otherwise
    in_chans: int = 3
    # starting weights (default: random); a trained start skips the base phase unless train_base
    pretrained: bool = False  # timm / torchvision weights (user's cache or the network)
    checkpoint: str | None = None  # a state dict, or a pruned checkpoint of this project
    train_base: bool = False
    # method and budget
    method: str = "orthoreg"
    prune_percent: float = 50.0  # % of filters removed at the end
    rounds: int = 1
    thresholds: list[float] | None = None  # cumulative % per round, instead of prune_percent + rounds
    target_macs: float | None = None  # fraction of dense MACs to end at, instead of prune_percent
    target_latency: float | None = None  # fraction of the dense model's measured latency to end at
    round_to: int | str | None = None  # keep pruned widths multiples of this (faster kernels); "auto": fastest
    normalizer: str | None = None  # per-layer score normalization before global ranking; None: raw (the paper)
    # early bird
    eb_detect: bool = False
    eb_threshold: float = 0.1  # You et al. (ICLR 2020)
    eb_patience: int = 5
    # optimization
    phases: dict[str, str] = field(default_factory=dict)  # overrides: {"base": "0.1:80,0.01:40", ...}
    batch_size: int | None = None  # total over all processes under torchrun
    momentum: float = 0.9  # the paper's SGD
    weight_decay: float = 1e-4  # the paper; forced to 0 in regularized phases
    coefficient: float | None = None  # lambda: 1e-3 for MobileNet-V1, 1e-2 otherwise (the paper)
    importance_samples: int | None = None
    optimizer: str = "sgd"  # the paper's; or "adamw"
    lr_schedule: str = "step"  # the phases' piecewise-constant rates (the paper); or "cosine" from the first rate
    warmup_epochs: int = 0  # linear warmup at the start of every training phase
    label_smoothing: float = 0.0
    distill: bool = False  # the model before the first prune teaches every later phase
    distill_alpha: float = DEFAULT_ALPHA
    distill_temperature: float = DEFAULT_TEMPERATURE
    # execution
    workers: int | None = None  # 0 for digits and chars (in memory), 4 otherwise
    threads: int | None = None  # CPU threads of torch (None: torch's default); 1 avoids oversubscription
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    output_dir: str = "runs/latest"
    resume: bool = False
    progress: bool = True

    def validate(self) -> RecipeConfig:
        """Check every field; raise ``ValueError`` naming the first bad one. Returns ``self``."""
        checks = [
            (self.recipe in RECIPES, "recipe", list(RECIPES)),
            (self.preset in PRESETS, "preset", list(PRESETS)),
            (self.dataset in DATASETS, "dataset", list(DATASETS)),
            (self.method in METHODS, "method", sorted(METHODS)),
            (self.device in DEVICES or self.device.startswith("cuda:"), "device", list(DEVICES)),
        ]
        for ok, name, choices in checks:
            if not ok:
                raise ValueError(f"unknown {name}, got {getattr(self, name)!r}; choose one of {choices}")
        if not 0.0 <= self.prune_percent <= MAX_PERCENT:
            raise ValueError(f"prune_percent must be in [0, {MAX_PERCENT:g}], got {self.prune_percent!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds!r}")
        if self.thresholds is not None:
            t = list(self.thresholds)
            if not t or any(not 0.0 < v <= MAX_PERCENT for v in t) or t != sorted(set(t)):
                raise ValueError(f"thresholds must increase strictly within (0, {MAX_PERCENT:g}], got {t!r}")
        if self.normalizer is not None and self.normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer, got {self.normalizer!r}; choose one of {list(NORMALIZERS)}")
        if self.round_to is not None and self.round_to != "auto" and (
            isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1
        ):
            raise ValueError(f"round_to must be a positive integer or 'auto', got {self.round_to!r}")
        if self.target_latency is not None and not 0.0 < self.target_latency < 1.0:
            raise ValueError(f"target_latency must be a fraction of the dense latency in (0, 1), "
                             f"got {self.target_latency!r}")
        if self.target_latency is not None and (self.target_macs is not None or self.thresholds is not None):
            raise ValueError("give at most one of thresholds, target_macs and target_latency")
        if self.target_macs is not None and not 0.0 < self.target_macs < 1.0:
            raise ValueError(f"target_macs must be a fraction of the dense MACs in (0, 1), got {self.target_macs!r}")
        if self.thresholds is not None and self.target_macs is not None:
            raise ValueError("give at most one of thresholds and target_macs")
        if self.recipe == "early_bird" and (self.rounds != 1 or self.thresholds):
            raise ValueError(f"early_bird prunes once, got rounds={self.rounds!r}, thresholds={self.thresholds!r}")
        for name, text in self.phases.items():
            if name not in PRESETS["paper"]["phases"]:
                raise ValueError(f"unknown phase, got {name!r}; choose one of {list(PRESETS['paper']['phases'])}")
            LRSchedule.parse(text)
        for name in ("batch_size", "importance_samples", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        self._validate_training()
        if self.coefficient is not None and not self.coefficient >= 0:
            raise ValueError(f"coefficient must be >= 0, got {self.coefficient!r}")
        if not 0.0 < self.eb_threshold <= 1.0 or self.eb_patience < 1:
            raise ValueError(f"eb_threshold must be in (0, 1] and eb_patience >= 1, got {self.eb_threshold!r}, "
                             f"{self.eb_patience!r}")
        return self

    def _validate_training(self) -> None:
        """Starting weights, optimizer, schedule shape, label smoothing and distillation options."""
        if self.pretrained and self.checkpoint:
            raise ValueError("give at most one of pretrained and checkpoint")
        if self.pretrained and not self.model.startswith(("timm:", "torchvision:")):
            raise ValueError(f"pretrained weights come from timm or torchvision, got model {self.model!r}; "
                             "pass --checkpoint PATH for your own weights")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer, got {self.optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SHAPES:
            raise ValueError(f"unknown lr_schedule, got {self.lr_schedule!r}; choose one of {list(LR_SHAPES)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha!r}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")

    @property
    def trained_start(self) -> bool:
        """Whether the run starts from trained weights (``pretrained`` or ``checkpoint``)."""
        return bool(self.pretrained or self.checkpoint)

    def resolved(self) -> RecipeConfig:
        """A validated copy with every ``None`` default filled from the preset, model and dataset."""
        self.validate()
        preset = PRESETS[self.preset]
        return replace(
            self,
            phases={**preset["phases"], **self.phases},
            batch_size=self.batch_size or preset["batch_size"],
            importance_samples=self.importance_samples or preset["importance_samples"],
            coefficient=self.coefficient if self.coefficient is not None else
            (1e-3 if "mobilenet" in self.model else 1e-2),
            workers=self.workers if self.workers is not None else (0 if self.dataset in IN_MEMORY else 4),
        )

    def schedule(self, phase: str) -> LRSchedule:
        """The learning-rate schedule of a phase (resolve first)."""
        return LRSchedule.parse(self.phases[phase])

    def round_targets(self) -> list[float]:
        """Cumulative fractions of filters removed after each round, e.g. ``[0.5, 0.667, 0.75]`` for 75% in 3.

        From ``thresholds`` when given, else the paper's schedule for ``prune_percent`` over ``rounds``.
        """
        from ..functional import cumulative_schedule

        if self.thresholds:
            return [t / 100.0 for t in self.thresholds]
        return cumulative_schedule(self.prune_percent / 100.0, self.rounds)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecipeConfig:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _phase(text: str) -> tuple[str, str]:
    name, sep, schedule = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=LR:EPOCHS,..., got {text!r}")
    return name.strip(), schedule.strip()


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options both recipes share (model, data, method, optimization, execution).

    Example:
        >>> args = add_common_args(argparse.ArgumentParser()).parse_args(["--method", "l1"])
        >>> args.method
        'l1'
    """
    d = RecipeConfig()
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="registered model, timm:NAME or torchvision:NAME")
    g.add_argument("--dataset", default=d.dataset, choices=DATASETS)
    g.add_argument("--data-path", default=None, help="dataset root (CIFAR: where to find/download it; chars: cache)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--in-chans", type=int, default=d.in_chans, choices=(1, 3))
    g.add_argument("--pretrained", action="store_true",
                   help="start from timm / torchvision pretrained weights (cache or network); skips base training")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="start from your weights: a state dict or a pruned checkpoint of this project "
                        "(loaded with weights_only=True); skips base training")
    g.add_argument("--train-base", action="store_true", help="run the base phase even from trained weights")
    g = parser.add_argument_group("method")
    g.add_argument("--method", default=d.method, choices=sorted(METHODS),
                   help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    g.add_argument("--prune-percent", type=float, default=d.prune_percent, help="%% of filters removed")
    g.add_argument("--normalizer", default=None, choices=NORMALIZERS,
                   help="normalize each layer's scores before global ranking (default: raw scores, as the paper)")
    g.add_argument("--round-to", type=_round_to, default=None,
                   help="keep pruned layer widths multiples of N; 'auto': try 1, 8, 16, 32 and keep the fastest "
                        "(measured on the run's device and batch size)")
    g = parser.add_argument_group("optimization")
    g.add_argument("--preset", default=d.preset, choices=list(PRESETS))
    g.add_argument("--phase", dest="phases", type=_phase, action="append", default=[], metavar="NAME=LR:EP,..",
                   help=f"override a phase's schedule, e.g. base=0.1:80,0.01:40 (phases: "
                        f"{', '.join(PRESETS['paper']['phases'])})")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="0 in regularized phases")
    g.add_argument("--coefficient", type=float, default=None, help="OrthoReg lambda")
    g.add_argument("--importance-samples", type=int, default=None)
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
                   help="sgd (the paper, with --momentum) or adamw (set matching --phase rates, e.g. 1e-3)")
    g.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SHAPES,
                   help="step: the phases' piecewise-constant rates (the paper); cosine: from each phase's first "
                        "rate to 0 over its epochs")
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="linear warmup epochs at the start of every training phase")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--distill", action="store_true",
                   help="the model before the first prune is a frozen teacher in every later phase")
    g.add_argument("--distill-alpha", type=float, default=d.distill_alpha,
                   help="weight of the teacher's soft targets: (1-a)*CE + a*T^2*KL (default %(default)s)")
    g.add_argument("--distill-temperature", type=float, default=d.distill_temperature,
                   help="softmax temperature T of the distillation (default %(default)s)")
    g = parser.add_argument_group("execution")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    g.add_argument("--workers", type=int, default=None)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on busy CPUs)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def _round_to(text: str) -> int | str:
    """``--round-to``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def add_schedule_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The iterative recipe's budget options: rounds, cumulative thresholds, MACs target."""
    g = parser.add_argument_group("iterative schedule")
    g.add_argument("--rounds", type=int, default=1)
    g.add_argument("--thresholds", type=_floats, default=None, help="cumulative %% per round, e.g. 25,50,75")
    g.add_argument("--target-macs", type=float, default=None, help="fraction of dense MACs to end at")
    g.add_argument("--target-latency", type=float, default=None,
                   help="fraction of the dense model's latency to end at, measured on the run's device and batch "
                        "size (each round keeps target ** (1 / rounds) of the current latency)")
    return parser


def add_early_bird_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The early-bird recipe's detection options."""
    g = parser.add_argument_group("early bird")
    g.add_argument("--eb-detect", action="store_true", help="stop eb_train when the masks settle")
    g.add_argument("--eb-threshold", type=float, default=0.1)
    g.add_argument("--eb-patience", type=int, default=5)
    return parser


def config_from_args(args: argparse.Namespace, *, recipe: str) -> RecipeConfig:
    """Build a (validated, resolved) config from parsed arguments."""
    values = {f.name: getattr(args, f.name) for f in fields(RecipeConfig) if hasattr(args, f.name)}
    values["phases"] = dict(values.get("phases") or [])
    return RecipeConfig(**values, recipe=recipe).resolved()


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe config file (JSON, or YAML for ``.yaml``/``.yml``) into checked :class:`RecipeConfig` values.

    The keys are :class:`RecipeConfig`'s fields, as in a run's ``config.json``; the facts a run records next to
    them (``data``, ``world_size``, ``dense_params``, ``dense_macs``) are accepted and ignored, so a run's own
    ``config.json`` reruns it. Integers are accepted for float fields; ``phases`` is a ``{phase: schedule}`` map.

    Args:
        path: The file.

    Returns:
        ``{field: value}`` for the fields the file sets.

    Raises:
        ValueError: The file is missing or unreadable, is not a mapping, names unknown keys (all listed), or
            gives a value of the wrong type.

    Example:
        >>> import json, tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        ...     json.dump({"method": "l1", "prune_percent": 60, "phases": {"base": "0.1:2"}}, f)
        >>> load_config_file(f.name)
        {'method': 'l1', 'prune_percent': 60.0, 'phases': {'base': '0.1:2'}}
    """
    recorded = ("data", "world_size", "dense_params", "dense_macs")  # written by the engine next to the config
    data = _read_mapping(Path(path))
    hints = typing.get_type_hints(RecipeConfig)
    unknown = sorted(str(k) for k in data if k not in hints and k not in recorded)
    if unknown:
        raise ValueError(f"unknown keys in config file {str(path)!r}: {', '.join(unknown)}; the keys are "
                         f"{RecipeConfig.__name__}'s fields (as in a run's config.json)")
    values = {}
    for name, value in data.items():
        if name in recorded:
            continue
        try:
            values[name] = _convert(hints[name], value)
        except TypeError:
            hint = hints[name]
            shown = hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)
            raise ValueError(f"config file {str(path)!r}: {name} must be {shown}, got {value!r}") from None
    return values


def _read_mapping(path: Path) -> dict[str, Any]:
    """The mapping a JSON or YAML (``.yaml``/``.yml``) file holds; ``ValueError`` naming what is wrong."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("YAML config files need PyYAML: pip install pyyaml") from None
        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    else:
        parse, errors = json.loads, (ValueError,)
    try:
        data = parse(text)
    except errors as err:
        raise ValueError(f"config file {str(path)!r} is not valid: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return data


def _convert(hint: Any, value: Any) -> Any:
    """``value`` as type ``hint`` (ints become floats for float fields); ``TypeError`` when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        for option in args:
            try:
                return _convert(option, value)
            except TypeError:
                pass
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint in (int, str, bool):
        if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
            return value
    elif origin is list and len(args) == 1:
        if isinstance(value, list):
            return [_convert(args[0], v) for v in value]
    elif origin is dict and len(args) == 2:
        if isinstance(value, dict):
            return {_convert(args[0], k): _convert(args[1], v) for k, v in value.items()}
    else:
        return value  # a type this reader does not know: RecipeConfig.validate() judges it
    raise TypeError(hint)
