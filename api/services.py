"""The service layer: what a tenant route and an admin page both do to a task (store its
dataset, start or cancel a run, enqueue it, delete the task with its objects).

Routers stay thin (parse, authorise, answer) and call these; persistence is ``store.repo``,
work is ``worker`` (enqueued only after the database commit). Refusals are ``ApiError``s
with the status the HTTP contract gives them (404 unknown task, 409 wrong state, 413/422 bad
dataset, 503 broker down).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from fastapi import UploadFile
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.state import ServiceState
from store import repo
from store.archive import ArchiveLimits, inspect_archive
from store.models import Task
from store.objects import dataset_key, sha256_hex

log = logging.getLogger("promptstore.api")

__all__ = [
    "cancel_run", "delete_task_and_objects", "enqueue", "enqueue_evaluation", "request_run", "retry",
    "serve_version", "store_dataset",
]


def store_dataset(
    state: ServiceState, s: Session, tenant_id: str, upload: UploadFile,
    check: Callable[[list[str]], None] | None = None,
) -> tuple[str, list[str]]:
    """Validate the uploaded zip, store it under its content-addressed key and record it
    (in the caller's transaction). Returns ``(dataset_id, classes)``. ``check(classes)`` runs
    before anything is stored (a refusal leaves nothing behind)."""
    limit = state.settings.max_upload_bytes
    upload.file.seek(0)
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"dataset archive is over the upload limit of {limit} bytes")
    manifest = inspect_archive(data, ArchiveLimits.from_settings(state.settings))
    if check is not None:
        check(list(manifest.classes))
    digest = sha256_hex(data)
    key = dataset_key(tenant_id, digest)
    state.objects.put(key, data)  # the object before the row that points to it
    ds = repo.create_dataset(
        s,
        tenant_id=tenant_id,
        object_key=key,
        sha256=digest,
        size=len(data),
        classes=manifest.classes,
        counts=manifest.counts,
        warnings=manifest.warnings,
    )
    return ds.id, list(manifest.classes)


def _submit(send: Any, what: str, saved: str) -> None:
    """Hand a committed job to the dispatcher with ``send()``. When the broker does not take it
    (down, or past ``broker_timeout``/``broker_deadline``) the job stays queued in the database,
    where the reconciler finds it and sends it again, and the caller gets a 503 saying so
    (``saved``: what was saved and where to look at it), so that the client does not submit it
    twice."""
    from store.timeouts import BROKER, RETRY_AFTER_S, DependencyTimeout

    try:
        send()
    except Exception as exc:
        log.error("could not enqueue %s: %s", what, exc)
        why = exc.detail.removesuffix("; retry") if isinstance(exc, DependencyTimeout) else f"{BROKER} is unavailable"
        raise ApiError(503, f"{why}; {saved}", {"Retry-After": str(RETRY_AFTER_S)}) from None


def enqueue(state: ServiceState, task_id: str, attempt: int) -> None:
    """Submit the run (the caller has committed); 503 naming the task when the broker does not
    take it (``_submit``; with an Idempotency-Key, a retry of the same request answers with
    that task)."""
    _submit(
        lambda: state.dispatcher.submit(task_id, attempt), f"task {task_id} attempt {attempt}",
        f"task {task_id} was saved and its run stays queued: it is enqueued again automatically, "
        f"so do not create it again (GET /v1/tasks/{task_id} shows it)",
    )


def enqueue_evaluation(state: ServiceState, task_id: str, evaluation_id: str) -> None:
    """Submit the evaluation's job (the caller has committed); 503 naming it when the broker
    does not take it (``_submit``), so that the client polls it rather than submit it again."""
    _submit(
        lambda: state.dispatcher.submit_evaluation(evaluation_id), f"evaluation {evaluation_id} of task {task_id}",
        f"evaluation {evaluation_id} of task {task_id} was saved and stays queued: it is enqueued again "
        f"automatically, so do not submit it again (GET /v1/tasks/{task_id}/evaluations/{evaluation_id} shows it)",
    )


def request_run(
    s: Session, task_id: str, *, tenant_id: str, dataset_id: str | None = None, config: dict[str, Any] | None = None
) -> Task:
    """Queue a new run of the task (uncommitted; ``dataset_id``/``config`` None keep the
    current ones). 409 while a run is queued or running, 404 when the task is not the tenant's."""
    try:
        task = repo.request_retrain(s, task_id, tenant_id=tenant_id, dataset_id=dataset_id, config=config)
    except repo.TaskStateError as exc:
        raise ApiError(409, str(exc)) from None
    if task is None:
        raise ApiError(404, f"task {task_id} not found")
    return task


def retry(state: ServiceState, s: Session, task_id: str, *, tenant_id: str) -> Task:
    """A new run with the task's current inputs: queued, committed, then enqueued."""
    task = request_run(s, task_id, tenant_id=tenant_id)
    s.commit()
    enqueue(state, task.id, task.attempt)
    return task


def cancel_run(s: Session, task_id: str, *, tenant_id: str) -> Task:
    """Ask the task's current run to stop (a queued run at once, a running one at its next
    step). 409 when no run is queued or running, 404 when the task is not the tenant's."""
    try:
        task = repo.request_cancel(s, task_id, tenant_id=tenant_id)
    except repo.TaskStateError as exc:
        raise ApiError(409, str(exc)) from None
    if task is None:
        raise ApiError(404, f"task {task_id} not found")
    return task


def serve_version(state: ServiceState, s: Session, task_id: str, version: int, *, tenant_id: str) -> Task:
    """Make ``version`` the task's served prompt (committed) and tell the engines: this
    process's at once, the other replicas' through Redis; every request that reads the task
    after the commit answers with that version, and none answers again with the previous one
    (``Task.serving_generation``). 404: unknown task or version; 409: made on another backbone,
    or the served version changed meanwhile; 503 while the backbone is loading."""
    from backbone.artifacts import read_prompt_metadata
    from backbone.holder import BackboneNotReady

    try:
        fingerprint = state.backbone.get().fingerprint
    except BackboneNotReady as exc:
        raise ApiError(503, f"{exc}; retry shortly", {"Retry-After": "5"}) from None
    classes = None
    pv = repo.get_version(s, task_id, version, tenant_id=tenant_id)
    if pv is not None and not isinstance(pv.classes, list):  # a row older than its classes' record
        try:
            meta = read_prompt_metadata(state.objects.get(pv.object_key))
            classes = json.loads(meta.get("classes", "null"))
        except Exception as exc:
            log.warning("task %s version %s: could not read the classes from its prompt: %s", task_id, version, exc)
    try:
        task = repo.serve_version(s, task_id, version, tenant_id=tenant_id, fingerprint=fingerprint, classes=classes)
    except repo.VersionNotFound as exc:
        raise ApiError(404, str(exc)) from None
    except (repo.VersionIncompatible, repo.TaskStateError) as exc:
        raise ApiError(409, str(exc)) from None
    if task is None:
        raise ApiError(404, f"task {task_id} not found")
    s.commit()
    state.inference.served(task_id, task.serving_generation)
    return task


def delete_task_and_objects(state: ServiceState, s: Session, task_id: str, *, tenant_id: str) -> None:
    """Delete the task's rows (committed), drop it from the inference cache, then delete its
    prompt objects. Its dataset zip is shared by content (another upload of the same zip may
    be in flight): the garbage collector deletes it once no row refers to it. 404 when the
    task is not this tenant's."""
    keys = repo.delete_task(s, task_id, tenant_id=tenant_id)
    if keys is None:
        raise ApiError(404, f"task {task_id} not found")
    s.commit()
    state.inference.evict(task_id)
    for key in keys:
        try:
            state.objects.delete(key)
        except Exception as exc:  # the rows are gone; an orphan object is only storage
            log.error("task %s deleted but object %s could not be removed: %s", task_id, key, exc)
