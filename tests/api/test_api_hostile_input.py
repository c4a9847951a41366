"""Hostile JSON and text, and hostile values already stored (docs/inputs.md "Text and JSON",
docs/operations.md "Hostile input and the error contract"), on SQLite and Postgres.

Input: every JSON and text a client sends is bounded (depth, size), valid Unicode and free of
control characters in names, refused with a 4xx ``{"detail": str}`` naming the field, and
nothing is stored. Stored: rows written directly with lone surrogates, control characters,
invalid UTF-8, NaN and configs nested 100,000 deep are listed and shown with 200, never 500.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from apiclient import ADMIN, Api, _one_torch_thread, embedded_settings, running_app  # noqa: F401
from psdata import image_bytes
from sqlalchemy import text

DEEP = [10_000, 100_000]


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    overrides: dict[str, Any] = {"jobs_per_minute": 0, "classify_rate": 0}
    if request.param == "postgres":
        overrides["database_url"] = request.getfixturevalue("pg_url")
    settings = embedded_settings(tmp_path_factory.mktemp(f"hostile-{request.param}"), **overrides)
    with running_app(settings) as client:
        yield Api(client)


@pytest.fixture(scope="module")
def ready_task(api: Api) -> tuple[dict[str, str], str]:
    tenant = api.tenant()
    r = api.create_task(tenant, "zeroshot", classes=["cat", "dog"], name="pets")
    api.wait_ready(tenant, r.json()["id"])
    return tenant, r.json()["id"]


def _refused(r: Any, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "Traceback" not in detail
    for needle in needles:
        assert needle in detail, (needle, detail)
    return detail


def _form(api: Api, tenant: dict[str, str], **fields: str | bytes) -> Any:
    """POST /v1/tasks with the raw text fields given (bytes are sent as they are)."""
    files = {k: (None, v) for k, v in fields.items()}
    return api.client.post("/v1/tasks", files=files, headers=tenant)


def _no_tasks(api: Api, tenant: dict[str, str]) -> None:
    r = api.client.get("/v1/tasks", headers=tenant)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 0


# --------------------------------------------------------------------------- deep nesting


@pytest.mark.parametrize("depth", DEEP)
def test_deeply_nested_config_and_classes_are_refused(api: Api, depth: int) -> None:
    tenant = api.tenant()
    config = '{"x": ' + _nested(depth) + "}"
    if len(config) <= 64 * 1024:  # deeper than the bound: 422 naming it
        _refused(_form(api, tenant, name="t", method="zeroshot", classes='["a", "b"]', config=config),
                 422, "config", "nested", "32")
    else:  # the size bound answers first
        _refused(_form(api, tenant, name="t", method="zeroshot", classes='["a", "b"]', config=config),
                 413, "config", "65536")
    _refused(_form(api, tenant, name="t", method="coop", config=_nested(min(depth, 30_000))), 422, "config", "nested")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes=_nested(depth, '"a"')), 422, "classes", "nested")
    _no_tasks(api, tenant)


@pytest.mark.parametrize("depth", DEEP)
def test_deeply_nested_json_bodies_are_refused(api: Api, ready_task: tuple[dict[str, str], str], depth: int) -> None:
    tenant, task_id = ready_task
    for body in ('{"images": ' + _nested(depth, '"AAAA"') + "}", _nested(depth), '{"images": ["x"], "y": ' + _nested(depth) + "}"):
        r = api.client.post(f"/v1/tasks/{task_id}/classify", content=body,
                            headers={**tenant, "Content-Type": "application/json"})
        _refused(r, 422, "request body", "nested")
    before = api.client.get("/v1/admin/tenants", headers=ADMIN).json()["count"]
    for body in ('{"name": ' + _nested(depth, '"x"') + "}", _nested(depth), '{"name": "deep", "x": ' + _nested(depth) + "}"):
        r = api.client.post("/v1/admin/tenants", content=body, headers={**ADMIN, "Content-Type": "application/json"})
        if len(body) <= 64 * 1024:
            _refused(r, 422, "request body", "nested")
        else:  # the admin body's size bound answers first
            _refused(r, 413, "request body", "65536")
    assert api.client.get("/v1/admin/tenants", headers=ADMIN).json()["count"] == before
    # without the admin token, a hostile body is still a 401: nothing is said about the body
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        r = api.client.post("/v1/admin/tenants", content='{"name": ' + _nested(min(depth, 5000), '"x"') + "}",
                            headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 401, r.text


# --------------------------------------------------------------------------- invalid Unicode


def test_lone_surrogates_are_refused_and_the_tenant_keeps_working(api: Api) -> None:
    tenant = api.tenant()
    # the input: a JSON escape of a lone surrogate in zeroshot classes
    _refused(_form(api, tenant, name="t", method="zeroshot", classes='["cat", "\\ud800"]'), 422, "classes", "surrogate")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes='["cat", "dog\\udfff"]'), 422, "classes", "surrogate")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes='["a", "b"]', config='{"\\ud83d": 1}'), 422, "config", "surrogate")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes='["a", "b"]',
                   config='{"templates": "custom", "custom_templates": ["a {} \\udc00"]}'), 422, "config", "surrogate")
    _no_tasks(api, tenant)
    for body in (b'{"name": "\\ud800"}', b'{"name": "ok\\udbff"}'):
        r = api.client.post("/v1/admin/tenants", content=body, headers={**ADMIN, "Content-Type": "application/json"})
        _refused(r, 422, "surrogate")
    assert api.client.get("/v1/admin/tenants", headers=ADMIN).status_code == 200


def test_invalid_utf8_bytes_are_refused(api: Api, ready_task: tuple[dict[str, str], str]) -> None:
    tenant, task_id = ready_task
    # raw bytes in JSON bodies: strict UTF-8
    for body in (b'{"name": "\xed\xa0\x80"}', b'{"name": "\xff\xfe"}', b'{"name": "caf\xe9"}'):
        r = api.client.post("/v1/admin/tenants", content=body, headers={**ADMIN, "Content-Type": "application/json"})
        _refused(r, 422, "UTF-8")
    png = base64.b64encode(image_bytes(0)).decode()
    for body in (b'{"images": ["\xed\xa0\x80"]}', ('{"images": ["' + png + '"], "x": "').encode() + b'\xc3"}'):
        r = api.client.post(f"/v1/tasks/{task_id}/classify", content=body, headers={**tenant, "Content-Type": "application/json"})
        _refused(r, 422, "UTF-8")
    # raw bytes in multipart text fields: the framework reads a field that is not UTF-8 as
    # Latin-1, so an encoded surrogate becomes C1 control characters, refused in names
    other = api.tenant()
    _refused(_form(api, other, name=b"t\xed\xa0\x80", method="zeroshot", classes='["a", "b"]'), 422, "name", "U+0080")
    _refused(_form(api, other, name="t", method="zeroshot", classes=b'["cat", "\xed\xa0\x80"]'), 422, "classes[1]")
    _refused(_form(api, other, name="t", method="zeroshot", classes='["a", "b"]', config=b'{"x\x80\x9f": 1}'), 422, "config")
    _no_tasks(api, other)


# --------------------------------------------------------------------------- control characters


@pytest.mark.parametrize("bad", ["a\x00b", "a\x1b[31mred", "evil\u202etxt.exe", "two\nlines", "a\u2028b", "a\x85b"])
def test_control_characters_in_names_are_refused(api: Api, bad: str) -> None:
    tenant = api.tenant()
    _refused(_form(api, tenant, name=bad, method="zeroshot", classes='["a", "b"]'), 422, "name", "U+")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes=json.dumps(["cat", bad])), 422, "classes[1]", "U+")
    _no_tasks(api, tenant)
    r = api.client.post("/v1/admin/tenants", json={"name": bad}, headers=ADMIN)
    _refused(r, 422, "name", "U+")


def test_control_characters_in_config_strings_are_refused(api: Api) -> None:
    tenant = api.tenant()
    for cfg in ('{"templates": "custom", "custom_templates": ["a {}\\u0000"]}', '{"x\\u001b": 1}', '{"a": "\\u007f"}'):
        _refused(_form(api, tenant, name="t", method="zeroshot", classes='["a", "b"]', config=cfg), 422, "config", "control")
    _no_tasks(api, tenant)


# --------------------------------------------------------------------------- size bounds


def test_huge_strings_and_lists_are_refused(api: Api) -> None:
    tenant = api.tenant()
    _refused(_form(api, tenant, name="n" * 10_000, method="zeroshot", classes='["a", "b"]'), 422, "name")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes=json.dumps(["a", "b" * 5000])), 422, "classes[1]", "1000")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes=json.dumps([f"c{i}" for i in range(10_001)])), 413, "10000")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes=json.dumps(["a" * 900] * 1300)), 413, "1 MiB")
    _refused(_form(api, tenant, name="t", method="zeroshot", classes='["a", "b"]',
                   config=json.dumps({"x": "y" * 70_000})), 413, "config", "65536")
    _no_tasks(api, tenant)
    _refused(api.client.post("/v1/admin/tenants", json={"name": "t" * 10_000}, headers=ADMIN), 422, "name")
    _refused(api.client.post("/v1/admin/tenants", content=json.dumps({"name": "t", "x": "y" * 100_000}),
                             headers={**ADMIN, "Content-Type": "application/json"}), 413, "request body")


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity"])
def test_non_finite_numbers_in_config_are_refused(api: Api, number: str) -> None:
    tenant = api.tenant()
    r = _form(api, tenant, name="t", method="zeroshot", classes='["a", "b"]', config='{"temperature": ' + number + "}")
    assert r.status_code == 422, r.text
    _no_tasks(api, tenant)


def test_valid_unicode_names_are_kept(api: Api) -> None:
    tenant = api.tenant()
    r = _form(api, tenant, name=" ねこ 🐈 ", method="zeroshot", classes=json.dumps(["cafe\u0301", "Собака"]))
    assert r.status_code == 202, r.text
    assert r.json()["name"] == "ねこ 🐈" and r.json()["classes"] == ["café", "Собака"]


# --------------------------------------------------------------------------- stored hostile values


def _store_hostile(api: Api, task_id: str, tenant_id: str) -> None:
    """Write hostile values straight into the rows, as far as the database takes them."""
    sm = api.state.sessionmaker
    deep = _nested(100_000)
    with sm() as s:
        dialect = s.get_bind().dialect.name
        s.execute(text("UPDATE tenants SET name = :n WHERE id = :id"), {"n": "esc\x1b[31m\u202eevil", "id": tenant_id})
        values = {
            "classes": '["\\ud800", "bell\\u0007", "ok"]',
            "config": '{"\\udfff": "\\ud800", "deep": [[[1]]]}',
            "history": deep,
            "confusion": '[["x"]]',
            "training": '{"status": "running", "progress": "oops", "error": "\\ud800"}',
            "error": "err\x1b\u202e",
        }
        if dialect == "sqlite":
            values["metrics"] = '{"val_accuracy": NaN, "loss": Infinity}'
            values["config"] = deep
        else:  # Postgres' json refuses NaN, and may refuse 100,000 levels: store what it takes
            values["metrics"] = '{"val_accuracy": "\\ud800"}'
        stored_refused: list[str] = []
        for column, value in values.items():
            param = "CAST(:v AS JSON)" if column != "error" and dialect == "postgresql" else ":v"
            try:
                with s.begin_nested():
                    s.execute(text(f"UPDATE tasks SET {column} = {param} WHERE id = :id"), {"v": value, "id": task_id})
            except Exception:  # Postgres refused it (e.g. too deep for its parser): it cannot be stored
                if dialect != "postgresql" or column not in ("history", "config"):
                    raise
                stored_refused.append(column)
        if dialect == "sqlite":  # bytes that are not UTF-8 in TEXT columns
            s.execute(text("UPDATE tasks SET name = CAST(X'61EDA08062FF' AS TEXT) WHERE id = :id"), {"id": task_id})
        else:
            s.execute(text("UPDATE tasks SET name = :n WHERE id = :id"), {"n": "nul?\x7f\u202e", "id": task_id})
        s.commit()


def test_stored_hostile_values_never_break_a_read(api: Api) -> None:
    tenant = api.tenant()
    r = api.create_task(tenant, "zeroshot", classes=["cat", "dog"], name="victim")
    task_id = r.json()["id"]
    api.wait(tenant, task_id, lambda t: t["status"] in ("ready", "failed"))
    with api.state.sessionmaker() as s:
        tenant_id = s.execute(text("SELECT tenant_id FROM tasks WHERE id = :id"), {"id": task_id}).scalar_one()
    _store_hostile(api, task_id, tenant_id)

    r = api.client.get("/v1/tasks", headers=tenant)
    assert r.status_code == 200, r.text
    listed = r.json()["items"][0]
    assert "\ufffd" in listed["classes"][0] and listed["classes"][2] == "ok"
    r = api.client.get(f"/v1/tasks/{task_id}", headers=tenant)
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["confusion"] is None and task["training"]["progress"] == 0.0
    if task["metrics"] is not None and "val_accuracy" in task["metrics"]:
        assert task["metrics"]["val_accuracy"] in (None, "\ufffd")
    r = api.client.get("/v1/admin/tenants", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert any("\x1b" in t["name"] for t in r.json()["items"])  # control characters come back escaped in JSON
    for page in ("/admin", "/admin/tasks", f"/admin/tasks/{task_id}", "/admin/tenants", "/admin/api/overview",
                 f"/admin/api/tasks?ids={task_id}"):
        r = api.client.get(page, headers=ADMIN)
        assert r.status_code == 200, (page, r.status_code, r.text[:500])
    r = api.client.get(f"/v1/tasks/{task_id}/prompt", headers=tenant)
    assert r.status_code < 500, r.text
