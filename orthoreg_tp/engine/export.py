"""Portable pruned-model artifacts: safetensors weights + a JSON spec, and ONNX.

A pruned model is stored as two files side by side: ``NAME.safetensors`` (the pruned state dict; no pickle)
and ``NAME.json`` (how to rebuild it: the model's name as :func:`~orthoreg_tp.engine.models.build_model` takes
it, classes, input channels and size, and the pruning history in torch-pruning's format). :func:`load_pruned`
builds the dense model, replays the history and loads the weights. ONNX export (the ``onnx`` extra) writes a
self-contained graph, checked against PyTorch in onnxruntime before it is kept.

Example:
    >>> save_pruned("runs/demo/model_final", model, history, ModelSpec("vgg13", 100, 3, 32))  # doctest: +SKIP
    >>> model = load_pruned("runs/demo/model_final.safetensors")  # doctest: +SKIP
    >>> export_run("runs/demo", fmt="onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .models import build_model
from .records import atomic_write_bytes, safe_torch_load

ARTIFACT_FORMAT = "orthoreg-tp/pruned-model"
ARTIFACT_VERSION = 1
FORMATS: tuple[str, ...] = ("safetensors", "onnx")
ONNX_INSTALL_HINT = 'ONNX export needs the onnx extra: pip install "orthoreg-tp[onnx]"'
_ROUND_FILE = re.compile(r"^model_round(\d+)\.pt$")


class OnnxUnavailableError(ImportError):
    """``onnx`` or ``onnxruntime`` is not installed; the message says how to install them."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build the dense model a pruning history applies to.

    Attributes:
        model: A registered model name, ``"timm:NAME"`` or ``"torchvision:NAME"``.
        num_classes: Output classes.
        in_chans: Input channels.
        image_size: Input height and width (the replay traces the model on one such image).

    Example:
        >>> ModelSpec.from_dict({"model": "tiny_cnn", "num_classes": 10, "in_chans": 3, "image_size": 16})
        ModelSpec(model='tiny_cnn', num_classes=10, in_chans=3, image_size=16)
    """

    model: str
    num_classes: int
    in_chans: int
    image_size: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Read the four fields (as written by ``save_pruned_model``'s ``meta`` or :meth:`to_dict`)."""
        missing = [k for k in ("model", "num_classes", "in_chans", "image_size") if k not in d]
        if missing:
            raise ValueError(f"model spec lacks {', '.join(missing)}")
        return cls(model=str(d["model"]), num_classes=int(d["num_classes"]), in_chans=int(d["in_chans"]),
                   image_size=int(d["image_size"]))

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    def example_inputs(self, batch: int = 1) -> Tensor:
        """Random inputs of the model's shape."""
        return torch.randn(batch, self.in_chans, self.image_size, self.image_size)


def rebuild_pruned(spec: ModelSpec, history: Sequence[Sequence[Any]], state_dict: Mapping[str, Tensor] | None = None,
                   ) -> nn.Module:
    """Build the dense model of ``spec``, replay ``history`` on it, and load ``state_dict`` (strict).

    This is the one place the export code replays a pruning history.

    Example:
        >>> spec = ModelSpec("tiny_cnn", 10, 3, 16)
        >>> model = rebuild_pruned(spec, [])
        >>> model(spec.example_inputs()).shape
        torch.Size([1, 10])
    """
    from ..adapters import replay

    model = build_model(spec.model, num_classes=spec.num_classes, in_chans=spec.in_chans)
    replay(model, spec.example_inputs(), [list(e) for e in history])
    if state_dict is not None:
        model.load_state_dict(dict(state_dict))
    return model


