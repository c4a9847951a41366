"""Lists that scale (issue "Lists that scale"): ``GET /v1/tasks`` and ``GET /v1/admin/tenants``
page with ``limit`` and an opaque ``cursor`` (keyset, ``store.listing``), filter by status,
method and name prefix, and carry slim items; ``GET /v1/tasks/{id}`` leaves the heavy fields
out unless ``include=`` asks, and ``/history`` and ``/confusion`` serve them on their own.

10,000 tasks are seeded straight into the store (one bulk INSERT) on SQLite and Postgres; the
pages are read while more tasks are added between them. That a page takes milliseconds is
shown by the query plan: the tenant's (tenant_id, created_at) index serves the page's range
and order (no timing is asserted).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from apiclient import ADMIN
from psdata import dataset_zip
from sqlalchemy import delete, insert, text

from store import listing
from store.models import Task, Tenant, new_id

N_TASKS = 10_000
METHODS = ("coop", "zeroshot", "linear-probe", "vpt-deep")
STATUSES = ("queued", "running", "ready", "failed", "cancelled")
BASE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
#: Seeded queued and running tasks look sent and leased until then: no runner or reconciler
#: takes them up (and they are deleted at the end: the Postgres database is the session's).
FAR = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)


def _settings(settings_factory: Any, backend: str) -> Any:
    return settings_factory(db=backend, objects="local")


def _new_tenant(api: Any, name: str) -> tuple[str, dict[str, str]]:
    r = api.client.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}


def _row(tenant_id: str, i: int, created_at: dt.datetime, *, name: str | None = None) -> dict[str, Any]:
    status = STATUSES[i % len(STATUSES)]
    return {
        "id": new_id(), "tenant_id": tenant_id, "name": name or f"task-{i:05d}", "method": METHODS[i % len(METHODS)],
        "config": {}, "classes": ["a", "b"], "status": status, "run_status": status, "progress": 0.5,
        "metrics": {"val_accuracy": 0.5, "per_class": [{"label": "a"}]} if status == "ready" else None,
        "history": [{"epoch": 1, "loss": 1.0}] * 20, "confusion": [[1, 0], [0, 1]],
        "created_at": created_at, "updated_at": created_at, "attempt": 1, "cancel_requested": False,
        "queued_at": FAR, "lease_owner": "seeded", "lease_expires_at": FAR,
    }


def _seed(sm: Any, rows: list[dict[str, Any]]) -> None:
    with sm() as s:
        s.execute(insert(Task), rows)
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("ANALYZE tasks"))
        s.commit()


@pytest.fixture
def seeded() -> Iterator[list[tuple[Any, str]]]:
    """Append ``(sessionmaker, tenant_id)``: that tenant's tasks are deleted at the end."""
    owners: list[tuple[Any, str]] = []
    yield owners
    for sm, tenant_id in owners:
        with sm() as s:
            s.execute(delete(Task).where(Task.tenant_id == tenant_id))
            s.commit()


