"""The ``promptstore`` command line as a user runs it: real subprocesses of the installed
console script, in a fresh working folder, with only the PROMPTSTORE_ environment variables.

- ``tenant create NAME``: one JSON object on stdout; a duplicate name is a clear error.
- ``migrate`` against a fresh Postgres database; ``tenant create`` then works there.
- ``worker`` without a broker: a clear error.
- ``serve`` on the embedded defaults: applies the migrations, prints a generated admin token
  once, answers /healthz and /readyz, and a tenant, a task and classify work over real HTTP.
  On a non-embedded database it applies no migration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from freshdb import fresh_pg_url  # noqa: F401 - fixture
from procs import free_port, run_cli, settings_env, started
from psdata import b64, image_bytes

TINY = "open_clip:tiny:random"


def _env(**extra: str) -> dict[str, str]:
    return settings_env(None, PROMPTSTORE_BACKBONE=TINY, PROMPTSTORE_DEVICE="cpu", **extra)


def _one_json_object(stdout: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line of JSON on stdout, got: {stdout!r}"
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def test_tenant_create_never_makes_a_new_database(tmp_path: Path) -> None:
    # Run from a folder without the service's database: refused, naming the path it looked
    # at, and nothing is created (a new empty index would print a key the server rejects).
    r = run_cli(["tenant", "create", "acme"], env=_env(), cwd=tmp_path)
    assert r.returncode == 1 and r.stdout.strip() == "" and "Traceback" not in r.stderr
    assert f"no database at {tmp_path.resolve() / 'var' / 'promptstore.db'}" in r.stderr
    assert "promptstore serve" in r.stderr
    assert not (tmp_path / "var").exists()

    # An existing file that is not a migrated database: refused with the next step.
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "promptstore.db").write_bytes(b"")
    r = run_cli(["tenant", "create", "acme"], env=_env(), cwd=tmp_path)
    assert r.returncode == 1 and "is not migrated" in r.stderr and "promptstore migrate" in r.stderr


def test_tenant_create_prints_one_json_object_and_refuses_a_duplicate(tmp_path: Path) -> None:
    assert run_cli(["migrate"], env=_env(), cwd=tmp_path).returncode == 0
    r = run_cli(["tenant", "create", "acme"], env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = _one_json_object(r.stdout)
    assert set(out) == {"id", "name", "api_key"} and out["name"] == "acme"
    assert out["id"] and len(out["api_key"]) >= 32
    assert (tmp_path / "var" / "promptstore.db").is_file()
    # The key is stored only as a hash.
    assert out["api_key"].encode() not in (tmp_path / "var" / "promptstore.db").read_bytes()

    dup = run_cli(["tenant", "create", "acme"], env=_env(), cwd=tmp_path)
    assert dup.returncode != 0 and dup.stdout.strip() == ""
    assert "error:" in dup.stderr and "acme" in dup.stderr and "already exists" in dup.stderr
    assert "Traceback" not in dup.stderr

    other = run_cli(["tenant", "create", "globex"], env=_env(), cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert _one_json_object(other.stdout)["api_key"] != out["api_key"]


def test_migrate_against_postgres_then_tenant_create(tmp_path: Path, fresh_pg_url: str) -> None:
    from store.migrate import current_revision, head_revision

    env = _env(PROMPTSTORE_DATABASE_URL=fresh_pg_url)
    # Not the embedded database: tenant create does not migrate it, and says what to do.
    r = run_cli(["tenant", "create", "early"], env=env, cwd=tmp_path)
    assert r.returncode != 0 and "promptstore migrate" in r.stderr and "Traceback" not in r.stderr
    assert current_revision(fresh_pg_url) is None

    for _ in range(2):  # idempotent
        r = run_cli(["migrate"], env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert current_revision(fresh_pg_url) == head_revision()
    r = run_cli(["tenant", "create", "pg-tenant"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _one_json_object(r.stdout)["name"] == "pg-tenant"
    assert not (tmp_path / "var").exists()


def test_migrate_reports_an_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere?connect_timeout=2"
    r = run_cli(["migrate"], env=_env(PROMPTSTORE_DATABASE_URL=url), cwd=tmp_path)
    assert r.returncode != 0
    assert "error: cannot migrate the database" in r.stderr and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_worker_without_a_broker_is_a_clear_error(tmp_path: Path) -> None:
    r = run_cli(["worker"], env=_env(), cwd=tmp_path, timeout=60)
    assert r.returncode != 0
    assert "PROMPTSTORE_BROKER_URL is not set" in r.stderr and "Traceback" not in r.stderr


def test_invalid_settings_are_a_clear_error(tmp_path: Path) -> None:
    r = run_cli(["migrate"], env=_env(PROMPTSTORE_OBJECT_STORE_URL="ftp://nope"), cwd=tmp_path)
    assert r.returncode != 0 and "invalid settings" in r.stderr and "PROMPTSTORE_OBJECT_STORE_URL" in r.stderr


def _wait_ready(base: str, proc: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.proc.returncode}\n{proc.tail()}")
        try:
            r = httpx.get(f"{base}/readyz", timeout=5)
            last = r.json()
            if r.status_code == 200:
                return last
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"serve not ready after {timeout:.0f}s (last: {last!r})\n{proc.tail()}")


def test_serve_on_embedded_defaults_end_to_end_over_http(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with started(["serve", "--port", str(port)], env=_env(), cwd=tmp_path, name="serve") as serve:
        ready = _wait_ready(base, serve)
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert ready["backbone"]["id"].startswith(TINY) and ready["backbone"]["weights"] == "random", ready
        assert ready["jobs"] == "threads"
        assert "applying migrations" in serve.stderr()
        lines = serve.stdout().splitlines()
        assert any("Generated admin token" in ln for ln in lines), serve.tail()
        token = (tmp_path / "var" / "admin_token").read_text().strip()
        assert token in lines and len(token) >= 32
        assert (tmp_path / "var" / "promptstore.db").is_file()

        with httpx.Client(base_url=base, timeout=60) as http:
            admin = {"Authorization": f"Bearer {token}"}
            assert http.post("/v1/admin/tenants", json={"name": "x"}).status_code == 401
            r = http.post("/v1/admin/tenants", json={"name": "demo"}, headers=admin)
            assert r.status_code == 201, r.text
            key = {"Authorization": f"Bearer {r.json()['api_key']}"}
            r = http.post(
                "/v1/tasks", data={"name": "colours", "method": "zeroshot", "classes": '["red", "green", "blue"]'}, headers=key
            )
            assert r.status_code == 202, r.text
            tid = r.json()["id"]
            deadline = time.monotonic() + 120
            while (task := http.get(f"/v1/tasks/{tid}", headers=key).json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, task
                time.sleep(0.1)
            assert task["status"] == "ready" and task["version"] == 1, task
            r = http.post(f"/v1/tasks/{tid}/classify?top_k=1", files=[("images", ("a.png", image_bytes(0), "image/png"))],
                          headers=key)  # fmt: skip
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"]) == 1 and len(r.json()["predictions"][0]) == 1
            r = http.post(f"/v1/tasks/{tid}/classify", json={"images": [b64(image_bytes(1))]}, headers=key)
            assert r.status_code == 200, r.text
            assert {p["label"] for p in r.json()["predictions"][0]} == {"red", "green", "blue"}
            assert http.get("/metrics").status_code == 200

    # A second start reuses the kept token and prints no new one; the data is still there.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with started(["serve", "--port", str(port)], env=_env(), cwd=tmp_path, name="serve2") as serve:
        _wait_ready(base, serve)
        assert "Generated admin token" not in serve.stdout() and token not in serve.stdout()
        r = httpx.get(f"{base}/v1/admin/tenants", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["count"] == 1


def test_serve_applies_no_migration_to_a_non_embedded_database(tmp_path: Path, fresh_pg_url: str) -> None:
    from store.migrate import current_revision

    port = free_port()
    env = _env(PROMPTSTORE_DATABASE_URL=fresh_pg_url, PROMPTSTORE_ADMIN_TOKEN="a-real-secret-" + "y" * 24)
    with started(["serve", "--port", str(port)], env=env, cwd=tmp_path, name="serve") as serve:
        serve.wait_for("Uvicorn running", timeout=90)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        assert "applying migrations" not in serve.stderr()
        assert "Generated admin token" not in serve.stdout()
    assert current_revision(fresh_pg_url) is None
