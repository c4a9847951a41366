"""Two API replicas as real processes (``promptstore serve``) sharing Postgres, the S3
server and Redis: a retrained task is answered with its new prompt by both, the other
replica drops the old prompt as soon as one replica learns of the new version (Redis
pub/sub), and a delete through one replica evicts the prompt in the other."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from apiclient import ADMIN
from enginetest_helpers import _assert_same
from procs import free_port, settings_env, started
from psdata import dataset_zip, image_bytes

pytestmark = pytest.mark.timeout(240)


def _wait_ready(http: httpx.Client, proc: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"replica exited\n{proc.tail()}")
        try:
            r = http.get("/readyz")
            if r.status_code == 200 and r.json()["engine"]["invalidation"] == "redis":
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"replica not ready after {timeout}s\n{proc.tail()}")


def _metric(http: httpx.Client, line_start: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def _until(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@contextmanager
def two_replicas(settings_factory: Any, redis_url: str, tmp_path: Any) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Two `promptstore serve` processes on one Postgres, S3 bucket and Redis, both ready with
    their invalidation bus subscribed; a client for each."""
    settings = settings_factory(db="postgres", objects="s3", redis_url=redis_url)
    env = settings_env(settings)
    pa, pb = free_port(), free_port()
    with started(["serve", "--port", str(pa)], env=env, cwd=tmp_path, name="a") as proc_a, started(
        ["serve", "--port", str(pb)], env=env, cwd=tmp_path, name="b"
    ) as proc_b, httpx.Client(base_url=f"http://127.0.0.1:{pa}", timeout=60) as a, httpx.Client(
        base_url=f"http://127.0.0.1:{pb}", timeout=60
    ) as b:
        _wait_ready(a, proc_a)
        _wait_ready(b, proc_b)
        yield a, b


def test_retrain_and_delete_reach_every_replica(settings_factory: Any, redis_url: str, tmp_path: Any) -> None:
    with two_replicas(settings_factory, redis_url, tmp_path) as (a, b):
        r = a.post("/v1/admin/tenants", json={"name": f"replicas-{time.monotonic_ns()}"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        tenant = {"Authorization": f"Bearer {r.json()['api_key']}"}
        files = {"dataset": ("d.zip", dataset_zip(("cat", "dog", "owl"), per_class=4), "application/zip")}
        data = {"name": "t", "method": "linear-probe", "config": json.dumps({"l2_grid": [1.0], "max_iter": 30})}
        r = a.post("/v1/tasks", data=data, files=files, headers=tenant)
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]

        def version() -> int | None:
            t = a.get(f"/v1/tasks/{task_id}", headers=tenant).json()
            assert t["status"] not in ("failed", "cancelled"), t
            return t["version"]

        _until(lambda: version() == 1, "version 1 never published", 90)
        img = [("images", ("x.png", image_bytes(2, seed=4), "image/png"))]
        classify = lambda http: http.post(f"/v1/tasks/{task_id}/classify", files=img, headers=tenant)  # noqa: E731
        ra, rb = classify(a), classify(b)
        assert ra.json()["version"] == rb.json()["version"] == 1
        _assert_same(ra.json()["predictions"], rb.json()["predictions"])
        old = ra.json()["predictions"]
        assert _metric(b, "promptstore_prompt_cache_entries") == 1

        config = json.dumps({"l2_grid": [0.0001], "max_iter": 30, "seed": 7})
        r = a.post(f"/v1/tasks/{task_id}/retrain", data={"config": config}, headers=tenant)
        assert r.status_code == 202, r.text
        _until(lambda: version() == 2, "version 2 never published", 90)

        # A answers with version 2 and tells the other replicas: B drops version 1 at once,
        # before any request reaches it.
        ra = classify(a)
        assert ra.json()["version"] == 2
        new = ra.json()["predictions"]
        assert [p["score"] for p in new[0]] != pytest.approx([p["score"] for p in old[0]], abs=1e-4)
        _until(
            lambda: _metric(b, 'promptstore_prompt_cache_evictions_total{reason="remote"}') == 1,
            "replica B did not drop version 1 after replica A learned of version 2",
        )
        assert _metric(b, "promptstore_prompt_cache_entries") == 0
        rb = classify(b)
        assert rb.json()["version"] == 2
        _assert_same(rb.json()["predictions"], new)

        # Delete through B: A evicts at once, and both answer 404.
        assert _metric(a, "promptstore_prompt_cache_entries") == 1
        assert b.delete(f"/v1/tasks/{task_id}", headers=tenant).status_code == 204
        _until(
            lambda: _metric(a, 'promptstore_prompt_cache_evictions_total{reason="deleted"}') == 1,
            "replica A kept the deleted task's prompt",
        )
        assert _metric(a, "promptstore_prompt_cache_entries") == 0
        assert classify(a).status_code == 404 and classify(b).status_code == 404
