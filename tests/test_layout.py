"""The package's layers: no import cycles (type-only and function-level imports included), imports that point
down only and reach another subpackage through its ``__init__``, and recipes and benchmarks that use public
names only."""

import ast
import importlib
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shira_hooks"
# Layers, lowest first; a module may import its own subpackage and those of lower layers.
LAYERS = {"_base": 0, "masks": 1, "distributed": 1, "format": 2, "train": 3, "serve": 3, "integrations": 4, "tools": 5}
LEAVES = {"errors", "_version"}  # importable from anywhere


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # a submodule, unless the package binds the name to something else
                module = f"{source}.{alias.name}"
                bound = getattr(importlib.import_module(source), alias.name, None) if module in modules else None
                found.add(
                    module if module in modules and (bound is None or isinstance(bound, types.ModuleType)) else source
                )
    return {module for module in found if module in modules and module != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            assert state.get(other) != 1, "import cycle: " + " -> ".join([*path, module][path.index(other) :] + [other])
            if other not in state:
                visit(other, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_imports_point_down_and_through_the_subpackage_init(graph):
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages == LAYERS.keys()  # every subpackage has its place in the layers
    wrong = []
    for module, imported in graph.items():
        parts = module.split(".")
        if len(parts) < 3:  # the package's own top-level modules sit above every layer
            continue
        for other in imported:
            target = other.split(".")
            if (
                len(target) == 1
            ):  # the package itself imports every layer: only tools (the demo, written as a user writes) may
                if parts[1] != "tools":
                    wrong.append(f"{module} imports the package root")
                continue
            if target[1] in LEAVES or target[1] == parts[1]:
                continue
            exported = importlib.import_module(".".join(target[:2])).__all__
            if len(target) > 2 and not (len(target) == 3 and target[2] in exported):
                wrong.append(f"{module} imports {other}, not through shira_hooks.{target[1]}")
            if LAYERS[target[1]] >= LAYERS[parts[1]]:
                wrong.append(f"{module} ({parts[1]}) imports {target[1]}, which is not below it")
    assert not wrong, "\n".join(sorted(wrong))


def test_recipes_and_benchmarks_import_public_names_only():
    wrong = []
    for path in sorted([*ROOT.glob("recipes/*.py"), *ROOT.glob("benchmarks/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shira_hooks"):
                public = set(importlib.import_module(node.module).__all__) | {
                    sub for sub in LAYERS if not sub.startswith("_")
                }
                wrong += [
                    f"{path.name}: from {node.module} import {a.name}" for a in node.names if a.name not in public
                ]
            elif isinstance(node, ast.Import):
                wrong += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("shira_hooks.")]
    assert not wrong, "\n".join(wrong)


def test_no_module_retypes_the_list_of_mask_kinds():
    """The list is the registry's (masks/kinds.py): code takes it from shira_hooks.MASK_KINDS, masks.CALIBRATED_KINDS."""
    listed = re.compile(r"""["']struct["'],\s*["']rand["']|["']grad["'],\s*["']snip["']""")
    files = [*PACKAGE.rglob("*.py"), *ROOT.glob("recipes/*.py"), *ROOT.glob("benchmarks/**/*.py")]
    assert [p.relative_to(ROOT).as_posix() for p in files if listed.search(p.read_text())] == []
