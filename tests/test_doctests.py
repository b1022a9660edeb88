"""Every docstring example of the installed package runs and gives what it shows.

Modules are imported by their installed names (``orthoreg_tp.adapters.*`` too, never a top-level ``adapters``).
"""

import doctest
import importlib
import pkgutil

import pytest

OPTIONAL = {"ultralytics", "transformers", "segmentation_models_pytorch", "onnx", "onnxruntime", "lightning",
            "accelerate"}


def _module_names() -> list[str]:
    # orthoreg_tp.adapters lives in another folder of the checkout, so each package is walked from its own path
    names = []
    for root in ("orthoreg_tp", "orthoreg_tp.engine", "orthoreg_tp.adapters"):
        package = importlib.import_module(root)
        names.append(root)
        names.extend(info.name for info in pkgutil.walk_packages(package.__path__, prefix=root + "."))
    return sorted(set(names))


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if err.name and err.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"optional package {err.name} is not installed")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(module, name):  # each example sees a copy of its module's globals, as in pytest
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
