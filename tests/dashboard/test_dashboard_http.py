"""The admin dashboard over HTTP (TestClient on the real app): no page and no data without
the admin token, the login session and its cookie, CSRF on every form, escaping, the JSON
feed, the actions, and input checks."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from apiclient import ADMIN, TEST_ADMIN_TOKEN
from psdata import dataset_zip

from api.admin import auth

PAGES = ["/admin", "/admin/tasks", "/admin/tenants", "/admin/tasks/{id}", "/admin/tasks/{id}/delete"]
FEEDS = ["/admin/api/overview", "/admin/api/tasks?ids={id}"]
POSTS = ["/admin/tasks/{id}/cancel", "/admin/tasks/{id}/retry", "/admin/tasks/{id}/delete", "/admin/tenants", "/admin/logout"]
SECRET_NAME = "secret-task-name"


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]*)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


@pytest.fixture
def api_with_task(settings_factory: Any, make_api: Any) -> tuple[Any, dict[str, str], str]:
    # These tests try wrong credentials on every page: no limit on failed admin attempts
    # here (tests/api/test_api_rate_limits.py covers it).
    api = make_api(settings_factory(admin_auth_failures_per_minute=0))
    tenant = api.tenant("acme")
    task = api.create_task(tenant, "zeroshot", classes=["cat", "dog"], name=SECRET_NAME).json()
    api.wait_ready(tenant, task["id"])
    return api, tenant, task["id"]


BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": "Bearer "},
    _basic("admin", "wrong-token"),
    _basic("root", TEST_ADMIN_TOKEN),
    {"Authorization": "Basic !!!notbase64"},
    {"Cookie": f"{auth.COOKIE}=1.2.3"},
]


@pytest.mark.parametrize("creds", BAD_CREDENTIALS, ids=["none", "bearer", "empty", "basic-pw", "basic-user", "basic-junk", "cookie"])
def test_without_the_token_no_page_and_no_data(api_with_task: Any, creds: dict[str, str]) -> None:
    api, _, task_id = api_with_task
    c = api.client
    for path in PAGES:
        r = c.get(path.format(id=task_id), headers=creds, follow_redirects=False)
        assert r.status_code == 401, (path, r.status_code)
        assert 'name="token"' in r.text and 'action="/admin/login"' in r.text  # the login form instead
        assert SECRET_NAME not in r.text and "acme" not in r.text
        assert re.search(r'name="next" value="([^"]*)"', r.text).group(1) == path.format(id=task_id)
    for path in FEEDS:
        r = c.get(path.format(id=task_id), headers=creds)
        assert r.status_code == 401 and set(r.json()) == {"detail"}, (path, r.text)
    for path in POSTS:
        r = c.post(path.format(id=task_id), data={"csrf": "x", "confirm": task_id, "name": "n"}, headers=creds, follow_redirects=False)
        assert r.status_code == 401 and set(r.json()) == {"detail"}, (path, r.text)
    assert api.task(api_with_task[1], task_id)["status"] == "ready"  # nothing happened
    login = c.get("/admin/login")
    assert login.status_code == 200 and SECRET_NAME not in login.text and 'name="token"' in login.text


def test_bearer_and_basic_auth_see_every_page(api_with_task: Any) -> None:
    api, _, task_id = api_with_task
    for creds in (ADMIN, _basic("admin", TEST_ADMIN_TOKEN)):
        for path in PAGES:
            r = api.client.get(path.format(id=task_id), headers=creds)
            assert r.status_code == 200, (path, r.text[:300])
            assert r.headers["content-type"].startswith("text/html")
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert r.headers["cache-control"] == "no-store"
            assert re.fullmatch(r"render;dur=[0-9.]+", r.headers["server-timing"])
        for path in FEEDS:
            assert api.client.get(path.format(id=task_id), headers=creds).status_code == 200
    assert SECRET_NAME in api.client.get("/admin/tasks", headers=ADMIN).text


def test_login_sets_a_strict_httponly_session_cookie(api_with_task: Any) -> None:
    api, _, task_id = api_with_task
    c = api.client
    r = c.post("/admin/login", data={"token": "wrong", "next": "/admin/tasks"}, follow_redirects=False)
    assert r.status_code == 401 and "not the admin token" in r.text and auth.COOKIE not in r.headers.get("set-cookie", "")
    r = c.post("/admin/login", data={"token": TEST_ADMIN_TOKEN, "next": f"/admin/tasks/{task_id}"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/admin/tasks/{task_id}"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{auth.COOKIE}=")
    for attr in ("HttpOnly", "SameSite=strict", "Path=/admin", "Max-Age="):
        assert attr.lower() in cookie.lower(), cookie
    assert TEST_ADMIN_TOKEN not in cookie
    assert c.get(f"/admin/tasks/{task_id}").status_code == 200  # the client keeps the cookie
    assert c.get("/admin/api/overview").status_code == 200
    # a tampered cookie is no session
    value = c.cookies.get(auth.COOKIE)
    c.cookies.clear()
    issued, nonce, sig = value.split(".")
    c.cookies.set(auth.COOKIE, f"{int(issued) + 1}.{nonce}.{sig}", path="/admin")
    assert c.get("/admin", follow_redirects=False).status_code == 401
    assert c.get("/admin/api/overview").status_code == 401


def test_session_expiry_and_token_change_end_a_session() -> None:
    value = auth.new_session("token-a", now=1_000_000)
    assert auth.session_nonce("token-a", value, now=1_000_000 + 60) is not None
    assert auth.session_nonce("token-a", value, now=1_000_000 + auth.SESSION_TTL_S + 1) is None
    assert auth.session_nonce("token-b", value, now=1_000_000 + 60) is None
    assert auth.session_nonce(None, value) is None


def test_login_never_redirects_off_site(api_with_task: Any) -> None:
    c = api_with_task[0].client
    for target in ("https://evil.example/", "//evil.example/admin", "/adminx/../..", "/\\evil.example"):
        r = c.post("/admin/login", data={"token": TEST_ADMIN_TOKEN, "next": target}, follow_redirects=False)
        loc = r.headers["location"]
        assert loc.startswith("/admin") and not loc.startswith("//") and "evil" not in loc, (target, loc)


def test_forms_need_the_session_csrf_token(api_with_task: Any) -> None:
    api, tenant, task_id = api_with_task
    c = api.client
    c.post("/admin/login", data={"token": TEST_ADMIN_TOKEN}, follow_redirects=False)
    page = c.get(f"/admin/tasks/{task_id}").text
    token = _csrf(page)
    for bad in ("", "x" * len(token)):
        r = c.post(f"/admin/tasks/{task_id}/retry", data={"csrf": bad}, follow_redirects=False)
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    assert api.task(tenant, task_id)["version"] == 1 and api.task(tenant, task_id)["training"] is None
    r = c.post(f"/admin/tasks/{task_id}/retry", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("done=retried")
    t = api.wait(tenant, task_id, lambda t: (t["training"] or {}).get("status") == "ready")
    assert t["version"] == 2
    versions = c.get(f"/admin/tasks/{task_id}").text.split('id="versions"')[1]
    assert re.findall(r'<td class="num">(\d+)( \(serving\))?</td>', versions) == [("1", ""), ("2", " (serving)")]
    # another session's token is refused
    other = auth.csrf_token(TEST_ADMIN_TOKEN, "another-nonce")
    assert c.post("/admin/tenants", data={"csrf": other, "name": "x"}).status_code == 403
    # basic auth gets a CSRF token of its own in the forms
    basic = _basic("admin", TEST_ADMIN_TOKEN)
    c.cookies.clear()
    form = c.get("/admin/tenants", headers=basic).text
    assert c.post("/admin/tenants", data={"name": "via-basic"}, headers=basic).status_code == 403
    r = c.post("/admin/tenants", data={"name": "via-basic", "csrf": _csrf(form)}, headers=basic)
    assert r.status_code == 200 and 'id="api-key"' in r.text
    # logout ends the browser session
    c.post("/admin/login", data={"token": TEST_ADMIN_TOKEN}, follow_redirects=False)
    token = _csrf(c.get("/admin").text)
    r = c.post("/admin/logout", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and auth.COOKIE in r.headers["set-cookie"]
    assert c.get("/admin", follow_redirects=False).status_code == 401


def test_everything_is_escaped(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    tenant = api.tenant(evil)
    task = api.create_task(tenant, "zeroshot", classes=[evil, "dog&co"], name=evil).json()
    api.wait_ready(tenant, task["id"])
    for path in ("/admin", "/admin/tasks", f"/admin/tasks/{task['id']}", "/admin/tenants", f"/admin/tasks/{task['id']}/delete"):
        html = api.client.get(path, headers=ADMIN).text
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "&lt;script&gt;alert(" in html, path
    detail = api.client.get(f"/admin/tasks/{task['id']}", headers=ADMIN).text
    assert "dog&amp;co" in detail


def test_no_admin_token_configured_closes_the_dashboard(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory(admin_token=None))
    c = api.client
    r = c.get("/admin/login")
    assert r.status_code == 200 and "disabled" in r.text
    r = c.post("/admin/login", data={"token": ""}, follow_redirects=False)
    assert r.status_code == 401 and auth.COOKIE not in r.headers.get("set-cookie", "")
    assert c.get("/admin", headers=ADMIN, follow_redirects=False).status_code == 401
    assert c.get("/admin/api/overview", headers={"Authorization": "Bearer "}).status_code == 401


def test_task_table_filters_sorts_and_pages(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    a, b = api.tenant("alpha"), api.tenant("beta")
    ids = {}
    for n in range(3):
        ids[f"a{n}"] = api.create_task(a, "zeroshot", classes=["x", "y"], name=f"a{n}").json()["id"]
    ids["b0"] = api.create_task(b, "linear-probe", dataset=dataset_zip(per_class=3), name="b0").json()["id"]
    for name, tid in ids.items():
        api.wait_ready(a if name.startswith("a") else b, tid)
    c = api.client

    def names(query: str) -> list[str]:
        r = c.get(f"/admin/tasks?{query}", headers=ADMIN)
        assert r.status_code == 200, r.text
        rows = re.findall(r'<tr data-task="([0-9a-f]+)"', r.text)
        by_id = {v: k for k, v in ids.items()}
        return [by_id[i] for i in rows]

    assert sorted(names("")) == sorted(ids)
    assert names("sort=name&order=asc") == ["a0", "a1", "a2", "b0"]
    assert names("sort=name&order=desc") == ["b0", "a2", "a1", "a0"]
    assert names("method=linear-probe") == ["b0"]
    tenants = {t["name"]: t["id"] for t in c.get("/v1/admin/tenants", headers=ADMIN).json()["items"]}
    assert sorted(names(f"tenant={tenants['alpha']}")) == ["a0", "a1", "a2"]
    assert names("status=failed") == []
    assert sorted(names("status=ready")) == sorted(ids)
    r = c.get("/admin/tasks?status=bogus", headers=ADMIN)
    assert r.status_code == 422 and "status='bogus' is not one of" in r.json()["detail"]
    assert c.get("/admin/tasks?sort=password", headers=ADMIN).status_code == 422
    assert c.get("/admin/tasks?page=0", headers=ADMIN).status_code == 422
    feed = c.get(f"/admin/api/tasks?ids={ids['a0']},{ids['b0']},unknown", headers=ADMIN).json()
    assert {t["id"] for t in feed["items"]} == {ids["a0"], ids["b0"]} and feed["count"] == 2
    assert all(t["status"] == "ready" and t["run_progress"] == 1.0 and not t["live"] for t in feed["items"])
    tenants_page = c.get("/admin/tenants", headers=ADMIN).text
    assert re.search(r">alpha</a></td><td><code>[0-9a-f]+</code></td><td class=\"num\">3</td>", tenants_page)


def test_overview_numbers(api_with_task: Any) -> None:
    api, tenant, task_id = api_with_task
    o = api.client.get("/admin/api/overview", headers=ADMIN).json()
    assert o["tenants"] == 1 and o["tasks"]["ready"] == 1 and o["tasks_total"] == 1
    assert o["backbone"]["random"] is True and o["backbone"]["id"].startswith("open_clip:tiny:random")
    assert o["jobs"]["kind"] == "threads" and o["jobs"]["queue_depth"] == 0
    assert o["jobs"]["workers"] == ["in-process pool: 1 thread(s), 0 busy"]
    html = api.client.get("/admin", headers=ADMIN).text
    assert 'id="random-weights"' in html
    from psdata import image_bytes, b64

    for _ in range(3):
        r = api.client.post(f"/v1/tasks/{task_id}/classify", json={"images": [b64(image_bytes(0))]}, headers=tenant)
        assert r.status_code == 200, r.text
    import time

    deadline = time.monotonic() + 15  # the tenants' counters are written in batches every second or so
    while (o2 := api.client.get("/admin/api/overview", headers=ADMIN).json())["requests"]["tenant_requests"] < 3:
        assert time.monotonic() < deadline, o2["requests"]
        time.sleep(0.1)
    assert o2["requests"]["tenant_requests"] == 3
    assert "3</td>" in api.client.get("/admin/tenants", headers=ADMIN).text
    assert o2["requests"]["served"] >= o["requests"]["served"] + 3
    assert o2["requests"]["rate"] is None or o2["requests"]["rate"] > 0
    assert o2["cache"]["prompts"] in (1, None)


def test_unknown_task_and_bad_delete_confirmation(api_with_task: Any) -> None:
    api, tenant, task_id = api_with_task
    c = api.client
    r = c.get("/admin/tasks/0123456789abcdef", headers=ADMIN)
    assert r.status_code == 404 and r.json() == {"detail": "task 0123456789abcdef not found"}
    r = c.post(f"/admin/tasks/{task_id}/delete", data={"confirm": "yes"}, headers=ADMIN)
    assert r.status_code == 422 and "confirm" in r.json()["detail"]
    assert api.task(tenant, task_id)["status"] == "ready"
    r = c.post(f"/admin/tasks/{task_id}/cancel", headers=ADMIN, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("done=idle")
    r = c.post(f"/admin/tasks/{task_id}/delete", data={"confirm": task_id}, headers=ADMIN, follow_redirects=False)
    assert r.status_code == 303
    assert c.get(f"/v1/tasks/{task_id}", headers=tenant).status_code == 404
    assert c.get("/admin/static/admin.js").status_code == 200
    assert c.get("/admin/static/..%2Fviews.py").status_code == 404


def test_overview_with_a_broker_shows_its_queue_and_that_no_worker_answers(
    settings_factory: Any, make_api: Any, redis_url: str, request: pytest.FixtureRequest
) -> None:
    import time

    import redis

    # The same Redis database under another host name: kombu keeps one connection pool per
    # broker URL per process, and this app's shutdown closes it (CeleryDispatcher.shutdown),
    # which must not close the pool of the Celery tests that share ``redis_url``.
    broker = redis_url.replace("127.0.0.1", "localhost")
    api = make_api(settings_factory(broker_url=broker))
    queue = redis.Redis.from_url(redis_url)
    queue.delete("promptstore")  # what earlier tests left on the shared broker does not count here
    request.addfinalizer(lambda: queue.delete("promptstore"))  # no worker may pick these up later
    tenant = api.tenant("acme")
    for n in range(2):  # no worker runs: the messages stay on the broker
        api.create_task(tenant, "zeroshot", classes=["a", "b"], name=f"t{n}")
    deadline = time.monotonic() + 30
    while True:
        jobs = api.client.get("/admin/api/overview", headers=ADMIN).json()["jobs"]
        if jobs["queue_note"] == "messages on the broker" and jobs["workers_note"] != "asking workers…":
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.2)
    assert jobs["kind"] == "celery" and jobs["queue_depth"] == 2 and jobs["queued_runs"] == 2
    assert jobs["workers"] == [] and jobs["workers_note"] == "no worker answered the last ping"
    html = api.client.get("/admin", headers=ADMIN).text
    assert "Celery workers" in html and "no worker answered the last ping" in html


def test_task_page_shows_the_served_config_and_the_retrain_runs_own(api_with_task: Any) -> None:
    api, tenant, _ = api_with_task
    task = api.create_task(tenant, "coop", dataset=dataset_zip(), config={"epochs": 1, "n_ctx": 2}).json()
    task_id = task["id"]
    api.wait_ready(tenant, task_id)
    # a long retrain with another config: while it runs, version 1 is served
    r = api.client.post(f"/v1/tasks/{task_id}/retrain", data={"config": '{"epochs": 10000, "n_ctx": 2}'}, headers=tenant)
    assert r.status_code == 202, r.text
    assert r.json()["config"]["epochs"] == 1 and r.json()["training"]["config"]["epochs"] == 10000
    api.wait(tenant, task_id, lambda t: t["training"]["status"] == "running")
    html = api.client.get(f"/admin/tasks/{task_id}", headers=ADMIN).text
    served = html.split('id="config"', 1)[1].split("</table>", 1)[0]
    run = html.split('id="run-config"', 1)[1].split("</table>", 1)[0]
    assert "<th>epochs</th><td><code>1</code>" in served
    assert "<th>epochs</th><td><code>10000</code>" in run and "<th>seed</th>" not in run  # only what differs
    assert api.client.post(f"/v1/tasks/{task_id}/cancel", headers=tenant).status_code == 202
    api.wait(tenant, task_id, lambda t: t["training"]["status"] == "cancelled")
    # a short retrain publishes version 2: its config is the served one, and no run config is shown
    r = api.client.post(f"/v1/tasks/{task_id}/retrain", data={"config": '{"epochs": 2, "n_ctx": 2}'}, headers=tenant)
    assert r.status_code == 202, r.text
    t = api.wait(tenant, task_id, lambda t: t["version"] == 2)
    assert t["config"]["epochs"] == 2
    html = api.client.get(f"/admin/tasks/{task_id}", headers=ADMIN).text
    assert "<th>epochs</th><td><code>2</code>" in html.split('id="config"', 1)[1].split("</table>", 1)[0]
    assert 'id="run-config"' not in html
