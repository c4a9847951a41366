"""Rate limits: per tenant on classify and on tuning jobs, per client address on wrong admin
tokens; 429 with Retry-After naming the limit, nothing created by a refused call, other
tenants untouched; one bucket for all replicas through Redis; a Redis outage lets calls
through."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from apiclient import ADMIN
from prometheus_client import CollectorRegistry
from psdata import b64, image_bytes

from api.ratelimit import Limit, RateLimited, RateLimiter

WRONG = {"Authorization": "Bearer not-the-admin-token"}


def _scope() -> str:
    return "test-" + uuid.uuid4().hex[:8]


def test_memory_bucket_allows_the_burst_then_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("api.ratelimit.time.monotonic", lambda: now[0])
    rl = RateLimiter(None, CollectorRegistry())
    limit = Limit(rate=2.0, burst=3)  # a call per 0.5 s, three at once
    assert [rl.wait("s", "k", limit) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.wait("s", "k", limit) == pytest.approx(0.5)  # refused, and not counted
    assert rl.wait("s", "k", limit, take=False) == pytest.approx(0.5)
    assert rl.wait("s", "other", limit) == 0.0  # another key has its own bucket
    now[0] += 0.5
    assert rl.wait("s", "k", limit, take=False) == 0.0  # looking takes nothing
    assert rl.wait("s", "k", limit) == 0.0
    assert rl.wait("s", "k", limit) == pytest.approx(0.5)
    now[0] += 10  # a long pause refills the bucket to the burst, not beyond
    assert [rl.wait("s", "k", limit) for _ in range(4)][-1] == pytest.approx(0.5)
    assert Limit(0, 5).enabled is False and rl.wait("s", "k", Limit(0, 5)) == 0.0
    with pytest.raises(RateLimited, match=r"slow down; retry in 1 s") as exc:
        rl.take("s", "k", limit, "slow down")
    assert exc.value.headers == {"Retry-After": "1"}


def test_redis_bucket_is_shared_by_replicas(redis_url: str) -> None:
    import time

    one, two = RateLimiter(redis_url, CollectorRegistry()), RateLimiter(redis_url, CollectorRegistry())
    assert one.backend == "redis"
    scope, limit = _scope(), Limit(rate=5.0, burst=2)  # a call per 0.2 s
    assert one.wait(scope, "k", limit) == 0.0 and two.wait(scope, "k", limit) == 0.0
    wait = one.wait(scope, "k", limit)
    assert 0 < wait <= 0.2 and 0 < two.wait(scope, "k", limit, take=False) <= 0.2
    assert two.wait(scope, "other", limit) == 0.0
    time.sleep(wait + 0.05)
    assert two.wait(scope, "k", limit) == 0.0
    assert 0 < one.wait(scope, "k", limit) <= 0.2


def test_unreachable_redis_lets_calls_through_and_is_tried_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    from api import ratelimit

    now = [1000.0]
    monkeypatch.setattr("api.ratelimit.time.monotonic", lambda: now[0])
    registry = CollectorRegistry()
    rl = RateLimiter("redis://127.0.0.1:1/0", registry)  # nothing listens on port 1
    assert [rl.wait("s", "k", Limit(1.0, 1)) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert registry.get_sample_value("promptstore_rate_limit_errors_total") == 1  # not tried again at once
    now[0] += ratelimit.REDIS_RETRY_S + 0.1
    assert rl.wait("s", "k", Limit(1.0, 1)) == 0.0
    assert registry.get_sample_value("promptstore_rate_limit_errors_total") == 2


def test_classify_over_the_tenant_rate_gets_429_and_other_tenants_go_on(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory(classify_rate=0.01, classify_burst=2))  # 2 at once, then one per 100 s
    alice, bob = api.tenant("alice"), api.tenant("bob")
    ta = api.create_task(alice, "zeroshot", classes=["a", "b"]).json()
    tb = api.create_task(bob, "zeroshot", classes=["a", "b"]).json()
    api.wait_ready(alice, ta["id"])
    api.wait_ready(bob, tb["id"])
    body = {"images": [b64(image_bytes())]}
    codes = [api.client.post(f"/v1/tasks/{ta['id']}/classify", json=body, headers=alice).status_code for _ in range(2)]
    assert codes == [200, 200]
    r = api.client.post(f"/v1/tasks/{ta['id']}/classify", json=body, headers=alice)
    assert r.status_code == 429, r.text
    assert 90 <= int(r.headers["Retry-After"]) <= 100
    detail = r.json()["detail"]
    assert "tenant 'alice' is over its classify rate (0.01 requests/s, 2 at once)" in detail and "retry in" in detail
    assert api.client.post(f"/v1/tasks/{tb['id']}/classify", json=body, headers=bob).status_code == 200
    assert api.client.get(f"/v1/tasks/{ta['id']}", headers=alice).status_code == 200  # reads are not limited
    # an unknown key is a 401, never a 429: the limit is the tenant's, counted after auth
    assert api.client.post(f"/v1/tasks/{ta['id']}/classify", json=body, headers=WRONG).status_code == 401
    metrics = api.client.get("/metrics").text
    assert 'promptstore_rate_limited_total{scope="classify"} 1.0' in metrics


def test_jobs_over_the_tenant_rate_get_429_and_create_nothing(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory(jobs_per_minute=1, jobs_burst=2))
    alice, bob = api.tenant("alice"), api.tenant("bob")
    first = api.create_task(alice, "zeroshot", classes=["a", "b"], name="one").json()
    api.create_task(alice, "zeroshot", classes=["a", "b"], name="two")
    r = api.create_task(alice, "zeroshot", classes=["a", "b"], name="three", expect=429)
    assert 55 <= int(r.headers["Retry-After"]) <= 60
    assert "tenant 'alice' is over its rate of tuning jobs (1 per minute, 2 at once)" in r.json()["detail"]
    api.wait_ready(alice, first["id"])
    retrain = api.client.post(f"/v1/tasks/{first['id']}/retrain", headers=alice)
    assert retrain.status_code == 429, retrain.text  # a retrain is a job too
    names = sorted(t["name"] for t in api.client.get("/v1/tasks", headers=alice).json()["items"])
    assert names == ["one", "two"]  # the refused call created nothing
    assert api.task(alice, first["id"])["version"] == 1 and api.task(alice, first["id"])["training"] is None
    api.create_task(bob, "zeroshot", classes=["a", "b"])  # bob has his own bucket


def test_wrong_admin_tokens_lock_the_address_out_then_even_the_right_one_gets_429(
    settings_factory: Any, make_api: Any
) -> None:
    api = make_api(settings_factory(admin_auth_failures_per_minute=1, admin_auth_failure_burst=3))
    for _ in range(3):
        r = api.client.get("/v1/admin/tenants", headers=WRONG)
        assert r.status_code == 401 and r.json()["detail"] == "invalid admin token"
    assert api.client.get("/v1/admin/tenants", headers=ADMIN).status_code == 429  # not checked while locked out
    r = api.client.get("/v1/admin/tenants", headers=WRONG)
    assert r.status_code == 429 and 55 <= int(r.headers["Retry-After"]) <= 60
    assert r.json()["detail"].startswith("too many failed admin authentications from this address; retry in")
    # the dashboard's login form and its Basic/Bearer access share the bucket
    page = api.client.post("/admin/login", data={"token": "test-admin-token-" + "x" * 24, "next": "/admin"},
                           follow_redirects=False)  # fmt: skip
    assert page.status_code == 429 and "Too many wrong tokens from this address" in page.text
    assert int(page.headers["Retry-After"]) >= 55
    assert api.client.get("/admin", headers=ADMIN).status_code == 429
    assert api.client.get("/admin/login").status_code == 200  # the form itself still shows
    metrics = api.client.get("/metrics").text
    assert 'promptstore_rate_limited_total{scope="admin-auth"} 4.0' in metrics


def test_wrong_tokens_on_the_login_form_count_and_a_right_one_before_the_limit_logs_in(
    settings_factory: Any, make_api: Any
) -> None:
    api = make_api(settings_factory(admin_auth_failures_per_minute=1, admin_auth_failure_burst=2))
    r = api.client.post("/admin/login", data={"token": "wrong", "next": "/admin"}, follow_redirects=False)
    assert r.status_code == 401 and "That is not the admin token." in r.text
    ok = api.client.post("/admin/login", data={"token": ADMIN["Authorization"][7:], "next": "/admin"},
                         follow_redirects=False)  # fmt: skip
    assert ok.status_code == 303  # one failure left: the right token still gets in
    api.client.post("/admin/login", data={"token": "wrong again", "next": "/admin"}, follow_redirects=False)
    r = api.client.post("/admin/login", data={"token": "wrong", "next": "/admin"}, follow_redirects=False)
    assert r.status_code == 429


def test_no_limits_when_switched_off(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory(jobs_per_minute=0, admin_auth_failures_per_minute=0))
    tenant = api.tenant()
    for i in range(4):
        api.create_task(tenant, "zeroshot", classes=["a", "b"], name=f"t{i}")
    for _ in range(12):
        assert api.client.get("/v1/admin/tenants", headers=WRONG).status_code == 401
    assert api.client.get("/v1/admin/tenants", headers=ADMIN).status_code == 200


def test_replicas_on_one_redis_share_the_tenant_bucket(settings_factory: Any, make_api: Any, redis_url: str) -> None:
    settings = settings_factory(redis_url=redis_url, jobs_per_minute=1, jobs_burst=2)
    one, two = make_api(settings), make_api(settings)  # two replicas on one database and one Redis
    tenant = one.tenant()
    one.create_task(tenant, "zeroshot", classes=["a", "b"])
    two.create_task(tenant, "zeroshot", classes=["a", "b"])
    assert one.create_task(tenant, "zeroshot", classes=["a", "b"], expect=None).status_code == 429
    assert two.create_task(tenant, "zeroshot", classes=["a", "b"], expect=None).status_code == 429
