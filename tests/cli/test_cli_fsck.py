"""``promptstore fsck`` as a user runs it (a real subprocess, PROMPTSTORE_ variables only), on
SQLite with the local store and on Postgres with the S3 server: one JSON object on stdout
listing orphans and missing objects, ``--gc`` deleting the orphans older than the grace, exit
status 1 when a row's object is missing, and the refusal of a missing database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from freshdb import fresh_pg_url  # noqa: F401 - fixture
from procs import run_cli, settings_env

from store import repo
from store.db import make_engine, make_sessionmaker, session_scope
from store.objects import dataset_key, open_object_store, sha256_hex


def _fsck(settings: Any, cwd: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    r = run_cli(["fsck", *args], env=settings_env(settings), cwd=cwd)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout + r.stderr
    return r.returncode, json.loads(lines[0]), r.stderr


@pytest.mark.parametrize("db,objects", [("sqlite", "local"), ("postgres", "s3")], ids=["sqlite-local", "postgres-s3"])
def test_fsck_lists_orphans_collects_them_and_fails_on_a_missing_object(
    db: str, objects: str, settings_factory: Any, tmp_path: Path, request: Any
) -> None:
    url = request.getfixturevalue("fresh_pg_url") if db == "postgres" else "sqlite"
    settings = settings_factory(db=url, objects=objects)  # its own database: fsck sees every row
    store = open_object_store(settings)
    engine = make_engine(settings.database_url)
    try:
        sm = make_sessionmaker(engine)
        with session_scope(sm) as s:
            tenant, _ = repo.create_tenant(s, f"fsck-{tmp_path.name}")
            tid = tenant.id
        kept = dataset_key(tid, sha256_hex(b"kept"))
        store.put(kept, b"kept")
        with session_scope(sm) as s:
            ds = repo.create_dataset(s, tenant_id=tid, object_key=kept, sha256=sha256_hex(b"kept"), size=4,
                                     classes=["a", "b"], counts={"a": 1, "b": 1})  # fmt: skip
            repo.create_task(s, tenant_id=tid, name="t", method="coop", config={}, classes=["a", "b"],
                             dataset_id=ds.id)  # fmt: skip
        orphan = dataset_key(tid, sha256_hex(b"orphan"))
        store.put(orphan, b"orphan")

        code, out, _ = _fsck(settings, tmp_path)
        assert code == 0
        mine = [o for o in out["orphans"] if f"/{tid}/" in o["key"]]
        assert [(o["key"], o["collectable"]) for o in mine] == [(orphan, False)]
        assert [m for m in out["missing"] if m["tenant_id"] == tid] == []

        code, out, _ = _fsck(settings, tmp_path, "--gc")  # default grace (a day): nothing old enough
        assert code == 0 and orphan not in out["collected"] and store.exists(orphan)
        code, out, _ = _fsck(settings, tmp_path, "--gc", "--grace", "0")
        assert code == 0 and orphan in out["collected"] and kept not in out["collected"]
        assert not store.exists(orphan) and store.exists(kept)

        store.delete(kept)  # a row without its object
        code, out, err = _fsck(settings, tmp_path)
        assert code == 1 and "point at an object that is not in" in err
        assert [(m["table"], m["object_key"]) for m in out["missing"] if m["tenant_id"] == tid] == [("datasets", kept)]
    finally:
        engine.dispose()


def test_fsck_refuses_a_missing_database(tmp_path: Path) -> None:
    r = run_cli(["fsck"], env=settings_env(None), cwd=tmp_path)
    assert r.returncode == 1 and r.stdout.strip() == "" and "no database at" in r.stderr
    assert not (tmp_path / "var").exists()
