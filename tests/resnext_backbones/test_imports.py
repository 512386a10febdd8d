"""The library's import structure: pure PyTorch (no Lightning, no tasks) and one-way imports (no cycles)."""

import ast
import subprocess
import sys
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "resnext_backbones"
FORBIDDEN = ("lightning", "pytorch_lightning", "tasks")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set) -> set:
    """Every module named by an import statement anywhere in the file (module level or inside functions),
    resolved to the package's modules where it names one; read from the source, nothing is run."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for alias in node.names:  # `from . import formats` imports the module resnext_backbones.formats
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return found


def import_graph() -> dict:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict):
    """One import cycle among the package's modules as a list ``[a, b, ..., a]``, or None."""
    inside = {m: sorted(t for t in targets if t in graph and t != m) for m, targets in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in inside[m]:
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(inside):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert {"resnext_backbones.trunk", "resnext_backbones.builders", "resnext_backbones.formats"} <= set(graph)
    assert "resnext_backbones.trunk" in graph["resnext_backbones.builders"]
    assert "resnext_backbones.formats.detectron2" in graph["resnext_backbones.formats"]  # `from . import x`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_imports_one_way_with_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_code_imports_no_weights_code():
    graph = import_graph()
    for module in ("trunk", "fpn", "fused"):
        inside = {t for t in graph[f"resnext_backbones.{module}"] if t.startswith("resnext_backbones")}
        assert inside <= {"resnext_backbones.trunk", "resnext_backbones.fused", "resnext_backbones.onednn"}, \
            (module, inside)
    assert {t for t in graph["resnext_backbones.onednn"] if t.startswith("resnext_backbones")} == set()


def test_nothing_in_the_library_imports_lightning_or_the_tasks():
    bad = {m: sorted(t for t in targets if t.split(".")[0] in FORBIDDEN) for m, targets in import_graph().items()}
    assert not {m: t for m, t in bad.items() if t}


def test_importing_the_library_does_not_import_lightning():
    code = ("import sys, pkgutil, importlib, resnext_backbones; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(resnext_backbones.__path__, "
            "'resnext_backbones.') if m.name != 'resnext_backbones.__main__']; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'tasks')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
