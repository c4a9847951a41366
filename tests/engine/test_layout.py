"""The shape of the code: production never imports the benchmarks, and the engine is a
package of one module per component with a typed public surface."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("api", "worker", "store", "backbone")
BENCH = "api.bench"

# pkgutil.walk_packages would import the bench package itself to list it: walk by hand.
_IMPORT_ALL = f"""
import importlib, json, pkgutil, sys
names = []
def walk(name):
    mod = importlib.import_module(name)
    names.append(name)
    for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
        sub = name + "." + info.name
        if sub == {BENCH!r}:
            continue
        walk(sub) if info.ispkg else (importlib.import_module(sub), names.append(sub))
for top in {PRODUCTION!r}:
    walk(top)
print(json.dumps({{"imported": names, "bench": sorted(m for m in sys.modules if m == {BENCH!r} or m.startswith({BENCH!r} + "."))}}))
"""


@pytest.mark.timeout(300)
def test_no_production_module_imports_benchmark_code() -> None:
    """Every module of api, worker, store and backbone (the bench package aside) imported in
    a fresh interpreter: no module of the bench package comes with them."""
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"api.app", "api.engine.core", "api.cli", "worker.jobs", "store.repo", "backbone.serving"} <= set(out["imported"])
    assert out["bench"] == [], f"production modules import benchmark code: {out['bench']}"


def _production_files() -> list[Path]:
    files = []
    for top in PRODUCTION:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.is_relative_to(ROOT / "api" / "bench"):
                continue
            files.append(path)
    return files


def test_only_the_cli_imports_the_bench_package_and_only_lazily() -> None:
    """No production file names the bench package in an import, except the command line's
    ``bench`` commands, inside their functions (so that ``promptstore serve`` never loads it)."""
    offenders = []
    for path in _production_files():
        tree = ast.parse(path.read_text(), str(path))
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == BENCH or n.startswith(BENCH + ".") for n in names):
                rel = path.relative_to(ROOT).as_posix()
                if not (rel == "api/cli.py" and id(node) in lazy):
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


ENGINE_COMPONENTS = {
    "batcher": "Batcher",
    "cache": "PromptCache",
    "invalidation": "InvalidationBus",
    "metrics": "EngineMetrics",
    "request": "ServingRef",
    "core": "Engine",
}


def test_engine_is_a_package_of_one_module_per_component() -> None:
    import api.engine

    assert hasattr(api.engine, "__path__"), "api.engine is a package"
    modules = {info.name for info in pkgutil.iter_modules(api.engine.__path__)}
    assert modules == set(ENGINE_COMPONENTS)
    for module, cls in ENGINE_COMPONENTS.items():
        obj = getattr(importlib.import_module(f"api.engine.{module}"), cls)
        assert obj.__module__ == f"api.engine.{module}"
        assert getattr(api.engine, cls) is obj  # re-exported: `from api.engine import Engine, ...` keeps working
    for name in ("QueueFull", "StaleVersion", "PromptUnavailable", "UnusableScores", "top_predictions", "Inference"):
        assert hasattr(api.engine, name)


def test_engine_surface_is_typed_and_has_no_benchmark_state() -> None:
    import api.engine

    for module in ENGINE_COMPONENTS:
        mod = importlib.import_module(f"api.engine.{module}")
        source = inspect.getsource(mod)
        assert "Any" not in {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}, module
    hints = inspect.signature(api.engine.PromptCache.get).return_annotation
    assert "ResidentPrompt" in str(hints)
    assert "ResidentPrompt" in str(api.engine.PendingRequest.__annotations__["resident"])
    source = inspect.getsource(api.engine.core) + inspect.getsource(api.engine.batcher)
    for bench_only in ("batch_log", "benchmark"):
        assert bench_only not in source, bench_only