def _get(api: Any, headers: dict[str, str], path: str, **params: Any) -> dict[str, Any]:
    r = api.client.get(path, params={k: v for k, v in params.items() if v is not None}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _walk(api: Any, headers: dict[str, str], limit: int, **filters: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = _get(api, headers, "/v1/tasks", limit=limit, cursor=cursor, **filters)
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def _plan(sm: Any, stmt: Any) -> str:
    """The database's plan of ``stmt`` (its parameters inlined)."""
    with sm() as s:
        dialect = s.get_bind().dialect
        sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN QUERY PLAN " if dialect.name == "sqlite" else "EXPLAIN "
        rows = s.execute(text(explain + sql.replace("%%", "%"))).all()
    return "\n".join(str(r[-1]) for r in rows)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_ten_thousand_tasks_page_with_stable_cursors_while_tasks_are_added(
    backend: str, settings_factory: Any, make_api: Any, seeded: list[tuple[Any, str]]
) -> None:
    api = make_api(_settings(settings_factory, backend))
    sm = api.state.sessionmaker
    tenant_id, tenant = _new_tenant(api, f"many-{new_id()}")
    other_id, other = _new_tenant(api, f"other-{new_id()}")
    seeded += [(sm, tenant_id), (sm, other_id)]
    # every third task shares its created_at with the next two: ties are ordered by id
    rows = [_row(tenant_id, i, BASE + dt.timedelta(seconds=i // 3)) for i in range(N_TASKS)]
    for i, r in enumerate(rows[:40]):  # LIKE wildcards in names: a prefix matches them literally
        r["name"] = f"50%_off-{i}" if i % 2 else f"50xxoff-{i}"
    _seed(sm, rows + [_row(other_id, i, BASE + dt.timedelta(seconds=i)) for i in range(500)])
    original = {r["id"] for r in rows}

    # the whole list, 1000 a page, while tasks are added between the pages: new ones (newest,
    # before the first page) and backdated ones (among the pages already read and to come)
    rng = random.Random(7)
    added_rows: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        page = _get(api, tenant, "/v1/tasks", limit=1000, cursor=cursor)
        pages += 1
        assert len(page["items"]) <= 1000
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        n = N_TASKS + len(added_rows)
        more = [_row(tenant_id, n + k, dt.datetime.now(dt.timezone.utc)) for k in range(20)]
        more += [_row(tenant_id, n + 20 + k, BASE + dt.timedelta(seconds=rng.randrange(N_TASKS // 3))) for k in range(20)]
        _seed(sm, more)
        added_rows += more
    added = {r["id"] for r in added_rows}
    ids = [t["id"] for t in seen]
    assert len(ids) == len(set(ids)), "an item came twice"
    assert original <= set(ids), f"{len(original - set(ids))} of the original tasks were skipped"
    assert set(ids) <= original | added, "another tenant's task was listed"
    keys = [(t["created_at"], t["id"]) for t in seen]
    assert keys == sorted(keys, reverse=True), "not newest first by (created_at, id)"
    assert pages >= N_TASKS // 1000
    assert page["count"] == N_TASKS + len(added)  # the total, not the page

    # slim items: the cheap fields only, scalar metrics
    item = next(t for t in seen if t["status"] == "ready")
    assert set(item) == {"id", "name", "method", "config", "warnings", "status", "progress", "classes", "n_classes", "metrics", "error",
                         "version", "created_at", "updated_at"}  # fmt: skip
    assert item["metrics"] == {"val_accuracy": 0.5} and item["classes"] == ["a", "b"] and item["n_classes"] == 2

    # the other tenant sees its own 500 only
    theirs = _walk(api, other, 300)
    assert len(theirs) == 500 and not {t["id"] for t in theirs} & set(ids)

    # filters, also paged; count is the total matching
    everything = rows + added_rows
    for filters, expected in [
        ({"status": "ready"}, [r for r in everything if r["status"] == "ready"]),
        ({"status": "failed,cancelled"}, [r for r in everything if r["status"] in ("failed", "cancelled")]),
        ({"method": "coop", "status": "queued"}, [r for r in everything if r["method"] == "coop" and r["status"] == "queued"]),
        ({"name_prefix": "50%_"}, [r for r in everything if r["name"].startswith("50%_")]),
        ({"name_prefix": "task-0999"}, [r for r in everything if r["name"].startswith("task-0999")]),
        ({"name_prefix": "TASK-"}, []),  # case-sensitive on both databases
    ]:
        want = {r["id"] for r in expected}
        got = _walk(api, tenant, 700, **filters)
        assert {t["id"] for t in got} == want, filters
        assert _get(api, tenant, "/v1/tasks", limit=1, **filters)["count"] == len(want), filters
    assert len(_walk(api, tenant, 7, name_prefix="50%_")) == 20

    # the query plan: the tenant's (tenant_id, created_at) index serves a page, at the start and
    # deep in the list (its range and its order: the tenant's tasks are neither scanned nor sorted)
    deep = listing.encode_cursor(listing.TASKS, BASE + dt.timedelta(seconds=N_TASKS // 6), "f" * 32)
    for cur in (None, deep):
        for limit in (100, 1000):
            plan = _plan(sm, listing.task_page_query(tenant_id, limit=limit, cursor=cur))
            assert "ix_tasks_tenant_id_created_at" in plan, plan
            assert "SCAN tasks" not in plan and "Seq Scan" not in plan, plan


def _edited(cursor: str) -> list[str]:
    """Cursors a person made from a real one: another time, another id, an extra key, no check."""
    data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    variants = [
        {**data, "t": "2000-01-01T00:00:00+00:00"}, {**data, "i": "zzzz"}, {**data, "x": 1},
        {k: v for k, v in data.items() if k != "c"},
    ]
    return [base64.urlsafe_b64encode(json.dumps(v).encode()).decode().rstrip("=") for v in variants]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_list_parameters_are_checked_naming_what_is_accepted(backend: str, settings_factory: Any, make_api: Any) -> None:
    api = make_api(_settings(settings_factory, backend))
    _, tenant = _new_tenant(api, f"params-{new_id()}")
    tenants_cursor = listing.encode_cursor(listing.TENANTS, BASE, "x" * 32)
    cases = [
        ({"limit": 0}, "limit", "1 to 1000"),
        ({"limit": 1001}, "limit", "1 to 1000"),
        ({"limit": "many"}, "limit", "integer"),
        ({"cursor": "not-a-cursor"}, "cursor", "next_cursor"),
        ({"cursor": base64.urlsafe_b64encode(b'{"v": 1}').decode()}, "cursor", "next_cursor"),
        ({"cursor": tenants_cursor}, "cursor", "next_cursor"),  # a cursor of another list
        *(({"cursor": c}, "cursor", "next_cursor") for c in _edited(listing.encode_cursor(listing.TASKS, BASE, "x" * 32))),
        ({"status": "done"}, "status", "queued, running, ready, failed, cancelled"),
        ({"method": "magic"}, "method", "coop"),
        ({"name_prefix": "x" * 201}, "name_prefix", "200"),
    ]
    for params, name, accepted in cases:
        r = api.client.get("/v1/tasks", params=params, headers=tenant)
        assert r.status_code == 422, (params, r.text)
        detail = r.json()["detail"]
        assert detail.startswith(name) and accepted in detail, (params, detail)
    for params, name, accepted in cases[:5] + cases[-1:]:
        r = api.client.get("/v1/admin/tenants", params=params, headers=ADMIN)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["detail"].startswith(name) and accepted in r.json()["detail"]
    r = api.client.get("/v1/admin/tenants", params={"cursor": listing.encode_cursor(listing.TASKS, BASE, "x")},
                       headers=ADMIN)  # fmt: skip
    assert r.status_code == 422 and r.json()["detail"].startswith("cursor")
    # no filter, no cursor: the old answer's keys, plus next_cursor
    assert api.client.get("/v1/tasks", headers=tenant).json() == {"items": [], "count": 0, "next_cursor": None}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_tenants_page_oldest_first_with_their_counts(
    backend: str, settings_factory: Any, make_api: Any, seeded: list[tuple[Any, str]]
) -> None:
    api = make_api(_settings(settings_factory, backend))
    prefix = f"page-{new_id()[:8]}-"
    ids = [_new_tenant(api, f"{prefix}{i:02d}")[0] for i in range(7)]
    seeded.append((api.state.sessionmaker, ids[2]))
    _seed(api.state.sessionmaker, [_row(ids[2], i, BASE + dt.timedelta(seconds=i)) for i in range(5)])
    with api.state.sessionmaker() as s:  # two tenants created in the same microsecond: ordered by id
        same = s.get(Tenant, ids[4]).created_at
        s.execute(Tenant.__table__.update().where(Tenant.id == ids[5]).values(created_at=same))
        s.commit()

    listed: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = _get(api, ADMIN, "/v1/admin/tenants", limit=2, cursor=cursor, name_prefix=prefix)
        assert page["count"] == len(ids)  # the late one too, once created
        listed += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        if len(listed) == 2:  # a tenant created meanwhile comes last, once
            ids.append(_new_tenant(api, f"{prefix}late")[0])
    expected = ids[:4] + sorted(ids[4:6]) + ids[6:]
    assert [t["id"] for t in listed] == expected
    assert {t["name"]: t["task_count"] for t in listed}[f"{prefix}02"] == 5
    assert all(t["task_count"] == 0 for t in listed if t["id"] != ids[2])
    assert set(listed[0]) == {"id", "name", "created_at", "task_count", "request_count", "last_request_at"}
    assert _get(api, ADMIN, "/v1/admin/tenants", limit=1000)["count"] >= 8  # all tenants, without a prefix


def _coop(api: Any, tenant: dict[str, str], **kw: Any) -> dict[str, Any]:
    task = api.create_task(tenant, "coop", dataset=dataset_zip(("bird", "cat", "dog"), per_class=4),
                           config={"epochs": 3, "n_ctx": 2}, **kw).json()  # fmt: skip
    return api.wait_ready(tenant, task["id"])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_heavy_fields_only_when_asked_and_as_sub_resources(backend: str, settings_factory: Any, make_api: Any) -> None:
    api = make_api(_settings(settings_factory, backend))
    _, tenant = _new_tenant(api, f"heavy-{new_id()}")
    task = _coop(api, tenant)
    tid = task["id"]
    assert task["history"] is None and task["confusion"] is None  # GET without include
    assert "per_class" not in task["metrics"]
    for key in ("val_accuracy", "train_seconds", "n_train", "n_val"):
        assert key in task["metrics"]

    full = _get(api, tenant, f"/v1/tasks/{tid}", include="history,confusion,per_class")
    assert [h["epoch"] for h in full["history"]] == [1, 2, 3]
    assert len(full["confusion"]) == 3 and all(len(row) == 3 for row in full["confusion"])
    assert sum(map(sum, full["confusion"])) == task["metrics"]["n_val"]
    assert {k: v for k, v in full.items() if k not in ("history", "confusion", "metrics")} == {
        k: v for k, v in task.items() if k not in ("history", "confusion", "metrics")}
    only = _get(api, tenant, f"/v1/tasks/{tid}", include="history")
    assert only["history"] == full["history"] and only["confusion"] is None
    if "per_class" in full["metrics"]:  # tuning measures it on the validation split
        assert [c["label"] for c in full["metrics"]["per_class"]] == ["bird", "cat", "dog"]

    history = _get(api, tenant, f"/v1/tasks/{tid}/history")
    assert history == {"task_id": tid, "version": 1, "history": full["history"], "run": None}
    confusion = _get(api, tenant, f"/v1/tasks/{tid}/confusion")
    assert confusion["version"] == 1 and confusion["classes"] == ["bird", "cat", "dog"]
    assert confusion["matrix"] == full["confusion"]
    assert confusion["per_class"] == full["metrics"].get("per_class")

    # a retrain in progress: its own epochs under `run`, the served version's stay
    r = api.client.post(f"/v1/tasks/{tid}/retrain", data={"config": json.dumps({"epochs": 10_000, "n_ctx": 2})},
                        headers=tenant)  # fmt: skip
    assert r.status_code == 202, r.text
    assert r.json()["history"] is None and r.json()["confusion"] is None  # answers are slim too
    deadline = time.monotonic() + 120
    while not ((during := _get(api, tenant, f"/v1/tasks/{tid}/history"))["run"] or {}).get("history"):
        assert time.monotonic() < deadline, during
        time.sleep(0.05)
    assert during["history"] == full["history"] and during["run"]["status"] == "running"
    assert during["run"]["history"] and during["run"]["history"][0]["epoch"] == 1
    assert api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant).status_code == 202
    api.wait(tenant, tid, lambda t: t["training"]["status"] == "cancelled")
    after = _get(api, tenant, f"/v1/tasks/{tid}/history")
    assert after["run"]["status"] == "cancelled" and after["history"] == full["history"]

    # errors: unknown include names the accepted ones; another tenant's task is 404
    r = api.client.get(f"/v1/tasks/{tid}", params={"include": "history,weights"}, headers=tenant)
    assert r.status_code == 422 and r.json()["detail"] == (
        "include: unknown field 'weights'; accepted: history, confusion, per_class (comma-separated)")
    _, stranger = _new_tenant(api, f"stranger-{new_id()}")
    for path in (f"/v1/tasks/{tid}/history", f"/v1/tasks/{tid}/confusion", f"/v1/tasks/{tid}"):
        r = api.client.get(path, headers=stranger)
        assert r.status_code == 404 and r.json() == {"detail": f"task {tid} not found"}


def test_zeroshot_with_a_thousand_classes_answers_small(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    _, tenant = _new_tenant(api, f"wide-{new_id()}")
    classes = [f"class {i}" for i in range(1000)]
    task = api.create_task(tenant, "zeroshot", classes=classes).json()
    api.wait_ready(tenant, task["id"])
    r = api.client.get(f"/v1/tasks/{task['id']}", headers=tenant)
    assert r.status_code == 200 and r.json()["confusion"] is None and r.json()["history"] is None
    assert len(r.content) < 40_000, len(r.content)  # the class names, not a 1,000 x 1,000 matrix
    confusion = _get(api, tenant, f"/v1/tasks/{task['id']}/confusion")
    assert confusion["matrix"] is None and confusion["classes"] == classes  # no validation split
    listed = api.client.get("/v1/tasks", headers=tenant)
    assert listed.json()["items"][0]["n_classes"] == 1000 and len(listed.content) < 40_000


class _Via(httpx.BaseTransport):
    """An httpx transport that sends through the app's test client (the app in-process)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.client.request(request.method, str(request.url), headers=dict(request.headers), content=request.read())
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)


def test_the_client_lists_every_page(settings_factory: Any, make_api: Any, seeded: list[tuple[Any, str]]) -> None:
    """``PromptstoreClient.list_tasks`` / ``list_tenants`` (``promptstore tasks list``, ``tenant
    list``) follow ``next_cursor`` to the last page."""
    from api.client import PromptstoreClient

    api = make_api(settings_factory())
    tenant_id, tenant = _new_tenant(api, f"client-{new_id()}")
    seeded.append((api.state.sessionmaker, tenant_id))
    rows = [_row(tenant_id, i, BASE + dt.timedelta(seconds=i)) for i in range(25)]
    _seed(api.state.sessionmaker, rows)
    key = tenant["Authorization"].split(" ", 1)[1]
    admin = ADMIN["Authorization"].split(" ", 1)[1]
    with PromptstoreClient("http://testserver", api_key=key, admin_token=admin, transport=_Via(api.client)) as ps:
        assert [t["id"] for t in ps.list_tasks(page_size=4)] == [r["id"] for r in reversed(rows)]
        assert [t["id"] for t in ps.list_tasks(status="ready", page_size=2)] == [
            r["id"] for r in reversed(rows) if r["status"] == "ready"]
        assert [t["name"] for t in ps.list_tasks(name_prefix="task-0001")] == [f"task-000{i}" for i in range(19, 9, -1)]
        assert len(ps.list_tenants(page_size=1)) == api.client.get("/v1/admin/tenants", headers=ADMIN).json()["count"]
        got = ps.get_task(rows[2]["id"], include=("history", "per_class"))
        assert len(got["history"]) == 20 and got["confusion"] is None and got["metrics"]["per_class"]


def test_stored_hostile_values_never_break_the_heavy_parts(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    tenant_id, tenant = _new_tenant(api, f"hostile-{new_id()}")
    task = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()
    api.wait_ready(tenant, task["id"])
    with api.state.sessionmaker() as s:
        for column, value in {
            "history": '[["x"], 1]', "confusion": '[[true, "2"]]', "classes": '["ok", 7]',
            "metrics": '{"val_accuracy": NaN, "per_class": "none"}',
            "training": '{"status": "failed", "progress": "oops", "history": {"a": 1}, "error": 5}',
        }.items():
            s.execute(text(f"UPDATE tasks SET {column} = :v WHERE id = :id"), {"v": value, "id": task["id"]})
        s.execute(text("UPDATE prompt_versions SET confusion = '[1]', history = '{}', metrics = '{\"per_class\": [1]}'"
                       " WHERE task_id = :id"), {"id": task["id"]})  # fmt: skip
        s.commit()
    full = _get(api, tenant, f"/v1/tasks/{task['id']}", include="history,confusion,per_class")
    assert full["history"] is None and full["confusion"] is None and full["classes"] == ["ok", "7"]
    assert _get(api, tenant, f"/v1/tasks/{task['id']}/history") == {
        "task_id": task["id"], "version": 1, "history": None,
        "run": {"status": "failed", "progress": 0.0, "error": "5", "history": None}}
    assert _get(api, tenant, f"/v1/tasks/{task['id']}/confusion") == {
        "task_id": task["id"], "version": 1, "classes": ["cat", "dog"], "matrix": None, "per_class": None}
    assert _get(api, tenant, "/v1/tasks")["items"][0]["classes"] == ["ok", "7"]
    assert _get(api, tenant, f"/v1/tasks/{task['id']}/events")["items"][0]["kind"] == "created"
