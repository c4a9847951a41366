"""The run reconciler (worker/reconcile.py) on SQLite and Postgres: a run committed as queued
whose message was never sent, and a run left running by a worker that stopped renewing its
lease, are brought back within the documented bound (docs/operations.md, "Runs that cannot get
stuck"); with the in-process runner of ``promptstore serve`` (ThreadDispatcher) and a real job
that loses its lease. The Celery side (a SIGKILLed ``promptstore worker``) is in
test_celery_reconcile.py.

No wall-clock timing is asserted: the tests wait, with a generous deadline, for the event."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from apiclient import _one_torch_thread, make_api  # noqa: F401 - fixtures
from psdata import dataset_zip
from sqlalchemy import update

from store import repo
from store.db import session_scope, utcnow
from store.models import FAILED, QUEUED, READY, RUNNING, Task
from worker.reconcile import STALLED_REASON, reconcile_once

CLASSES = ("bird", "cat", "dog")


def wait_until(predicate: Callable[[], Any], timeout: float = 120.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f}s"
        time.sleep(0.05)


def new_task(sm: Any, *, method: str = "zeroshot") -> tuple[str, str]:
    with session_scope(sm) as s:
        tenant, _ = repo.create_tenant(s, f"t-{time.monotonic_ns()}")
        task = repo.create_task(
            s, tenant_id=tenant.id, name="pets", method=method, config={}, classes=["cat", "dog"]
        )
        return tenant.id, task.id


def row(sm: Any, task_id: str) -> Task:
    with session_scope(sm) as s:
        return repo.get_task_for_job(s, task_id)


def age(sm: Any, task_id: str, **columns_seconds_ago: float) -> None:
    """Move the task's timestamps into the past (what waiting that long would do)."""
    values = {k: utcnow() - dt.timedelta(seconds=v) for k, v in columns_seconds_ago.items()}
    with session_scope(sm) as s:
        s.execute(update(Task).where(Task.id == task_id).values(**values))


# --------------------------------------------------------------------------- one pass


def test_a_queued_run_without_a_message_is_sent_again_once(session_factory: Any) -> None:
    sm = session_factory
    _, tid = new_task(sm)  # committed, never submitted (the API died before the send)
    sent: list[tuple[str, int]] = []
    assert reconcile_once(sm, lambda *a: sent.append(a), requeue_queued_after_s=60, max_requeues=2).resent == []
    age(sm, tid, queued_at=61)
    report = reconcile_once(sm, lambda *a: sent.append(a), requeue_queued_after_s=60, max_requeues=2)
    assert report.resent == [(tid, 1)] and sent == [(tid, 1)]
    # not again before the bound (its queued_at is now)
    assert reconcile_once(sm, lambda *a: sent.append(a), requeue_queued_after_s=60, max_requeues=2).resent == []
    assert row(sm, tid).run_status == QUEUED


def test_many_reconcilers_at_once_send_a_run_once(session_factory: Any) -> None:
    import threading

    sm = session_factory
    _, tid = new_task(sm)
    age(sm, tid, queued_at=61)
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()

        def submit(*a: Any) -> None:
            with lock:
                sent.append(a)

        reconcile_once(sm, submit, requeue_queued_after_s=60, max_requeues=2)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sent == [(tid, 1)]


def test_a_running_run_with_an_expired_lease_is_requeued_then_failed(session_factory: Any) -> None:
    sm = session_factory
    _, tid = new_task(sm)
    sent: list[tuple[str, int]] = []
    for n in range(2):  # max_requeues=2: re-queued twice as the same attempt ...
        with session_scope(sm) as s:
            assert repo.claim_run(s, tid, 1, owner=f"dead-{n}", lease_s=30) is not None
        assert reconcile_once(sm, lambda *a: sent.append(a), requeue_queued_after_s=60, max_requeues=2).requeued == []
        age(sm, tid, lease_expires_at=1)  # the worker died: nobody renews the lease
        report = reconcile_once(sm, lambda *a: sent.append(a), requeue_queued_after_s=60, max_requeues=2)
        assert report.requeued == [(tid, 1)]
        t = row(sm, tid)
        assert (t.run_status, t.status, t.attempt, t.requeues, t.lease_owner) == (QUEUED, QUEUED, 1, n + 1, None)
        with session_scope(sm) as s:  # the dead owner's late writes change nothing
            assert repo.record_progress(s, tid, 1, progress=0.5, owner=f"dead-{n}") is False
    assert sent == [(tid, 1), (tid, 1)]
    # ... then failed with a readable reason
    with session_scope(sm) as s:
        repo.claim_run(s, tid, 1, owner="dead-2", lease_s=30)
    age(sm, tid, lease_expires_at=1)
    report = reconcile_once(sm, lambda *a: sent.append(a), requeue_queued_after_s=60, max_requeues=2)
    assert report.failed == [(tid, 1)] and len(sent) == 2
    t = row(sm, tid)
    assert (t.status, t.run_status, t.error) == (FAILED, FAILED, STALLED_REASON)


