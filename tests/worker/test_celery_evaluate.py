"""Evaluations as a second kind of job: a real Celery worker process (``promptstore worker``) on
Redis, Postgres and SeaweedFS S3 runs ``promptstore.evaluate`` for an app that dispatches to the
broker (a duplicate delivery does nothing, a missing zip fails with a readable reason); the
task's configuration; and, on SQLite and Postgres, the job protocol the reconciler relies on
(claim under a lease, take-over after expiry, re-send of a lost message, re-queue and failure
of a stalled evaluation)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from apiclient import Api, _one_torch_thread, running_app  # noqa: F401 - fixture
from procs import Process, production_settings, settings_env, started
from psdata import dataset_zip
from sqlalchemy import update

from store import evaluations as evals
from store import repo
from store.db import session_scope, utcnow
from store.models import Evaluation

CLASSES = ("bird", "cat", "dog")


@pytest.fixture(scope="module")
def stack(pg_url: str, redis_url: str, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Process]]:
    """Settings on Postgres + a fresh S3 bucket + the Redis broker, and a `promptstore worker`
    subprocess started with the same settings as environment variables."""
    settings = production_settings(pg_url, redis_url, s3_server, "eval")
    cwd = tmp_path_factory.mktemp("eval-worker")
    # its reconciler stays out of the way of the reconciler tests below (same Postgres database)
    env = settings_env(settings, PROMPTSTORE_RECONCILE_INTERVAL_S="3600")
    with started(["worker"], env=env, cwd=cwd, name="worker") as worker:
        worker.wait_for("ready.", timeout=90)
        yield settings, worker
    assert worker.proc.poll() is not None, "the worker process group was not stopped"


@pytest.fixture(scope="module")
def api(stack: tuple[Any, Process]) -> Iterator[Api]:
    settings, _ = stack
    with running_app(settings) as client:
        yield Api(client)


def _wait_evaluation(api: Api, headers: dict[str, str], task_id: str, eid: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = api.client.get(f"/v1/tasks/{task_id}/evaluations/{eid}", headers=headers)
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("ready", "failed"):
            return r.json()
        assert time.monotonic() < deadline, f"evaluation {eid}: {r.json()}"
        time.sleep(0.05)


def _evaluation_objects(settings: Any) -> set[str]:
    from store.objects import S3ObjectStore

    store = S3ObjectStore.from_url(settings.object_store_url, access_key=settings.s3_access_key,
                                   secret_key=settings.s3_secret_key)
    return {o.object_name for o in store.client.list_objects(store.bucket, prefix="evaluations/", recursive=True)}


def test_worker_process_runs_an_evaluation(stack: tuple[Any, Process], api: Api) -> None:
    settings, worker = stack
    assert api.client.get("/readyz").json()["jobs"] == "celery"
    tenant = api.tenant()
    tid = api.create_task(tenant, "zeroshot", classes=list(CLASSES)).json()["id"]
    api.wait_ready(tenant, tid, timeout=180)

    r = api.client.post(
        f"/v1/tasks/{tid}/evaluate", data={"top_k": "2", "precision": "0.5"},
        files={"dataset": ("eval.zip", dataset_zip(CLASSES, per_class=3, seed=40), "application/zip")},
        headers=tenant,
    )
    assert r.status_code == 202, r.text
    eid = r.json()["id"]
    done = _wait_evaluation(api, tenant, tid, eid)
    assert done["status"] == "ready", done["error"]
    result = done["result"]
    assert result["n_images"] == 9 and result["classes"] == list(CLASSES)
    assert sum(map(sum, result["confusion"])) == 9 and [r["support"] for r in result["per_class"]] == [3, 3, 3]
    assert result["accuracy"] == pytest.approx(sum(result["confusion"][i][i] for i in range(3)) / 9)
    assert result["top_k_accuracy"]["k"] == 2 and len(result["reliability"]) == 15
    # the worker process ran it (the app has no job threads), and deleted its zip
    worker.wait_for(f"evaluation {eid}: ready")
    assert _evaluation_objects(settings) == set()

    # the same message again, as a broker re-delivery would: nothing happens
    api.state.dispatcher.submit_evaluation(eid)
    log = worker.wait_for(f"evaluation {eid}: nothing to do", timeout=60)
    assert log.count(f"evaluation {eid}: ready") == 1
    assert _wait_evaluation(api, tenant, tid, eid)["result"] == result


def test_a_missing_zip_fails_with_a_readable_reason(stack: tuple[Any, Process], api: Api) -> None:
    settings, worker = stack
    tenant = api.tenant()
    tid = api.create_task(tenant, "zeroshot", classes=list(CLASSES)).json()["id"]
    api.wait_ready(tenant, tid, timeout=180)
    with session_scope(api.state.sessionmaker) as s:
        task = repo.get_task_for_job(s, tid)
        ev = evals.create_evaluation(
            s, task_id=tid, tenant_id=task.tenant_id, version=1, object_key=f"evaluations/{task.tenant_id}/{tid}/gone.zip",
            sha256="0" * 64, size=1, params={"top_k": 1, "precision": 0.9},
        )
        eid = ev.id
    api.state.dispatcher.submit_evaluation(eid)
    done = _wait_evaluation(api, tenant, tid, eid)
    assert done["status"] == "failed" and done["result"] is None
    assert "missing from the object store" in done["error"] and "Traceback" not in done["error"]
    worker.wait_for(f"evaluation {eid}: failed")


# --------------------------------------------------------------------------- configuration


def test_evaluate_task_is_idempotent_by_configuration() -> None:
    from worker.celery_app import celery_app
    from worker.dispatch import EVALUATE_TASK_NAME, TUNE_TASK_NAME
    from worker.jobs import TransientJobError
    from worker.tasks import MAX_RETRIES, evaluate

    assert evaluate.name == EVALUATE_TASK_NAME == "promptstore.evaluate" != TUNE_TASK_NAME
    assert EVALUATE_TASK_NAME in celery_app.tasks
    assert evaluate.acks_late is True and evaluate.reject_on_worker_lost is True
    assert evaluate.autoretry_for == (TransientJobError,) and evaluate.max_retries == MAX_RETRIES


def test_unknown_evaluation_is_skipped(settings_factory: Any) -> None:
    from worker.evaluate import run_evaluation_job

    assert run_evaluation_job(uuid.uuid4().hex, settings=settings_factory()) == "skipped"


def test_unreachable_database_is_a_transient_job_error(settings_factory: Any) -> None:
    from procs import free_port
    from worker.evaluate import run_evaluation_job
    from worker.jobs import TransientJobError

    settings = settings_factory(
        db=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere?connect_timeout=2", migrate=False
    )
    with pytest.raises(TransientJobError, match="OperationalError"):
        run_evaluation_job(uuid.uuid4().hex, settings=settings)


def test_retries_used_up_fail_the_evaluation(settings_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Celery task does once autoretry gives up on a transient error."""
    from store.db import get_sessionmaker
    from store.settings import get_settings
    from worker.jobs import TransientJobError
    from worker.tasks import evaluate

    settings = settings_factory()
    monkeypatch.setenv("PROMPTSTORE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PROMPTSTORE_OBJECT_STORE_URL", settings.object_store_url)
    get_settings.cache_clear()
    sm = get_sessionmaker(settings.database_url)
    _, tid, eid = _queued_evaluation(sm)
    try:
        evaluate.on_failure(TransientJobError("OperationalError: connection refused"), "celery-id", (eid,), {}, None)
        _, _, other = _queued_evaluation(sm)
        evaluate.on_failure(ValueError("bug"), "celery-id", (other,), {}, None)  # recorded by the job itself
    finally:
        get_settings.cache_clear()
    with session_scope(sm) as s:
        ev = evals.get_evaluation_for_job(s, eid)
        assert ev.status == "failed" and "unreachable" in ev.error and ev.object_key is None
        assert evals.get_evaluation_for_job(s, other).status == "queued"


