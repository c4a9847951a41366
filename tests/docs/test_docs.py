"""The repository documents itself: the reference in docs/ covers every setting and every
route, the README links it, and nothing points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_every_setting_is_documented_in_docs_settings() -> None:
    from store.settings import Settings

    text = (DOCS / "settings.md").read_text()
    missing = [f"PROMPTSTORE_{name.upper()}" for name in Settings.model_fields
               if f"`PROMPTSTORE_{name.upper()}`" not in text]
    assert not missing, f"docs/settings.md lacks {missing}"


def test_every_route_is_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.app import create_app

    monkeypatch.chdir(tmp_path)
    spec = create_app().openapi()
    text = (DOCS / "api.md").read_text()
    missing = []
    for path, ops in spec["paths"].items():
        for verb in ops:
            if f"{verb.upper()} {path.replace('{task_id}', '{id}')}" not in text:
                missing.append(f"{verb.upper()} {path}")
    assert not missing, f"docs/api.md lacks {missing}"


def test_the_readme_links_every_doc_and_every_link_resolves() -> None:
    readme = (ROOT / "README.md").read_text()
    for doc in sorted(DOCS.glob("*.md")):
        assert f"docs/{doc.name}" in readme, f"README.md does not link docs/{doc.name}"
    for md in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.name} links {target}, which does not exist"


def test_nothing_points_outside_the_repository() -> None:
    pattern = re.compile(r"\.\./shared|shared/(API|METHODS|STYLE)\.md|\b(API|METHODS|STYLE)\.md\b")
    offenders = []
    for folder in ("api", "worker", "store", "backbone", "migrations", "deploy", "docs", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in {".py", ".md", ".yaml", ".yml", ".html", ".toml", ".txt"} or path == Path(__file__):
                continue
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}")
    readme = (ROOT / "README.md").read_text()
    assert not pattern.search(readme), "README.md points outside the repository"
    assert not offenders, offenders


def test_methods_doc_holds_each_registered_method_config_table() -> None:
    from api.methods_doc import config_block
    from backbone.methods import method_names

    text = (DOCS / "methods.md").read_text()
    stale = [m for m in method_names() if config_block(m) not in text]
    assert not stale, (
        f"docs/methods.md has stale or missing config tables for {stale}; regenerate them with "
        "`promptstore methods` (or api.methods_doc.all_blocks())"
    )
    for m in method_names():
        assert f"| `{m}` |" in text, f"docs/methods.md's overview table lacks {m}"