def test_a_retrain_of_a_served_task_is_requeued_in_training(session_factory: Any) -> None:
    sm = session_factory
    tenant_id, tid = new_task(sm)
    with session_scope(sm) as s:
        repo.claim_run(s, tid, 1, owner="w")
    with session_scope(sm) as s:
        assert repo.publish_version(
            s, tid, 1, object_key="prompts/a/b/c.safetensors", sha256="c" * 64, size=1, fingerprint="f",
            classes=["cat", "dog"], metrics={}, owner="w",
        ) is not None  # fmt: skip
    with session_scope(sm) as s:
        repo.request_retrain(s, tid, tenant_id=tenant_id)
    with session_scope(sm) as s:
        repo.claim_run(s, tid, 2, owner="dead", lease_s=30)
    age(sm, tid, lease_expires_at=1)
    assert reconcile_once(sm, lambda *a: None, requeue_queued_after_s=60, max_requeues=2).requeued == [(tid, 2)]
    t = row(sm, tid)
    assert (t.status, t.version, t.run_status, t.training["status"]) == (READY, 1, QUEUED, QUEUED)


def test_a_live_lease_is_left_alone(session_factory: Any) -> None:
    sm = session_factory
    _, tid = new_task(sm)
    with session_scope(sm) as s:
        repo.claim_run(s, tid, 1, owner="alive", lease_s=300)
    age(sm, tid, queued_at=3600)
    report = reconcile_once(sm, lambda *a: None, requeue_queued_after_s=1, max_requeues=2)
    assert (report.resent, report.requeued, report.failed) == ([], [], [])
    assert row(sm, tid).lease_owner == "alive"


# --------------------------------------------------------------------------- in-process runner


def fast_settings(settings_factory: Any, backend: str) -> Any:
    return settings_factory(
        db=backend, run_lease_s=1.0, reconcile_interval_s=0.2, requeue_queued_after_s=1.0, run_max_requeues=2
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_serve_sends_a_run_committed_but_never_enqueued(backend: str, settings_factory: Any, caplog: Any) -> None:
    from store.db import get_sessionmaker
    from worker.dispatch import ThreadDispatcher

    caplog.set_level(logging.INFO, logger="promptstore.worker")
    settings = fast_settings(settings_factory, backend)
    dispatcher = ThreadDispatcher(settings)
    dispatcher.start()  # started before the commit: its start-up resubmission cannot see the run
    try:
        sm = get_sessionmaker(settings.database_url)
        _, tid = new_task(sm)  # committed as queued; the API "died" before the send
        t = wait_until(lambda: (r := row(sm, tid)).status == READY and r, what="the run to be sent and tuned")
        assert (t.version, t.attempt, t.lease_owner, t.requeues) == (1, 1, None, 0)
        assert f"task {tid} attempt 1 still queued; sent again" in caplog.text
    finally:
        dispatcher.shutdown()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_serve_requeues_a_run_whose_job_stopped(backend: str, settings_factory: Any, caplog: Any) -> None:
    from store.db import get_sessionmaker
    from worker.dispatch import ThreadDispatcher

    caplog.set_level(logging.INFO, logger="promptstore.worker")
    settings = fast_settings(settings_factory, backend)
    sm = get_sessionmaker(settings.database_url)
    _, tid = new_task(sm)
    with session_scope(sm) as s:  # a job claimed it, then its thread (or process) stopped dead
        assert repo.claim_run(s, tid, 1, owner="stopped-thread", lease_s=60) is not None
    dispatcher = ThreadDispatcher(settings)
    dispatcher.start()  # the lease is live: the start-up resubmission leaves it alone
    try:
        assert row(sm, tid).lease_owner == "stopped-thread"
        age(sm, tid, lease_expires_at=0)  # ... until it expires (no heartbeat renews it)
        t = wait_until(lambda: (r := row(sm, tid)).status == READY and r, what="the run to be re-queued and tuned")
        assert (t.version, t.attempt, t.requeues) == (1, 1, 1)
        assert f"task {tid} attempt 1 re-queued" in caplog.text
    finally:
        dispatcher.shutdown()


def test_a_job_that_lost_its_lease_stops_without_publishing(settings_factory: Any, make_api: Any, caplog: Any) -> None:
    """A real tuning job: its lease is taken over (as after it expired); its heartbeat finds
    that out and the job stops at its next step, publishing nothing."""
    caplog.set_level(logging.INFO, logger="promptstore.worker")
    settings = settings_factory(db="sqlite", run_lease_s=1.0, reconcile_interval_s=60.0)
    api = make_api(settings)
    tenant = api.tenant()
    tid = api.create_task(
        tenant, "coop", dataset=dataset_zip(CLASSES, per_class=3), config={"epochs": 10_000, "n_ctx": 2}
    ).json()["id"]
    api.wait(tenant, tid, lambda t: t["status"] == "running" and t["progress"] > 0, timeout=120)
    from store.db import get_sessionmaker

    sm = get_sessionmaker(settings.database_url)
    first = row(sm, tid).lease_owner
    # The first execution's lease expired (it froze) and a re-delivery took the run over, in one
    # transaction: the first job's heartbeat cannot renew the lease in between.
    with session_scope(sm) as s:
        s.execute(update(Task).where(Task.id == tid).values(lease_expires_at=utcnow()))
        assert repo.claim_run(s, tid, 1, owner="second", lease_s=600) is not None
    wait_until(lambda: "lost its lease" in caplog.text, timeout=60, what="the first job to stop")
    assert api.state.dispatcher.wait_idle(60)
    t = row(sm, tid)
    assert (t.run_status, t.lease_owner, t.version) == (RUNNING, "second", None)
    assert first != "second"
    with session_scope(sm) as s:
        assert repo.list_versions(s, tid, tenant_id=t.tenant_id) == []
