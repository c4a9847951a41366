"""Concurrent transitions of one task (docs/operations.md, "Concurrent changes to one task"),
on SQLite and Postgres, with real threads each in its own session: every transition is one
conditional write, exactly one of two conflicting writers wins and the loser is told so
(``TaskStateError`` / None / False); leases make a second delivery of a running attempt wait.

No timing is asserted: threads start together at a barrier and the outcome is checked."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import update

from store import repo
from store.db import make_engine, make_sessionmaker, session_scope, utcnow
from store.models import CANCELLED, FAILED, QUEUED, READY, RUNNING, Task

from test_repo import claim, fetch, make_task, make_tenant, publish  # noqa: E402 - tests/store/test_repo.py

N_THREADS = 20


@pytest.fixture
def sm(session_factory: Any, db_url: str) -> Any:
    """A sessionmaker with room for every thread's connection (tables emptied by session_factory)."""
    engine = make_engine(db_url, pool_size=N_THREADS + 2, max_overflow=4)
    yield make_sessionmaker(engine)
    engine.dispose()


def race(*fns: Callable[[], Any]) -> list[Any]:
    """Run ``fns`` in threads released together; each result or the exception it raised."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def go(i: int, fn: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as exc:  # the loser's TaskStateError is a result
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a racing thread did not finish"
    return results


def in_session(sm: Any, fn: Callable[[Any], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with session_scope(sm) as s:
            return fn(s)

    return run


def running_task(sm: Any, tenant_id: str, *, served: bool = False) -> tuple[Task, str]:
    """A task whose run is running (a retrain of a served version when ``served``), and the owner."""
    task = make_task(sm, tenant_id)
    if served:
        claim(sm, task.id, 1)
        assert publish(sm, task.id, 1) is not None
        with session_scope(sm) as s:
            task = repo.request_retrain(s, task.id, tenant_id=tenant_id)
    t = claim(sm, task.id, task.attempt)
    return t, t.lease_owner


def publish_as(sm: Any, task_id: str, attempt: int, owner: str | None) -> Any:
    with session_scope(sm) as s:
        task = repo.get_task_for_job(s, task_id)
        tenant_id = task.tenant_id if task is not None else "gone"
        return repo.publish_version(
            s, task_id, attempt, object_key=f"prompts/{tenant_id}/{task_id}/{'c' * 64}.safetensors",
            sha256="c" * 64, size=10, fingerprint="f", classes=["cat", "dog"], metrics={"val_accuracy": 1.0},
            owner=owner,
        )  # fmt: skip


@pytest.mark.parametrize("served", [False, True], ids=["failed-first-run", "served-version"])
def test_twenty_retrains_with_distinct_configs_exactly_one_wins(sm: Any, served: bool) -> None:
    tenant, _ = make_tenant(sm)
    task = make_task(sm, tenant.id)
    claim(sm, task.id, 1)
    with session_scope(sm) as s:
        if served:
            assert publish(sm, task.id, 1) is not None
        else:
            assert repo.fail_run(s, task.id, 1, error="boom")

    results = race(*[
        in_session(sm, lambda s, i=i: repo.request_retrain(s, task.id, tenant_id=tenant.id, config={"n_ctx": i}))
        for i in range(N_THREADS)
    ])  # fmt: skip
    winners = [(i, r) for i, r in enumerate(results) if isinstance(r, Task)]
    losers = [r for r in results if not isinstance(r, Task)]
    assert len(winners) == 1, results
    assert all(isinstance(r, repo.TaskStateError) for r in losers), losers
    assert all("already has a queued run" in str(r) for r in losers), losers
    i, won = winners[0]
    assert (won.attempt, won.config) == (2, {"n_ctx": i})
    # the run that happens carries the winner's config
    t = claim(sm, task.id, 2)
    assert t is not None and t.config == {"n_ctx": i} and t.run_status == RUNNING
    assert claim(sm, task.id, 3) is None


def test_many_claims_of_one_queued_run_one_owner_wins(sm: Any) -> None:
    tenant, _ = make_tenant(sm)
    task = make_task(sm, tenant.id)
    results = race(*[
        in_session(sm, lambda s, i=i: repo.claim_run(s, task.id, 1, owner=f"worker-{i}")) for i in range(N_THREADS)
    ])  # fmt: skip
    owners = [r.lease_owner for r in results if isinstance(r, Task)]
    assert len(owners) == 1 and all(r is None for r in results if not isinstance(r, Task)), results
    assert fetch(sm, task.id, tenant.id).lease_owner == owners[0]


@pytest.mark.parametrize("served", [False, True], ids=["first-run", "retrain"])
def test_cancel_vs_publish_exactly_one_wins(sm: Any, served: bool) -> None:
    tenant, _ = make_tenant(sm)
    for _ in range(5):
        task, owner = running_task(sm, tenant.id, served=served)
        cancelled, published = race(
            in_session(sm, lambda s: repo.request_cancel(s, task.id, tenant_id=tenant.id)),
            lambda: publish_as(sm, task.id, task.attempt, owner),
        )
        t = fetch(sm, task.id, tenant.id)
        if isinstance(cancelled, Task):
            assert published is None, "a cancel and a publish both won"
            assert t.run_status == RUNNING and t.cancel_requested
            with session_scope(sm) as s:  # the job sees the request and stops
                assert repo.mark_cancelled(s, task.id, task.attempt, owner=owner)
            assert fetch(sm, task.id, tenant.id).run_status == CANCELLED
        else:
            assert isinstance(cancelled, repo.TaskStateError) and published is not None, (cancelled, published)
            assert t.run_status == READY and t.version == published.version and not t.cancel_requested


def test_cancel_vs_claim_the_cancel_always_holds(sm: Any) -> None:
    tenant, _ = make_tenant(sm)
    for _ in range(5):
        task = make_task(sm, tenant.id)
        cancelled, claimed = race(
            in_session(sm, lambda s: repo.request_cancel(s, task.id, tenant_id=tenant.id)),
            in_session(sm, lambda s: repo.claim_run(s, task.id, 1, owner="w")),
        )
        assert isinstance(cancelled, Task), cancelled
        t = fetch(sm, task.id, tenant.id)
        if claimed is None:
            assert t.run_status == CANCELLED
        else:  # claimed first: the running job is asked to stop
            assert t.run_status == RUNNING and t.cancel_requested
            assert publish_as(sm, task.id, 1, "w") is None


def test_fail_vs_publish_exactly_one_wins(sm: Any) -> None:
    tenant, _ = make_tenant(sm)
    for _ in range(5):
        task, owner = running_task(sm, tenant.id)
        failed, published = race(
            in_session(sm, lambda s: repo.fail_run(s, task.id, 1, error="the worker stopped")),
            lambda: publish_as(sm, task.id, 1, owner),
        )
        assert (failed is True) != (published is not None), (failed, published)
        t = fetch(sm, task.id, tenant.id)
        assert t.run_status == (FAILED if failed is True else READY)
        assert (t.version is None) == (failed is True)


def test_retrain_vs_publish_never_loses_the_publish(sm: Any) -> None:
    """A retrain racing the publish of the running run: refused (409) while it runs, or accepted
    after the publish committed; never accepted over a run that then publishes nothing."""
    tenant, _ = make_tenant(sm)
    for _ in range(5):
        task, owner = running_task(sm, tenant.id)
        retrained, published = race(
            in_session(sm, lambda s: repo.request_retrain(s, task.id, tenant_id=tenant.id, config={"n_ctx": 9})),
            lambda: publish_as(sm, task.id, 1, owner),
        )
        assert published is not None and published.version == 1
        t = fetch(sm, task.id, tenant.id)
        if isinstance(retrained, Task):
            assert (t.attempt, t.version, t.run_status, t.config) == (2, 1, QUEUED, {"n_ctx": 9})
        else:
            assert isinstance(retrained, repo.TaskStateError), retrained
            assert (t.attempt, t.version, t.run_status, t.config) == (1, 1, READY, {"n_ctx": 4})


def test_delete_vs_claim_no_job_runs_on_a_deleted_task(sm: Any) -> None:
    tenant, _ = make_tenant(sm)
    for _ in range(5):
        task = make_task(sm, tenant.id)
        deleted, claimed = race(
            in_session(sm, lambda s: repo.delete_task(s, task.id, tenant_id=tenant.id)),
            in_session(sm, lambda s: repo.claim_run(s, task.id, 1, owner="w")),
        )
        assert isinstance(deleted, list), deleted
        assert fetch(sm, task.id, tenant.id) is None
        with session_scope(sm) as s:  # whoever claimed finds the task gone at its next write
            assert repo.record_progress(s, task.id, 1, progress=0.5, owner="w") is False
            assert repo.renew_lease(s, task.id, 1, owner="w") is False
        assert publish_as(sm, task.id, 1, "w") is None


def test_concurrent_deletes_one_wins(sm: Any) -> None:
    tenant, _ = make_tenant(sm)
    task = make_task(sm, tenant.id)
    results = race(*[in_session(sm, lambda s: repo.delete_task(s, task.id, tenant_id=tenant.id)) for _ in range(6)])
    assert sum(isinstance(r, list) for r in results) == 1 and results.count(None) == 5, results


# --------------------------------------------------------------------------- leases


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.05)


def test_second_delivery_waits_for_the_lease_then_takes_over_and_the_first_stops(sm: Any) -> None:
    tenant, _ = make_tenant(sm)
    task = make_task(sm, tenant.id)
    with session_scope(sm) as s:
        assert repo.claim_run(s, task.id, 1, owner="first", lease_s=0.5) is not None
    with session_scope(sm) as s:  # a second delivery while the first holds a live lease
        assert repo.claim_run(s, task.id, 1, owner="second", lease_s=30) is None
    assert fetch(sm, task.id, tenant.id).lease_owner == "first"

    def take_over() -> Any:  # the first stopped renewing: once its lease expired
        with session_scope(sm) as s:
            return repo.claim_run(s, task.id, 1, owner="second", lease_s=30)

    assert wait_until(take_over).lease_owner == "second"
    # the first wakes up: every write of its finds it lost the run
    with session_scope(sm) as s:
        assert repo.renew_lease(s, task.id, 1, owner="first") is False
        assert repo.record_progress(s, task.id, 1, progress=0.9, owner="first") is False
        assert repo.should_stop(s, task.id, 1, owner="first") is True
        assert repo.fail_run(s, task.id, 1, error="x", owner="first") is False
        assert repo.mark_cancelled(s, task.id, 1, owner="first") is False
        assert repo.release_lease(s, task.id, 1, owner="first") is False
    assert publish_as(sm, task.id, 1, "first") is None
    assert publish_as(sm, task.id, 1, "second").version == 1


def test_an_owner_that_renewed_keeps_its_run(sm: Any) -> None:
    """A takeover is decided on the lease as read: if the owner renewed meanwhile, it keeps it."""
    tenant, _ = make_tenant(sm)
    task = make_task(sm, tenant.id)
    with session_scope(sm) as s:
        repo.claim_run(s, task.id, 1, owner="first", lease_s=30)
        s.execute(update(Task).where(Task.id == task.id).values(lease_expires_at=utcnow()))  # it just expired
    with session_scope(sm) as s:
        assert repo.renew_lease(s, task.id, 1, owner="first", lease_s=30)
    with session_scope(sm) as s:
        assert repo.claim_run(s, task.id, 1, owner="second") is None
    assert fetch(sm, task.id, tenant.id).lease_owner == "first"


def test_a_released_lease_is_claimed_at_once(sm: Any) -> None:
    tenant, _ = make_tenant(sm)
    task = make_task(sm, tenant.id)
    with session_scope(sm) as s:
        repo.claim_run(s, task.id, 1, owner="first", lease_s=30)
        assert repo.release_lease(s, task.id, 1, owner="first")
    with session_scope(sm) as s:
        assert repo.claim_run(s, task.id, 1, owner="retry").lease_owner == "retry"
