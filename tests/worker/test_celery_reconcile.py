"""The reconciler of real ``promptstore worker`` processes (Celery on Redis, Postgres, SeaweedFS
S3), with small lease and reconcile settings: a run committed but never sent to the broker is
sent by a worker's reconciler; a run whose worker is SIGKILLed mid-run is re-queued as the same
attempt once its lease expired and taken by the next worker, within the documented bound.
No timing is asserted; the tests wait for the events with a deadline."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from apiclient import Api, _one_torch_thread, running_app  # noqa: F401 - fixture
from procs import production_settings, settings_env, started
from psdata import dataset_zip

CLASSES = ("bird", "cat", "dog")
FAST = {
    "PROMPTSTORE_RUN_LEASE_S": "2",
    "PROMPTSTORE_RECONCILE_INTERVAL_S": "0.5",
    "PROMPTSTORE_REQUEUE_QUEUED_AFTER_S": "2",
    "PROMPTSTORE_RUN_MAX_REQUEUES": "2",
}


@pytest.fixture(scope="module")
def settings(pg_url: str, redis_url: str, s3_server: Any) -> Any:
    return production_settings(
        pg_url, redis_url, s3_server, "reconcile", run_lease_s=2, reconcile_interval_s=0.5, requeue_queued_after_s=2
    )


@pytest.fixture(scope="module")
def api(settings: Any) -> Iterator[Api]:
    with running_app(settings) as client:
        yield Api(client)


def _row(settings: Any, task_id: str) -> Any:
    from store import repo
    from store.db import session_scope
    from store.db import get_sessionmaker

    with session_scope(get_sessionmaker(settings.database_url)) as s:
        return repo.get_task_for_job(s, task_id)


def test_a_run_committed_but_never_sent_is_sent_by_the_worker(settings: Any, api: Api, tmp_path: Any) -> None:
    from store import repo
    from store.db import session_scope
    from store.db import get_sessionmaker

    with session_scope(get_sessionmaker(settings.database_url)) as s:  # the API died before the send
        tenant, _ = repo.create_tenant(s, f"t-{uuid.uuid4().hex[:8]}")
        tid = repo.create_task(
            s, tenant_id=tenant.id, name="z", method="zeroshot", config={}, classes=["cat", "dog"]
        ).id
    with started(["worker"], env=settings_env(settings, **FAST), cwd=tmp_path, name="worker") as worker:
        worker.wait_for(f"task {tid} attempt 1 still queued; sent again", timeout=120)
        worker.wait_for(f"task {tid} attempt 1: published version 1", timeout=120)
    t = _row(settings, tid)
    assert (t.status, t.version, t.attempt, t.lease_owner) == ("ready", 1, 1, None)


def test_a_sigkilled_worker_s_run_is_requeued_and_taken_by_the_next(settings: Any, api: Api, tmp_path: Any) -> None:
    tenant = api.tenant()
    with started(["worker"], env=settings_env(settings, **FAST), cwd=tmp_path, name="worker-1") as first:
        first.wait_for("ready.", timeout=120)
        tid = api.create_task(
            tenant, "coop", dataset=dataset_zip(CLASSES, per_class=3), config={"epochs": 10_000, "n_ctx": 2}
        ).json()["id"]
        api.wait(tenant, tid, lambda t: t["status"] == "running" and t["progress"] > 0, timeout=120)
        dead_owner = _row(settings, tid).lease_owner
        assert dead_owner  # the killed worker's execution holds the run
        os.killpg(first.proc.pid, signal.SIGKILL)  # no ack, no clean-up, no heartbeat any more
        first.proc.wait(30)
    # the run stays "running" with nobody behind it until a worker's reconciler sees the lease expired
    with started(["worker"], env=settings_env(settings, **FAST), cwd=tmp_path, name="worker-2") as second:
        second.wait_for(f"task {tid} attempt 1 re-queued", timeout=120)
        api.wait(
            tenant, tid, lambda t: t["status"] == "running" and _row(settings, tid).lease_owner not in (None, dead_owner),
            timeout=120,
        )
        t = _row(settings, tid)
        assert (t.attempt, t.requeues) == (1, 1)
        # the same attempt runs again, once: cancel it to end the test
        assert api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant).status_code == 202
        api.wait(tenant, tid, lambda t: t["status"] == "cancelled", timeout=120)
        second.wait_for(f"task {tid} attempt 1: cancelled", timeout=60)
