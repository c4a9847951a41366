"""A frozen dependency answers 503 naming the part, with Retry-After, within the configured
deadline: never a hang (docs/operations.md "Timeouts and retries").

Each test starts its own instance of the service it freezes (tests/faults.py: a SeaweedFS S3
server, a Redis on a port of its own, a Postgres cluster made with initdb) and SIGSTOPs it:
the port stays open and nothing answers, the case a plain "connection refused" test misses.
Timeouts are set to a second or two; the bound asserted is that plus a wide margin (CI
machines are small and loaded), where the code before answered after minutes or never.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from faults import S3_ACCESS_KEY, S3_SECRET_KEY, private_postgres, private_redis, private_s3
from psdata import dataset_zip, image_bytes

#: What "within the deadline" means here: the configured timeouts (1-2 s) plus a wide margin.
BOUND_S = 20.0


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.monotonic()
    r = fn(*args, **kwargs)
    took = time.monotonic() - start
    what = args[0] if args and isinstance(args[0], str) else ""
    print(f"{getattr(fn, '__name__', fn)} {what} -> {getattr(r, 'status_code', r)} in {took:.2f} s")  # -s shows it
    return r, took


def assert_503(r: Any, part: str) -> None:
    assert r.status_code == 503, r.text
    assert part in r.json()["detail"], r.text
    assert int(r.headers["Retry-After"]) >= 1


def test_frozen_object_store_answers_503_within_the_deadline(settings_factory, make_api, tmp_path: Path) -> None:
    with private_s3(tmp_path) as s3:
        settings = settings_factory(
            objects=f"s3://fault-bucket?endpoint={s3.url}", s3_access_key=S3_ACCESS_KEY, s3_secret_key=S3_SECRET_KEY,
            s3_connect_timeout=1, s3_read_timeout=1, s3_retries=1, s3_deadline=2, readyz_timeout=1,
        )
        api = make_api(settings)
        headers = api.tenant()
        task = api.create_task(headers, "zeroshot", classes=["cat", "dog"]).json()
        api.wait_ready(headers, task["id"])  # its prompt is in S3; not yet in this replica's cache
        assert api.client.get("/readyz").status_code == 200

        with s3.frozen():
            r, took = timed(api.classify_files, headers, task["id"], [image_bytes(0)])  # a cache miss
            assert_503(r, "object store")
            assert took < BOUND_S, f"classify answered after {took:.1f} s"

            r, took = timed(api.create_task, headers, "coop", dataset=dataset_zip(), expect=None)
            assert_503(r, "object store")
            assert "did not answer within 2 s" in r.json()["detail"]
            assert took < BOUND_S, f"upload answered after {took:.1f} s"

            r, took = timed(api.client.get, "/readyz")
            assert r.status_code == 503, r.text
            assert "object store did not answer within 1 s" in r.json()["detail"]
            assert r.json()["checks"]["database"] == "ok"
            assert took < 10, f"/readyz answered after {took:.1f} s"
        assert [t["name"] for t in api.client.get("/v1/tasks", headers=headers).json()["items"]] == ["t"]

        # thawed: served again (the dependency's timeouts left nothing broken behind)
        r = api.classify_files(headers, task["id"], [image_bytes(0)])
        assert r.status_code == 200, r.text


def test_frozen_broker_keeps_the_task_queued_and_names_it(settings_factory, make_api, tmp_path: Path) -> None:
    with private_redis(tmp_path) as broker:
        settings = settings_factory(broker_url=broker.url, broker_timeout=1, broker_deadline=2)
        api = make_api(settings)
        assert api.state.dispatcher.kind == "celery"
        headers = api.tenant()
        key = {"Idempotency-Key": "frozen-broker-1"}
        data = {"name": "pets", "method": "zeroshot", "classes": json.dumps(["cat", "dog"])}
        with broker.frozen():
            r, took = timed(api.client.post, "/v1/tasks", data=data, headers={**headers, **key})
            assert_503(r, "job queue (broker) did not answer within 1 s")
            assert took < BOUND_S, f"task creation answered after {took:.1f} s"
            tasks = api.client.get("/v1/tasks", headers=headers).json()["items"]
            assert len(tasks) == 1 and tasks[0]["status"] == "queued"
            task_id = tasks[0]["id"]
            assert f"task {task_id} was saved" in r.json()["detail"]
            assert "stays queued" in r.json()["detail"]

            # the client retries with the same key: the task it already has, not a second one
            r, took = timed(api.client.post, "/v1/tasks", data=data, headers={**headers, **key})
            assert r.status_code == 202, r.text
            assert r.json()["id"] == task_id and r.headers["Idempotent-Replayed"] == "true"
            assert took < BOUND_S
            assert api.client.get("/v1/tasks", headers=headers).json()["count"] == 1

        # thawed: the broker takes jobs again
        r = api.create_task(headers, "zeroshot", classes=["a", "b"])
        assert r.status_code == 202


def test_frozen_redis_lets_requests_through_fail_open(settings_factory, make_api, tmp_path: Path) -> None:
    with private_redis(tmp_path) as redis_server:
        settings = settings_factory(redis_url=redis_server.url, redis_timeout=0.5, jobs_per_minute=600, jobs_burst=100)
        api = make_api(settings)
        assert api.state.limiter.backend == "redis"
        headers = api.tenant()
        task = api.create_task(headers, "zeroshot", classes=["cat", "dog"]).json()
        api.wait_ready(headers, task["id"])
        with redis_server.frozen():
            r, took = timed(api.classify_files, headers, task["id"], [image_bytes(0)])
            assert r.status_code == 200, r.text
            assert took < BOUND_S, f"classify answered after {took:.1f} s"
            r, took = timed(api.create_task, headers, "zeroshot", classes=["a", "b"], expect=None)
            assert r.status_code == 202, r.text
            assert took < BOUND_S, f"task creation answered after {took:.1f} s"
            r, took = timed(api.client.delete, f"/v1/tasks/{r.json()['id']}", headers=headers)  # announces a delete
            assert r.status_code == 204, r.text
            assert took < BOUND_S
        assert api.state.limiter.errors._value.get() >= 1  # the check failed open, and was counted


def test_frozen_postgres_answers_503_database_within_the_deadline(settings_factory, make_api) -> None:
    with private_postgres() as pg:
        settings = settings_factory(db=pg.url, db_timeout=1, db_connect_timeout=1, readyz_timeout=1)
        api = make_api(settings)
        headers = api.tenant()
        assert api.client.get("/v1/tasks", headers=headers).status_code == 200
        with pg.frozen():
            r, took = timed(api.client.get, "/v1/tasks", headers=headers)
            assert_503(r, "database")
            assert took < BOUND_S, f"a tenant request answered after {took:.1f} s"

            r, took = timed(api.client.get, "/readyz")
            assert r.status_code == 503, r.text
            assert "database did not answer within 1 s" in r.json()["detail"]
            assert took < 10, f"/readyz answered after {took:.1f} s"

            r, took = timed(api.client.post, "/v1/tasks", headers=headers,
                            data={"name": "x", "method": "zeroshot", "classes": '["a", "b"]'})
            assert_503(r, "database")
            assert took < BOUND_S
        # thawed: the pool drops the broken connections and serves again
        deadline = time.monotonic() + 30
        while True:
            r = api.client.get("/v1/tasks", headers=headers)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("store", ["s3"])
def test_object_store_deadline_bounds_retries(store: str, tmp_path: Path) -> None:
    """The store itself: a frozen endpoint raises ObjectStoreTimeout, retries included, within
    the deadline; a missing key is still ObjectNotFound (not retried)."""
    from store.objects import ObjectNotFound, ObjectStoreTimeout, S3ObjectStore
    from store.timeouts import DependencyTimeout

    with private_s3(tmp_path) as s3:
        objects = S3ObjectStore(
            "deadline", endpoint=s3.url, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY,
            connect_timeout=1, read_timeout=1, retries=5, deadline=2,
        )
        objects.put("a/b", b"x")
        with pytest.raises(ObjectNotFound):
            objects.get("a/missing")
        with s3.frozen():
            for call in (lambda: objects.get("a/b"), lambda: objects.put("a/c", b"y"), objects.ping):
                start = time.monotonic()
                with pytest.raises(ObjectStoreTimeout) as info:
                    call()
                assert time.monotonic() - start < BOUND_S
                assert isinstance(info.value, DependencyTimeout) and info.value.part == "object store"
        assert objects.get("a/b") == b"x"
