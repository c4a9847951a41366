"""The backbone package's import graph has no cycle: every relative import counts, at module
level, inside functions and under TYPE_CHECKING (a type-only import still ties two files)."""

from __future__ import annotations

import ast
from pathlib import Path

import backbone

ROOT = Path(backbone.__file__).resolve().parent
PKG = "backbone"


def _module_name(path: Path) -> str:
    parts = [PKG, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if _is_package(name, modules) else name.rsplit(".", 1)[0]  # the importer's package
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = here.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + (node.module.split(".") if node.module else []))
            targets = {target} if node.module else set()
            for alias in node.names:  # `from . import x` / `from .pkg import submodule`
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    targets.add(sub)
                elif not node.module:
                    targets.add(target)
            for t in list(targets):  # importing a.b.c runs the packages above it first
                parts = t.split(".")
                for i in range(2, len(parts)):
                    parent = ".".join(parts[:i])
                    if not (name == parent or name.startswith(parent + ".")):
                        targets.add(parent)
            graph[name] |= {t for t in targets if t in modules and t != name and t != PKG}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_graph_sees_the_type_only_imports():
    graph = import_graph()
    assert "backbone.errors" in graph["backbone.loading"]
    assert "backbone.loading" in graph["backbone.methods.padding"]  # under TYPE_CHECKING
    assert "backbone.methods.zeroshot" in graph["backbone.methods"]  # `from . import zeroshot`
    assert "backbone.methods" in graph["backbone.serving"]


def test_backbone_imports_form_no_cycle():
    graph = import_graph()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in backbone/: " + " -> ".join(cycle or [])


def test_loading_is_the_bottom():
    """loading imports nothing of the prompt side: not serving, artifacts, tuning or methods."""
    deps = import_graph()["backbone.loading"]
    assert deps <= {"backbone.errors", "backbone.towers"}, deps