# --------------------------------------------------------------------------- job protocol


def _queued_evaluation(sm: Any) -> tuple[str, str, str]:
    """A tenant, a zeroshot task and a queued evaluation of its version 1 (rows only)."""
    with session_scope(sm) as s:
        tenant, _ = repo.create_tenant(s, f"t-{time.monotonic_ns()}")
        task = repo.create_task(s, tenant_id=tenant.id, name="t", method="zeroshot", config={}, classes=["a", "b"])
        ev = evals.create_evaluation(s, task_id=task.id, tenant_id=tenant.id, version=1,
                                     object_key=f"evaluations/{tenant.id}/{task.id}/x.zip", sha256="0" * 64, size=1,
                                     params={"top_k": 1, "precision": 0.9})
        return tenant.id, task.id, ev.id


def _age(sm: Any, eid: str, **columns_seconds_ago: float) -> None:
    values = {k: utcnow() - dt.timedelta(seconds=v) for k, v in columns_seconds_ago.items()}
    with session_scope(sm) as s:
        s.execute(update(Evaluation).where(Evaluation.id == eid).values(**values))


def _row(sm: Any, eid: str) -> Evaluation:
    with session_scope(sm) as s:
        return evals.get_evaluation_for_job(s, eid)


def test_claim_is_exclusive_under_a_live_lease(session_factory: Any) -> None:
    sm = session_factory
    _, tid, eid = _queued_evaluation(sm)
    with session_scope(sm) as s:
        assert evals.claim_evaluation(s, eid, owner="a", lease_s=60) is not None
    with session_scope(sm) as s:  # a duplicate delivery while "a" holds it
        assert evals.claim_evaluation(s, eid, owner="b", lease_s=60) is None
    _age(sm, eid, lease_expires_at=1)  # "a" stopped renewing
    with session_scope(sm) as s:
        assert evals.claim_evaluation(s, eid, owner="b", lease_s=60).lease_owner == "b"
    with session_scope(sm) as s:  # "a" wakes up: its writes change nothing
        assert not evals.renew_evaluation_lease(s, eid, owner="a")
        assert evals.finish_evaluation(s, eid, owner="a", result={"accuracy": 1.0}) == (False, None)
        assert evals.fail_evaluation(s, eid, error="x", owner="a") == (False, None)
    with session_scope(sm) as s:
        won, key = evals.finish_evaluation(s, eid, owner="b", result={"accuracy": 0.5})
        assert won and key is not None and key.endswith("/x.zip")
    ev = _row(sm, eid)
    assert ev.status == "ready" and ev.result == {"accuracy": 0.5} and ev.object_key is None and ev.lease_owner is None
    with session_scope(sm) as s:  # finished: a late delivery does nothing
        assert evals.claim_evaluation(s, eid, owner="c") is None
        assert evals.pending_evaluations(s).count(eid) == 0
        from store.events import list_events

        kinds = [(e.kind, e.data.get("evaluation_id")) for e in list_events(s, tid, tenant_id=ev.tenant_id)]
    assert kinds[-2:] == [("evaluation_queued", eid), ("evaluated", eid)]