# --------------------------------------------------------------------------- safetensors + JSON
def _artifact_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, spec)`` paths for ``NAME``, ``NAME.safetensors`` or ``NAME.json``."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as contiguous CPU tensors; entries sharing memory are copied.

    Safetensors refuses tensors that share memory.
    """
    state, seen = {}, set()
    for name, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor; safetensors "
                             "stores tensors only")
        value = value.detach().cpu().contiguous()
        key = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        if key is not None and key in seen:
            value = value.clone()
        seen.add(key)
        state[name] = value
    return state


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_pruned(path: str | os.PathLike, model: nn.Module, history: Sequence[Sequence[Any]], spec: ModelSpec, *,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``NAME.safetensors`` (the weights) and ``NAME.json`` (spec + pruning history), each atomically.

    Args:
        path: ``NAME``, ``NAME.safetensors`` or ``NAME.json``.
        model: The pruned model (bare, not a DDP wrapper).
        history: Every pruning-history entry since the dense model (``[layer, is_out_channel, indices]``).
        spec: How to build the dense model.
        extra: JSON-serializable facts to record in the JSON (e.g. ``{"round": 3}``).

    Returns:
        The ``.safetensors`` path.

    Example:
        >>> from orthoreg_tp.engine.models import build_model
        >>> path = save_pruned("/tmp/tiny_dense", build_model("tiny_cnn", 10), [], ModelSpec("tiny_cnn", 10, 3, 16))
        >>> path.name, path.with_suffix(".json").is_file()
        ('tiny_dense.safetensors', True)
    """
    from safetensors.torch import save

    weights_path, spec_path = _artifact_paths(path)
    data = save(_plain_state_dict(model), metadata={"format": ARTIFACT_FORMAT, "spec": spec_path.name})
    from .. import __version__

    doc = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "orthoreg_tp_version": __version__,
           "weights": weights_path.name, "weights_sha256": _sha256(data), "spec": spec.to_dict(),
           "params": sum(p.numel() for p in model.parameters()), **dict(extra or {}),
           "pruning_history": [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in history]}
    atomic_write_bytes(weights_path, data)
    atomic_write_bytes(spec_path, _spec_json(doc).encode())
    return weights_path


def _spec_json(doc: Mapping[str, Any]) -> str:
    """Indented JSON with one line per pruning-history entry (readable, and not one line per index)."""
    history = doc["pruning_history"]
    head = json.dumps({k: v for k, v in doc.items() if k != "pruning_history"}, indent=2)
    body = "[]" if not history else "[\n" + ",\n".join(f"    {json.dumps(e)}" for e in history) + "\n  ]"
    return f'{head[:-2]},\n  "pruning_history": {body}\n}}\n'



