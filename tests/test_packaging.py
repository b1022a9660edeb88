import subprocess
import sys
from pathlib import Path

import pytest

import orthoreg_tp

REPO = Path(__file__).resolve().parents[1]


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a fresh interpreter importing torch: 7-8 s
def test_adapters_installed_under_the_package_namespace(tmp_path):
    code = (
        "import importlib.util, orthoreg_tp.adapters as a;"
        "print(a.__name__); print(a.__file__); print(importlib.util.find_spec('adapters'))"
    )
    out = run_python(code, cwd=tmp_path)  # outside the repository: only what the install provides
    assert out.returncode == 0, out.stderr
    name, path, toplevel = out.stdout.strip().splitlines()
    assert name == "orthoreg_tp.adapters"
    assert Path(path).resolve().parent == REPO / "adapters"
    assert toplevel == "None"  # no top-level `adapters` module shadows PyPI's package


@pytest.mark.slow  # a fresh interpreter importing torch: 7-8 s
def test_import_is_cheap_and_does_not_touch_cuda(tmp_path):
    code = (
        "import sys, torch, orthoreg_tp;"
        "heavy = [m for m in ('matplotlib', 'sklearn', 'onnx', 'onnxruntime') if m in sys.modules];"
        "print(heavy, torch.cuda.is_initialized())"
    )
    out = run_python(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False"


@pytest.mark.slow  # a fresh interpreter importing torch and timm: ~15 s
def test_pruning_never_imports_optional_model_libraries(tmp_path):
    """Importing ultralytics replaces PIL.Image.open process-wide: only a user's own import may do that."""
    code = (
        "import sys, torch, torch_pruning as tp, PIL.Image;"
        "from orthoreg_tp.adapters import prune;"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3));"
        "prune(m, torch.randn(1, 3, 8, 8), ratio=0.5, importance=tp.importance.MagnitudeImportance());"
        "print([n for n in ('ultralytics', 'transformers', 'segmentation_models_pytorch') if n in sys.modules],"
        "      PIL.Image.open.__module__)"
    )
    out = run_python(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] PIL.Image"


def test_public_api_names():
    for name in (
        "OrthoRegImportance",
        "OrthoRegularizer",
        "OrthoRegPruner",
        "orthonormality",
        "FisherImportance",
        "TFOImportance",
        "GraSPImportance",
        "RDTImportance",
        "paper_schedule",
        "cumulative_schedule",
    ):
        assert hasattr(orthoreg_tp, name), name
