"""A real Celery worker process (``promptstore worker``) on Redis, Postgres and SeaweedFS S3,
driven through the HTTP API of an app that dispatches to the broker: a task tunes end to end,
cancel is honoured by the worker, and a duplicate delivery publishes nothing twice.

Plus the worker's reliability settings (acks_late, reject_on_worker_lost, explicit name,
prefetch 1, retries only on a named list of transient errors)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from apiclient import Api, _one_torch_thread, running_app  # noqa: F401 - fixture
from procs import Process, production_settings, settings_env, started
from psdata import b64, dataset_zip, image_bytes

CLASSES = ("bird", "cat", "dog")


@pytest.fixture(scope="module")
def stack(pg_url: str, redis_url: str, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Process]]:
    """Settings on Postgres + a fresh S3 bucket + the Redis broker, and a `promptstore worker`
    subprocess started with the same settings as environment variables (docs/settings.md)."""
    settings = production_settings(pg_url, redis_url, s3_server, "worker")
    cwd = tmp_path_factory.mktemp("worker")
    with started(["worker"], env=settings_env(settings), cwd=cwd, name="worker") as worker:
        worker.wait_for("ready.", timeout=90)
        yield settings, worker
    assert worker.proc.poll() is not None, "the worker process group was not stopped"


@pytest.fixture(scope="module")
def api(stack: tuple[Any, Process]) -> Iterator[Api]:
    settings, _ = stack
    with running_app(settings) as client:
        yield Api(client)


def _versions(settings: Any, task_id: str) -> list[Any]:
    from store import repo
    from store.db import session_scope
    from store.db import get_sessionmaker

    with session_scope(get_sessionmaker(settings.database_url)) as s:
        task = repo.get_task_for_job(s, task_id)
        assert task is not None
        return [(v.version, v.object_key) for v in repo.list_versions(s, task_id, tenant_id=task.tenant_id)]


def test_worker_process_tunes_a_task_end_to_end(stack: tuple[Any, Process], api: Api) -> None:
    settings, worker = stack
    ready = api.client.get("/readyz").json()
    assert ready["jobs"] == "celery", ready
    tenant = api.tenant()
    created = api.create_task(
        # long enough (about 2,000 steps) that the polls below see it mid-run on a loaded machine
        tenant, "coop", dataset=dataset_zip(CLASSES, per_class=4), config={"epochs": 200, "n_ctx": 2, "batch_size": 1}
    ).json()
    tid = created["id"]
    assert created["status"] == "queued"

    seen: list[dict[str, Any]] = []
    task = api.wait_ready(tenant, tid, seen=seen, interval=0.05, timeout=180)
    progress = [t["progress"] for t in seen]
    assert progress == sorted(progress), f"progress went down: {progress}"
    assert any(0.0 < p < 1.0 for p in progress), f"no intermediate progress observed: {progress}"
    assert any(t["status"] == "running" for t in seen)
    assert task["version"] == 1 and task["metrics"]["n_train"] + task["metrics"]["n_val"] == 12
    # The worker process ran it (the app has no job threads: it dispatches to the broker).
    worker.wait_for(f"task {tid} attempt 1: published version 1")

    imgs = [image_bytes(0, seed=7), image_bytes(2, seed=8, fmt="JPEG")]
    r = api.classify_files(tenant, tid, imgs, top_k=2)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and all(len(p) == 2 and {x["label"] for x in p} <= set(CLASSES) for p in preds)
    r = api.client.post(f"/v1/tasks/{tid}/classify", json={"images": [b64(i) for i in imgs]}, headers=tenant)
    assert r.status_code == 200, r.text
    assert [[x["label"] for x in p][:2] for p in r.json()["predictions"]] == [[x["label"] for x in p] for p in preds]


def test_cancel_is_honoured_by_the_worker(stack: tuple[Any, Process], api: Api) -> None:
    _, worker = stack
    tenant = api.tenant()
    tid = api.create_task(
        tenant, "coop", dataset=dataset_zip(CLASSES, per_class=3), config={"epochs": 10_000, "n_ctx": 2}
    ).json()["id"]
    api.wait(tenant, tid, lambda t: t["status"] == "running" and t["progress"] > 0, timeout=120)
    assert api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant).status_code == 202
    t = api.wait(tenant, tid, lambda t: t["status"] not in ("queued", "running"), timeout=60)
    assert t["status"] == "cancelled" and t["version"] is None and t["progress"] < 1.0
    worker.wait_for(f"task {tid} attempt 1: cancelled")


def test_the_same_delivery_twice_publishes_one_version(stack: tuple[Any, Process], api: Api) -> None:
    settings, worker = stack
    tenant = api.tenant()
    task = api.create_task(
        tenant, "coop", dataset=dataset_zip(CLASSES, per_class=3), config={"epochs": 2, "n_ctx": 2}
    ).json()
    tid = task["id"]
    # Deliver the same (task id, attempt) message again, as a broker re-delivery would.
    api.state.dispatcher.submit(tid, 1)
    api.wait_ready(tenant, tid, timeout=120)
    worker.wait_for(f"task {tid} attempt 1: published version 1")
    worker.wait_for(f"task {tid} attempt 1: nothing to do", timeout=60)
    # ... and once more after it finished.
    api.state.dispatcher.submit(tid, 1)
    log = worker.wait_for(f"task {tid} attempt 1: nothing to do", timeout=60, count=2)
    versions = _versions(settings, tid)
    assert [v for v, _ in versions] == [1], versions
    assert api.task(tenant, tid)["version"] == 1
    assert log.count(f"task {tid} attempt 1: published") == 1


# --------------------------------------------------------------------------- configuration


def test_tune_task_is_idempotent_by_configuration() -> None:
    from worker.celery_app import celery_app
    from worker.dispatch import TUNE_TASK_NAME
    from worker.jobs import TransientJobError
    from worker.tasks import MAX_RETRIES, tune

    assert tune.name == TUNE_TASK_NAME == "promptstore.tune"
    assert TUNE_TASK_NAME in celery_app.tasks
    assert tune.acks_late is True and tune.reject_on_worker_lost is True
    assert tune.autoretry_for == (TransientJobError,)
    assert tune.max_retries == MAX_RETRIES and 0 < MAX_RETRIES <= 10
    conf = celery_app.conf
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]  # ids only, never pickle
    assert conf.task_ignore_result is True


def test_retries_only_a_named_list_of_transient_errors() -> None:
    import redis.exceptions
    import sqlalchemy.exc

    from store.archive import DatasetError
    from store.objects import ObjectNotFound, ObjectStoreError
    from worker.jobs import TRANSIENT_ERRORS, is_transient

    assert isinstance(TRANSIENT_ERRORS, tuple) and TRANSIENT_ERRORS
    for broad in (BaseException, Exception, OSError, RuntimeError, ValueError):
        assert broad not in TRANSIENT_ERRORS
    assert sqlalchemy.exc.OperationalError in TRANSIENT_ERRORS
    assert redis.exceptions.ConnectionError in TRANSIENT_ERRORS

    op = sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
    assert is_transient(op)
    assert is_transient(TimeoutError("read timed out"))
    assert not is_transient(ValueError("bad config"))
    assert not is_transient(DatasetError("class folder 'cat' has no images"))
    assert not is_transient(ObjectNotFound("datasets/x"))
    assert not is_transient(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate")))
    # A store error raised while handling a connection failure counts (the object store wraps
    # client errors); one without a transient cause does not.
    try:
        try:
            raise ConnectionRefusedError("connection refused")
        except ConnectionRefusedError:
            raise ObjectStoreError("get datasets/x failed") from None
    except ObjectStoreError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(ObjectStoreError("AccessDenied"))


def test_unreachable_database_is_a_transient_job_error(settings_factory: Any) -> None:
    from procs import free_port
    from worker.jobs import TransientJobError, run_tune_job

    settings = settings_factory(
        db=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere?connect_timeout=2", migrate=False
    )
    with pytest.raises(TransientJobError, match="OperationalError"):
        run_tune_job(uuid.uuid4().hex, 1, settings=settings)


def test_unknown_task_is_skipped_not_failed(settings_factory: Any) -> None:
    from worker.jobs import run_tune_job

    assert run_tune_job(uuid.uuid4().hex, 1, settings=settings_factory()) == "skipped"


def test_retries_used_up_fail_the_task_with_a_readable_reason(settings_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Celery task does once autoretry gives up on a transient error."""
    from store import repo
    from store.db import session_scope
    from store.settings import get_settings
    from store.db import get_sessionmaker
    from worker.jobs import TransientJobError
    from worker.tasks import tune

    settings = settings_factory()
    monkeypatch.setenv("PROMPTSTORE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PROMPTSTORE_OBJECT_STORE_URL", settings.object_store_url)
    get_settings.cache_clear()
    sm = get_sessionmaker(settings.database_url)
    with session_scope(sm) as s:
        tenant, _ = repo.create_tenant(s, "retry-tenant")
        task = repo.create_task(s, tenant_id=tenant.id, name="t", method="zeroshot", config={}, classes=["a", "b"])
        tid = task.id
    try:
        tune.on_failure(TransientJobError("OperationalError: connection refused"), "celery-id", (tid, 1), {}, None)
    finally:
        get_settings.cache_clear()
    with session_scope(sm) as s:
        task = repo.get_task_for_job(s, tid)
        assert task is not None and task.status == "failed"
        assert "unreachable" in (task.error or "") and "retrain" in (task.error or "")
    # Any other failure is recorded by the job itself; on_failure leaves the task alone.
    with session_scope(sm) as s:
        tid2 = repo.create_task(s, tenant_id=tenant.id, name="t2", method="zeroshot", config={}, classes=["a", "b"]).id
    tune.on_failure(ValueError("bug"), "celery-id", (tid2, 1), {}, None)
    with session_scope(sm) as s:
        assert repo.get_task_for_job(s, tid2).status == "queued"