def load_pruned(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pruned model from the files :func:`save_pruned` (or ``orthoreg-tp export``) wrote; no pickle.

    The dense model is built from the spec (registered, ``timm:`` or ``torchvision:`` name; random weights,
    nothing downloaded), the pruning history is replayed on it, and the safetensors weights are loaded (strict).

    Args:
        path: ``NAME.safetensors``, ``NAME.json`` or ``NAME``.
        map_location: Device for the returned model.

    Returns:
        The pruned model, in eval mode.

    Raises:
        FileNotFoundError: One of the two files is missing.
        ValueError: The JSON is not an orthoreg-tp artifact, or the weights are not the ones it was written with.

    Example:
        >>> import orthoreg_tp
        >>> from orthoreg_tp.engine.models import build_model
        >>> path = save_pruned("/tmp/tiny", build_model("tiny_cnn", 10), [], ModelSpec("tiny_cnn", 10, 3, 16))
        >>> model = orthoreg_tp.load_pruned("/tmp/tiny.safetensors")
        >>> model(torch.zeros(1, 3, 16, 16)).shape
        torch.Size([1, 10])
    """
    from safetensors.torch import load

    weights_path, spec_path = _artifact_paths(path)
    for p in (spec_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"no {p.suffix[1:]} file at {str(p)!r} (a pruned model is NAME.safetensors "
                                    "+ NAME.json)")
    try:
        doc = json.loads(spec_path.read_text())
    except ValueError as err:
        raise ValueError(f"{str(spec_path)!r} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{str(spec_path)!r} is not an orthoreg-tp pruned-model spec (no format "
                         f"{ARTIFACT_FORMAT!r})")
    if doc.get("version", 0) > ARTIFACT_VERSION:
        raise ValueError(f"{str(spec_path)!r} has artifact version {doc['version']}; this orthoreg-tp reads up to "
                         f"{ARTIFACT_VERSION}: upgrade orthoreg-tp")
    data = weights_path.read_bytes()
    if doc.get("weights_sha256") not in (None, _sha256(data)):
        raise ValueError(f"{str(weights_path)!r} is not the weights file {str(spec_path)!r} was written with "
                         "(SHA-256 differs)")
    model = rebuild_pruned(ModelSpec.from_dict(doc["spec"]), doc["pruning_history"], load(data))
    return model.to(map_location).eval()


# --------------------------------------------------------------------------- ONNX
def _require_onnx() -> Any:
    try:
        import onnx  # noqa: F401  (torch.onnx needs it)
        import onnxruntime
    except ImportError:
        raise OnnxUnavailableError(ONNX_INSTALL_HINT) from None
    return onnxruntime


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: Tensor, *, opset: int = 17,
                atol: float = 1e-4, rtol: float = 1e-3) -> Path:
    """Export ``model`` to ONNX (batch axis dynamic) and keep the file only if onnxruntime reproduces PyTorch.

    Uses torch's TorchScript-based exporter (needs ``onnx`` only, not ``onnxscript``). The check runs both on
    ``example_inputs`` and compares with ``torch.testing.assert_close(atol, rtol)``.

    Args:
        model: The model (put in eval mode for the export; its mode is restored).
        path: The ``.onnx`` file to write.
        example_inputs: A batch of inputs of the model's shape.
        opset: ONNX opset version.
        atol: Absolute tolerance of the check.
        rtol: Relative tolerance of the check.

    Returns:
        ``path``.

    Raises:
        OnnxUnavailableError: ``onnx``/``onnxruntime`` missing (``pip install "orthoreg-tp[onnx]"``).
        ValueError: onnxruntime's outputs differ from PyTorch's (nothing is written).

    Example:
        >>> export_onnx(model, "model.onnx", torch.randn(2, 3, 32, 32))  # doctest: +SKIP
    """
    ort = _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            expected = model(example_inputs)
            torch.onnx.export(model, (example_inputs,), tmp, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"input": example_inputs.detach().cpu().numpy()})
        try:
            torch.testing.assert_close(torch.from_numpy(got), expected.detach().cpu(), atol=atol, rtol=rtol)
        except AssertionError as err:
            detail = " ".join(str(err).split())
            raise ValueError(f"ONNX export does not reproduce PyTorch in onnxruntime: {detail}") from None
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        model.train(was_training)
    return path


# --------------------------------------------------------------------------- run folders
def saved_rounds(run_dir: str | os.PathLike) -> list[int]:
    """The rounds whose pruned model a run folder holds (``model_round<K>.pt``), ascending.

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {str(run_dir)!r}")
    return sorted(int(m.group(1)) for p in run_dir.iterdir() if (m := _ROUND_FILE.match(p.name)))


def load_run_model(run_dir: str | os.PathLike, round_index: int | None = None,
                   ) -> tuple[nn.Module, ModelSpec, list[list[Any]], int]:
    """Rebuild the pruned model of a round of a recipe run (the last round by default).

    Returns:
        ``(model, spec, history, round_index)``; the model in eval mode.

    Raises:
        FileNotFoundError: No such folder.
        ValueError: The folder holds no saved model, or not that round.
    """
    run_dir = Path(run_dir)
    rounds = saved_rounds(run_dir)
    if not rounds:
        raise ValueError(f"{str(run_dir)!r} holds no saved model (model_round<K>.pt); is it a recipe's output "
                         "folder?")
    if round_index is None:
        round_index = rounds[-1]
    elif round_index not in rounds:
        raise ValueError(f"run {str(run_dir)!r} has no round {round_index} (saved rounds: "
                         f"{', '.join(map(str, rounds))})")
    state = safe_torch_load(run_dir / f"model_round{round_index}.pt")
    spec = ModelSpec.from_dict(state["meta"])
    history = [list(e) for e in state["pruning_history"]]
    return rebuild_pruned(spec, history, state["model"]).eval(), spec, history, round_index


def export_run(run_dir: str | os.PathLike, *, round_index: int | None = None, fmt: str = "safetensors",
               output: str | os.PathLike | None = None) -> Path:
    """Export a round's pruned model of a recipe run (the last round by default).

    Args:
        run_dir: The recipe's ``--output-dir``.
        round_index: Which round (``model_round<K>.pt``); ``None``: the last one saved.
        fmt: ``"safetensors"`` (weights + JSON spec, for :func:`load_pruned`) or ``"onnx"``.
        output: Target file; default ``RUN_DIR/model_round<K>.safetensors`` (or ``.onnx``).

    Returns:
        The written ``.safetensors`` or ``.onnx`` path.

    Raises:
        FileNotFoundError: No such folder.
        ValueError: Unknown format, no saved model, no such round, or an ONNX graph that does not match.
        OnnxUnavailableError: ``fmt="onnx"`` without the ``onnx`` extra.

    Example:
        >>> export_run("runs/digits-it-orthoreg", fmt="onnx")  # doctest: +SKIP
        PosixPath('runs/digits-it-orthoreg/model_round3.onnx')
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()  # before any work
    model, spec, history, round_index = load_run_model(run_dir, round_index)
    target = Path(output) if output is not None else Path(run_dir) / f"model_round{round_index}.{fmt}"
    if fmt == "onnx":
        return export_onnx(model, target, spec.example_inputs(batch=2))
    return save_pruned(target, model, history, spec, extra={"round": round_index})
