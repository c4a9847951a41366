"""The import graph of the four packages (issue "One renovation of the house", item 3): no circle
between them, nothing below imports what is above, and `api/` reaches `worker/` only to
dispatch jobs (``worker.dispatch``): the backbone holder lives in `backbone/`, the session and
object-store caches in `store/`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "worker", "store", "backbone")
#: What api/ may import from worker/.
API_TO_WORKER = {"worker.dispatch"}


def _imports(top: str) -> list[tuple[str, int, str]]:
    """(file, line, imported module) for every import in package ``top`` (TYPE_CHECKING and
    function-level imports included)."""
    out = []
    for path in sorted((ROOT / top).rglob("*.py")):
        rel = path.relative_to(ROOT)
        parts = list(rel.with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(str(rel), node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                out.append((str(rel), node.lineno, mod))
                # `from worker import runtime` imports the module worker.runtime
                out += [(str(rel), node.lineno, f"{mod}.{a.name}") for a in node.names if mod in PACKAGES]
    return out


def _top(module: str) -> str:
    return module.split(".")[0]


def test_api_reaches_worker_only_through_dispatch() -> None:
    bad = [
        f"{f}:{line} imports {mod}"
        for f, line, mod in _imports("api")
        if _top(mod) == "worker" and mod != "worker" and mod not in API_TO_WORKER
    ]
    bad += [f"{f}:{line} imports {mod}" for f, line, mod in _imports("api") if mod == "worker"]
    assert not bad, "api/ may import worker.dispatch only:\n" + "\n".join(bad)


def test_lower_packages_do_not_import_upper_ones() -> None:
    allowed = {"backbone": set(), "store": set(), "worker": {"store", "backbone"}}
    bad = [
        f"{f}:{line} imports {mod}"
        for top, ok in allowed.items()
        for f, line, mod in _imports(top)
        if _top(mod) in PACKAGES and _top(mod) != top and _top(mod) not in ok
    ]
    assert not bad, "\n".join(bad)


def test_no_circle_between_packages() -> None:
    edges = {
        (top, _top(mod)) for top in PACKAGES for _, _, mod in _imports(top) if _top(mod) in PACKAGES and _top(mod) != top
    }

    def reaches(a: str, b: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(x == a and (y == b or (y not in seen and reaches(y, b, seen | {y}))) for x, y in edges)

    circles = sorted(top for top in PACKAGES if reaches(top, top))
    assert not circles, f"packages on an import circle: {circles} (edges {sorted(edges)})"