def test_reconciler_resends_requeues_and_fails_evaluations(session_factory: Any) -> None:
    from worker.reconcile import STALLED_EVALUATION, reconcile_once

    sm = session_factory
    _, _, eid = _queued_evaluation(sm)
    sent: list[str] = []

    def once() -> Any:
        return reconcile_once(sm, lambda *a: None, requeue_queued_after_s=60, max_requeues=1,
                              submit_evaluation=sent.append)

    assert once().evaluations_resent == [] and sent == []  # queued a moment ago: its message is on its way
    _age(sm, eid, created_at=61)
    assert once().evaluations_resent == [eid] and sent == [eid]
    assert once().evaluations_resent == []  # not again before the bound
    _age(sm, eid, lease_expires_at=61)  # the re-sent message was lost too
    assert once().evaluations_resent == [eid] and sent == [eid, eid]
    # without submit_evaluation (an older caller) evaluations are left alone
    _age(sm, eid, lease_expires_at=61)
    assert reconcile_once(sm, lambda *a: None, requeue_queued_after_s=60, max_requeues=1).evaluations_resent == []

    with session_scope(sm) as s:
        assert evals.claim_evaluation(s, eid, owner="w1", lease_s=60) is not None
    assert once().evaluations_requeued == []  # live lease
    _age(sm, eid, lease_expires_at=1)
    report = once()
    assert report.evaluations_requeued == [eid] and sent[-1] == eid
    ev = _row(sm, eid)
    assert ev.status == "queued" and ev.lease_owner is None and ev.params["requeues"] == 1
    with session_scope(sm) as s:
        assert evals.claim_evaluation(s, eid, owner="w2", lease_s=60) is not None
        assert not evals.renew_evaluation_lease(s, eid, owner="w1")
    _age(sm, eid, lease_expires_at=1)
    report = once()  # re-queued max_requeues times already: failed, readably
    assert report.evaluations_failed == [eid] and report.evaluations_requeued == []
    ev = _row(sm, eid)
    assert ev.status == "failed" and ev.error == STALLED_EVALUATION and ev.object_key is None
    assert once().evaluations_failed == []


def test_many_reconcilers_at_once_send_an_evaluation_once(session_factory: Any) -> None:
    import threading

    from worker.reconcile import reconcile_once

    sm = session_factory
    _, _, eid = _queued_evaluation(sm)
    _age(sm, eid, created_at=120)
    sent: list[str] = []
    lock = threading.Lock()

    def submit(e: str) -> None:
        with lock:
            sent.append(e)

    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        reconcile_once(sm, lambda *a: None, requeue_queued_after_s=60, max_requeues=2, submit_evaluation=submit)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sent == [eid]
