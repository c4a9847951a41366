"""Tenant isolation and authentication: another tenant's task answers 404 to every verb,
exactly like an unknown id; missing or unknown keys get 401; admin routes need the admin
token."""

from __future__ import annotations

import json
from typing import Any

import pytest
from apiclient import ADMIN
from psdata import b64, dataset_zip, image_bytes

UNKNOWN_ID = "0" * 32


def _verbs(task_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    img = image_bytes()
    return [
        ("GET", f"/v1/tasks/{task_id}", {}),
        ("GET", f"/v1/tasks/{task_id}/prompt", {}),
        ("POST", f"/v1/tasks/{task_id}/classify", {"json": {"images": [b64(img)]}}),
        ("POST", f"/v1/tasks/{task_id}/classify", {"files": [("images", ("a.png", img, "image/png"))]}),
        ("POST", f"/v1/tasks/{task_id}/retrain", {"data": {"config": json.dumps({"epochs": 1})}}),
        ("POST", f"/v1/tasks/{task_id}/retrain", {"files": {"dataset": ("d.zip", dataset_zip(), "application/zip")}}),
        ("POST", f"/v1/tasks/{task_id}/cancel", {}),
        ("DELETE", f"/v1/tasks/{task_id}", {}),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_foreign_task_is_answered_exactly_like_an_unknown_one(backend: str, settings_factory: Any, make_api: Any) -> None:
    settings = settings_factory(db=backend, objects="local" if backend == "sqlite" else "s3")
    api = make_api(settings)
    alice, bob = api.tenant("alice-" + backend), api.tenant("bob-" + backend)
    task = api.create_task(alice, "coop", dataset=dataset_zip(), config={"epochs": 1, "n_ctx": 2}).json()
    api.wait_ready(alice, task["id"])

    for method, path, kw in _verbs(task["id"]):
        foreign = api.client.request(method, path, headers=bob, **kw)
        unknown = api.client.request(method, path.replace(task["id"], UNKNOWN_ID), headers=bob, **kw)
        assert foreign.status_code == 404, (method, path, foreign.text)
        assert unknown.status_code == 404
        assert foreign.json() == {"detail": f"task {task['id']} not found"}
        assert unknown.json() == {"detail": f"task {UNKNOWN_ID} not found"}
        assert "alice" not in foreign.text

    assert api.client.get("/v1/tasks", headers=bob).json() == {"items": [], "count": 0, "next_cursor": None}
    # Alice's task went through all of that untouched.
    t = api.task(alice, task["id"])
    assert t["status"] == "ready" and t["version"] == 1 and t["training"] is None
    r = api.client.post(f"/v1/tasks/{task['id']}/classify", json={"images": [b64(image_bytes())]}, headers=alice)
    assert r.status_code == 200


def test_missing_and_unknown_keys_get_401_on_every_tenant_route(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    tenant = api.tenant()
    task = api.create_task(tenant, "zeroshot", classes=["a", "b"]).json()
    routes = [("GET", "/v1/tasks", {}), ("POST", "/v1/tasks", {"data": {"name": "x", "method": "zeroshot", "classes": '["a","b"]'}})]
    routes += _verbs(task["id"])
    bad_headers = [
        ({}, "missing API key"),
        ({"Authorization": "Bearer "}, "missing API key"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "missing API key"),
        ({"Authorization": "Bearer nonsense"}, "invalid API key"),
        ({"Authorization": "Bearer ps_0123456789ab_" + "x" * 40}, "invalid API key"),
        ({"Authorization": ADMIN["Authorization"]}, "invalid API key"),  # the admin token is not a tenant key
    ]
    for method, path, kw in routes:
        for headers, needle in bad_headers:
            r = api.client.request(method, path, headers=headers, **kw)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert needle in r.json()["detail"]
            assert r.headers.get("www-authenticate") == "Bearer"
    # A tampered key (right prefix, wrong secret) is refused too.
    good = tenant["Authorization"].split(" ", 1)[1]
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    assert api.client.get("/v1/tasks", headers={"Authorization": f"Bearer {tampered}"}).status_code == 401
    assert api.client.get("/v1/tasks", headers=tenant).status_code == 200


def test_admin_routes_need_the_admin_token(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    tenant = api.tenant("someone")
    for headers in ({}, tenant, {"Authorization": "Bearer wrong-token"}):
        assert api.client.get("/v1/admin/tenants", headers=headers).status_code == 401
        assert api.client.post("/v1/admin/tenants", json={"name": "x"}, headers=headers).status_code == 401
    listed = api.client.get("/v1/admin/tenants", headers=ADMIN).json()
    assert listed["count"] == 1 and listed["items"][0]["name"] == "someone"
    assert "api_key" not in listed["items"][0]
    r = api.client.post("/v1/admin/tenants", json={"name": "someone"}, headers=ADMIN)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = api.client.post("/v1/admin/tenants", json={"name": ""}, headers=ADMIN)
    assert r.status_code == 422 and "name" in r.json()["detail"]


def test_admin_api_is_closed_without_a_configured_token(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory(admin_token=None))
    r = api.client.get("/v1/admin/tenants", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 401 and "no admin token" in r.json()["detail"]
