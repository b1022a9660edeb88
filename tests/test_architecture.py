"""The layout's rules, checked on the source: no import cycles, no module name twice, layers that point down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"orthoreg_tp": ROOT / "orthoreg_tp", "orthoreg_tp.adapters": ROOT / "adapters"}


def _modules() -> dict[str, Path]:
    """``{dotted name: path}`` of every module of the installed packages (``adapters/`` as orthoreg_tp.adapters)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every import (module level or inside a function) between the project's modules."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    edges = _edges(_modules())
    # a submodule importing its own package's __init__ would loop through it: drop only the parent edge
    for name in edges:
        edges[name] = {t for t in edges[name] if not name.startswith(t + ".")}
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_a_cycle_is_found_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_name_twice():
    names: dict[str, list[str]] = {}
    for folder in [ROOT / "orthoreg_tp", ROOT / "adapters"]:
        for path in folder.rglob("*.py"):
            if path.name != "__init__.py":
                names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("orthoreg_tp", "orthoreg_tp.adapters"),  # the toolbox imports neither the adapters
        ("orthoreg_tp", "orthoreg_tp.engine"),  # nor the recipes' engine
        ("orthoreg_tp.adapters._internal", "orthoreg_tp.adapters.libraries"),  # machinery below library adapters
        ("orthoreg_tp.adapters", "orthoreg_tp.engine"),
    ],
)
def test_layers_point_down(lower, upper):
    modules = _modules()
    edges = _edges(modules)
    toolbox_top = {m for m in modules if m.count(".") == 1 or m == "orthoreg_tp"}
    sources = toolbox_top if lower == "orthoreg_tp" else {m for m in modules if m.startswith(lower)}
    sources = {m for m in sources if not m.startswith(upper)}
    wrong = {m: sorted(t for t in edges[m] if t.startswith(upper)) for m in sources}
    # the one exception: ``orthoreg_tp.load_pruned``, a lazy attribute of the package that imports the engine on use
    if wrong.get("orthoreg_tp") == ["orthoreg_tp.engine.export"]:
        del wrong["orthoreg_tp"]
    assert {m: t for m, t in wrong.items() if t} == {}


def test_entry_points_and_internals_are_marked():
    import orthoreg_tp.adapters as adapters

    for name in ("prepare", "prune", "replay", "build_pruner", "PruneConfig", "PruneReport", "PruningError",
                 "PruningSpec", "register_model_adapter", "register_module_adapter"):
        assert name in adapters.__all__
    assert not hasattr(adapters, "host_fixes")
    internal = [m for m in _modules() if m.startswith("orthoreg_tp.adapters.") and m.count(".") == 2]
    assert sorted(m.rsplit(".", 1)[1] for m in internal) == [
        "_internal", "api", "libraries", "prune_config", "registry", "report", "spec"]
