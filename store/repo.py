"""Functions that read and write the models. Each takes a ``Session`` and never commits:
the caller owns the transaction (``store.db.session_scope``).

Tenant-scoped functions take ``tenant_id=`` as a keyword and answer ``None`` for
another tenant's ids exactly as for unknown ones. Job-side functions (``claim_run``,
``record_progress``, ``publish_version``, ``fail_run``, ``mark_cancelled``, ...) are
keyed by ``(task_id, attempt)``: the worker receives only ids, and a stale attempt
(the task was retrained or cancelled since) makes them no-ops.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.db import utcnow
from store.models import (
    ACTIVE_STATUSES,
    CANCELLED,
    FAILED,
    QUEUED,
    READY,
    RUNNING,
    ApiKey,
    Dataset,
    PromptVersion,
    Task,
    Tenant,
)


class StoreError(Exception):
    """Base of the store's own errors; the message is safe to show to the caller."""


class TenantExists(StoreError):
    """A tenant with that name already exists (API: 409)."""


class TaskStateError(StoreError):
    """The task's state does not allow the operation, e.g. retrain while a run is active (API: 409)."""


class InvalidReference(StoreError):
    """A referenced row (dataset) is unknown or belongs to another tenant (API: 404/422)."""


# --------------------------------------------------------------------------- tenants and keys

API_KEY_PREFIX = "ps"
_KEY_RE = re.compile(r"^ps_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")
#: Compared against when the prefix is unknown, so a miss costs the same as a wrong secret.
_DUMMY_HASH = hashlib.sha256(b"promptstore-no-such-key").hexdigest()


def hash_api_key(key: str) -> str:
    """sha256 hex of the full key (what is stored)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _new_api_key() -> tuple[str, str]:
    prefix = secrets.token_hex(6)
    return prefix, f"{API_KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"


def create_tenant(s: Session, name: str) -> tuple[Tenant, str]:
    """Create a tenant and its first API key; returns ``(tenant, api_key)``. The key is only
    returned here; only its sha256 is stored. Raises ``TenantExists`` for a taken name."""
    name = name.strip()
    if not name:
        raise StoreError("tenant name must not be empty")
    if s.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise TenantExists(f"a tenant named {name!r} already exists")
    tenant = Tenant(name=name)
    s.add(tenant)
    try:
        s.flush()
    except IntegrityError as exc:  # a concurrent create won the race
        s.rollback()
        raise TenantExists(f"a tenant named {name!r} already exists") from exc
    return tenant, create_api_key(s, tenant_id=tenant.id)


def create_api_key(s: Session, *, tenant_id: str) -> str:
    """Add another API key ``ps_<prefix>_<secret>`` for the tenant; returns the key."""
    prefix, key = _new_api_key()
    s.add(ApiKey(tenant_id=tenant_id, prefix=prefix, hash=hash_api_key(key)))
    s.flush()
    return key


def revoke_api_key(s: Session, prefix: str, *, tenant_id: str) -> bool:
    """Revoke the tenant's key with that prefix; False if there is none."""
    result = s.execute(
        update(ApiKey)
        .where(ApiKey.prefix == prefix, ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount > 0


@dataclasses.dataclass(frozen=True)
class KeyOwner:
    """The tenant an API key belongs to (what authentication needs, nothing more)."""

    id: str
    name: str


def tenant_by_api_key(s: Session, key: str | None) -> KeyOwner | None:
    """The tenant owning ``key`` (not revoked), else None. Looks the key up by its prefix and
    compares sha256 digests with ``hmac.compare_digest``; malformed and unknown keys cost a
    comparison too. Runs on every tenant request, so it reads three columns, not two rows."""
    match = _KEY_RE.match(key or "")
    given = hash_api_key(key or "")
    if match is None:
        hmac.compare_digest(given, _DUMMY_HASH)
        return None
    row = s.execute(
        select(ApiKey.hash, Tenant.id, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.prefix == match.group(1), ApiKey.revoked_at.is_(None))
    ).first()
    stored = row[0] if row is not None else _DUMMY_HASH
    ok = hmac.compare_digest(given, stored)
    return KeyOwner(id=row[1], name=row[2]) if (ok and row is not None) else None


def get_tenant(s: Session, tenant_id: str) -> Tenant | None:
    return s.get(Tenant, tenant_id)


@dataclasses.dataclass(frozen=True)
class TenantSummary:
    id: str
    name: str
    created_at: dt.datetime
    task_count: int
    request_count: int
    last_request_at: dt.datetime | None


def list_tenants(s: Session) -> list[TenantSummary]:
    """All tenants (admin), oldest first, with their task and request counts."""
    counts = (
        select(Task.tenant_id, func.count(Task.id).label("n")).group_by(Task.tenant_id).subquery()
    )
    rows = s.execute(
        select(Tenant, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.tenant_id == Tenant.id)
        .order_by(Tenant.created_at, Tenant.name)
    ).all()
    return [
        TenantSummary(
            id=t.id,
            name=t.name,
            created_at=t.created_at,
            task_count=int(n),
            request_count=int(t.request_count or 0),
            last_request_at=t.last_request_at,
        )
        for t, n in rows
    ]


def count_request(s: Session, *, tenant_id: str, n: int = 1) -> None:
    """Add ``n`` to the tenant's request counter (one UPDATE, no read)."""
    s.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(request_count=Tenant.request_count + n, last_request_at=utcnow())
    )


# --------------------------------------------------------------------------- datasets


def create_dataset(
    s: Session,
    *,
    tenant_id: str,
    object_key: str,
    sha256: str,
    size: int,
    classes: Sequence[str],
    counts: dict[str, int],
    warnings: Sequence[str] = (),
) -> Dataset:
    """Record an uploaded dataset whose object is already stored. Create it in the same
    transaction as the task (or retrain) that uses it: ``delete_task`` collects the tenant's
    datasets that no task references."""
    ds = Dataset(
        tenant_id=tenant_id,
        object_key=object_key,
        sha256=sha256,
        size=size,
        classes=list(classes),
        counts=dict(counts),
        warnings=list(warnings),
    )
    s.add(ds)
    s.flush()
    return ds


def get_dataset(s: Session, dataset_id: str, *, tenant_id: str) -> Dataset | None:
    return s.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


# --------------------------------------------------------------------------- tasks (tenant side)


def create_task(
    s: Session,
    *,
    tenant_id: str,
    name: str,
    method: str,
    config: dict[str, Any] | None,
    classes: Sequence[str],
    dataset_id: str | None = None,
) -> Task:
    """A new task in status ``queued`` with ``attempt == 1``. ``dataset_id`` must be the
    tenant's (``InvalidReference`` otherwise); None for zeroshot. Enqueue the job for
    ``(task.id, task.attempt)`` after the commit."""
    if dataset_id is not None and get_dataset(s, dataset_id, tenant_id=tenant_id) is None:
        raise InvalidReference(f"unknown dataset {dataset_id!r}")
    task = Task(
        tenant_id=tenant_id,
        name=name,
        method=method,
        config=dict(config or {}),
        classes=list(classes),
        dataset_id=dataset_id,
        status=QUEUED,
        progress=0.0,
        attempt=1,
        cancel_requested=False,
    )
    s.add(task)
    s.flush()
    return task


def get_task(s: Session, task_id: str, *, tenant_id: str) -> Task | None:
    """The tenant's task, or None (unknown and foreign ids alike)."""
    return s.scalar(select(Task).where(Task.id == task_id, Task.tenant_id == tenant_id))


def list_tasks(s: Session, *, tenant_id: str) -> list[Task]:
    """The tenant's tasks, newest first."""
    return list(
        s.scalars(
            select(Task).where(Task.tenant_id == tenant_id).order_by(Task.created_at.desc(), Task.id)
        )
    )


def _locked_task(s: Session, task_id: str, *, tenant_id: str | None = None) -> Task | None:
    stmt = select(Task).where(Task.id == task_id)
    if tenant_id is not None:
        stmt = stmt.where(Task.tenant_id == tenant_id)
    # FOR UPDATE serialises job-side writers on Postgres (ignored by SQLite, which
    # serialises writes itself); populate_existing refreshes a copy already in the session.
    return s.scalar(stmt.with_for_update().execution_options(populate_existing=True))


def request_retrain(
    s: Session,
    task_id: str,
    *,
    tenant_id: str,
    dataset_id: str | None = None,
    config: dict[str, Any] | None = None,
) -> Task | None:
    """Start a new run (also the way to retry a failed/cancelled task). Omitted dataset/config
    are kept. ``attempt`` += 1; enqueue ``(task.id, task.attempt)`` after the commit.

    - a task serving a version stays ``ready`` (it keeps classifying with that version) and
      ``training`` becomes ``{"status": "queued", "progress": 0.0, "error": None}``;
    - a failed/cancelled task without a version goes back to ``queued``.

    Raises ``TaskStateError`` while a run is queued or running. None if unknown/foreign.
    """
    task = _locked_task(s, task_id, tenant_id=tenant_id)
    if task is None:
        return None
    ds = None
    if dataset_id is not None:
        ds = get_dataset(s, dataset_id, tenant_id=tenant_id)
        if ds is None:
            raise InvalidReference(f"unknown dataset {dataset_id!r}")
    if task.run_status in ACTIVE_STATUSES:
        raise TaskStateError(
            f"task {task_id} already has a {task.run_status} run; cancel it or wait until it finishes"
        )
    new_classes: list[str] | None = None
    if ds is not None:
        task.dataset_id = ds.id
        new_classes = list(ds.classes)
    if config is not None:
        task.config = dict(config)
    task.attempt += 1
    task.cancel_requested = False
    if task.version is not None:
        task.training = {"status": QUEUED, "progress": 0.0, "error": None}
    else:
        task.status = QUEUED
        task.progress = 0.0
        task.error = None
        task.metrics = None
        task.history = None
        task.confusion = None
        task.training = None
        if new_classes is not None:
            task.classes = new_classes
    task.updated_at = utcnow()
    s.flush()
    return task


def request_cancel(s: Session, task_id: str, *, tenant_id: str) -> Task | None:
    """Cancel the task's current run: a queued run is cancelled at once; a running one gets
    ``cancel_requested`` and the job sets ``cancelled`` when it sees it. None if
    unknown/foreign. Raises ``TaskStateError`` (naming the state) when no run is queued or
    running: there is nothing to cancel."""
    task = _locked_task(s, task_id, tenant_id=tenant_id)
    if task is None:
        return None
    state = task.run_status
    if state == QUEUED:
        _finish_run(task, CANCELLED, error=None)
    elif state == RUNNING:
        task.cancel_requested = True
        task.updated_at = utcnow()
    else:
        what = f"status {task.status}" if state is None or state == task.status else f"its last run is {state}"
        raise TaskStateError(f"task {task_id} has no queued or running run to cancel ({what})")
    s.flush()
    return task


def delete_task(s: Session, task_id: str, *, tenant_id: str) -> list[str] | None:
    """Delete the task, its prompt versions and the tenant's datasets no task uses any more.
    Returns the object keys to delete *after* the commit (keys still referenced by another
    row are not returned); None if unknown/foreign. A running job finds the task gone and stops."""
    task = _locked_task(s, task_id, tenant_id=tenant_id)
    if task is None:
        return None
    keys = list(s.scalars(select(PromptVersion.object_key).where(PromptVersion.task_id == task.id)))
    s.execute(delete(PromptVersion).where(PromptVersion.task_id == task.id))
    s.delete(task)
    s.flush()
    used = select(Task.dataset_id).where(Task.tenant_id == tenant_id, Task.dataset_id.is_not(None))
    orphans = list(
        s.scalars(select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.id.not_in(used)))
    )
    for ds in orphans:
        s.delete(ds)
    s.flush()
    for key in {ds.object_key for ds in orphans}:
        if s.scalar(select(func.count()).select_from(Dataset).where(Dataset.object_key == key)) == 0:
            keys.append(key)
    return keys


def get_served_version(s: Session, task_id: str, *, tenant_id: str) -> PromptVersion | None:
    """The prompt version the task serves now (``task.version``), or None before the first."""
    return s.scalar(
        select(PromptVersion)
        .join(Task, Task.id == PromptVersion.task_id)
        .where(
            Task.id == task_id,
            Task.tenant_id == tenant_id,
            PromptVersion.tenant_id == tenant_id,
            PromptVersion.version == Task.version,
        )
    )


@dataclasses.dataclass(frozen=True)
class ServingInfo:
    """What classify reads of a task: its state and the served version's object, if any."""

    status: str
    error: str | None
    method: str
    classes: list[Any]
    version: int | None
    object_key: str | None
    fingerprint: str | None


def serving_info(s: Session, task_id: str, *, tenant_id: str) -> ServingInfo | None:
    """The tenant's task and its served version in one query of only the columns classify
    needs (the hot path: no JSON history or confusion matrix is loaded). None: no such task."""
    row = s.execute(
        select(
            Task.status, Task.error, Task.method, Task.classes,
            PromptVersion.version, PromptVersion.object_key, PromptVersion.fingerprint,
        )
        .outerjoin(
            PromptVersion,
            (PromptVersion.task_id == Task.id)
            & (PromptVersion.version == Task.version)
            & (PromptVersion.tenant_id == tenant_id),
        )
        .where(Task.id == task_id, Task.tenant_id == tenant_id)
    ).first()  # fmt: skip
    return None if row is None else ServingInfo(*row)


def list_versions(s: Session, task_id: str, *, tenant_id: str) -> list[PromptVersion]:
    """All published versions of the tenant's task, oldest first."""
    return list(
        s.scalars(
            select(PromptVersion)
            .where(PromptVersion.task_id == task_id, PromptVersion.tenant_id == tenant_id)
            .order_by(PromptVersion.version)
        )
    )


def task_status_counts(s: Session) -> dict[str, int]:
    """Number of tasks per status over all tenants (metrics, dashboard)."""
    return {status: int(n) for status, n in s.execute(select(Task.status, func.count()).group_by(Task.status))}


# --------------------------------------------------------------------------- job side


def _finish_run(task: Task, state: str, *, error: str | None) -> None:
    """Set the current run's final state in the right place (``status`` or ``training``)."""
    task.cancel_requested = False
    task.updated_at = utcnow()
    if task.version is not None:
        progress = float((task.training or {}).get("progress", 0.0))
        task.training = {"status": state, "progress": progress, "error": error}
    else:
        task.status = state
        task.error = error


def get_task_for_job(s: Session, task_id: str) -> Task | None:
    """The task by id alone, for the worker (which receives only ids). Not for HTTP paths."""
    return s.get(Task, task_id)


def claim_run(s: Session, task_id: str, attempt: int) -> Task | None:
    """Mark run ``attempt`` of the task running and return the task, or None when there is
    nothing to do: task deleted, ``attempt`` stale (retrained since), or the run already
    finished (ready/failed/cancelled). A re-delivered running attempt is claimed again
    (the worker that had it died)."""
    task = _locked_task(s, task_id)
    if task is None or task.attempt != attempt or task.run_status not in ACTIVE_STATUSES:
        return None
    if task.version is not None:
        training = {"progress": 0.0, **(task.training or {})}
        task.training = {**training, "status": RUNNING, "error": None}
    else:
        task.status = RUNNING
        task.error = None
    task.updated_at = utcnow()
    s.flush()
    return task


def _current_running(s: Session, task_id: str, attempt: int) -> Task | None:
    task = _locked_task(s, task_id)
    if task is None or task.attempt != attempt or task.run_status != RUNNING:
        return None
    return task


def record_progress(
    s: Session,
    task_id: str,
    attempt: int,
    *,
    progress: float,
    history: list[dict[str, Any]] | None = None,
) -> bool:
    """Store the running run's progress (clamped to [0, 1], never lowered) and, if given, its
    per-epoch history. Returns True if the job should go on, False if it should stop: cancel
    requested, attempt stale, task deleted or run no longer running."""
    task = _current_running(s, task_id, attempt)
    if task is None:
        return False
    p = min(1.0, max(0.0, float(progress)))
    if task.version is not None:
        training = dict(task.training or {})
        training["progress"] = max(p, float(training.get("progress", 0.0)))
        if history is not None:
            training["history"] = list(history)
        task.training = training
    else:
        task.progress = max(p, task.progress)
        if history is not None:
            task.history = list(history)
    task.updated_at = utcnow()
    s.flush()
    return not task.cancel_requested


def should_stop(s: Session, task_id: str, attempt: int) -> bool:
    """True when run ``attempt`` must stop: cancel requested, stale, deleted or not running."""
    task = s.execute(
        select(Task.attempt, Task.cancel_requested, Task.status, Task.version, Task.training).where(
            Task.id == task_id
        )
    ).first()
    if task is None or task.attempt != attempt or task.cancel_requested:
        return True
    state = (task.training or {}).get("status") if task.version is not None else task.status
    return state != RUNNING


def publish_version(
    s: Session,
    task_id: str,
    attempt: int,
    *,
    object_key: str,
    sha256: str,
    size: int,
    fingerprint: str,
    classes: Sequence[str],
    metrics: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    confusion: list[list[int]] | None = None,
) -> PromptVersion | None:
    """Publish the run's prompt whose object is already stored: insert ``PromptVersion``
    ``task.version + 1`` and switch the task to it (status ready, progress 1, metrics,
    confusion, history, classes; ``training`` shows ready for a retrain). Make it the only
    write of its transaction and commit right after.

    Returns None, changing nothing, when the run is not current (stale attempt, deleted task,
    already published/failed/cancelled). A concurrent duplicate that slips past the row lock
    hits unique(task_id, version): the session is rolled back and None returned.
    """
    task = _current_running(s, task_id, attempt)
    if task is None:
        return None
    version = (task.version or 0) + 1
    pv = PromptVersion(
        task_id=task.id,
        tenant_id=task.tenant_id,
        version=version,
        object_key=object_key,
        sha256=sha256,
        size=size,
        fingerprint=fingerprint,
    )
    s.add(pv)
    retrain = task.version is not None
    task.version = version
    task.status = READY
    task.progress = 1.0
    task.error = None
    task.metrics = dict(metrics)
    task.history = list(history) if history is not None else None
    task.confusion = [list(r) for r in confusion] if confusion is not None else None
    task.classes = list(classes)
    task.training = {"status": READY, "progress": 1.0, "error": None} if retrain else None
    task.cancel_requested = False
    task.updated_at = utcnow()
    try:
        s.flush()
    except IntegrityError:
        s.rollback()
        return None
    return pv


def fail_run(s: Session, task_id: str, attempt: int, *, error: str) -> bool:
    """Mark run ``attempt`` failed with a human-readable ``error`` (``status`` failed, or
    ``training.status`` failed when a version is served and keeps serving). False (no-op)
    when the run is not current or already finished."""
    task = _locked_task(s, task_id)
    if task is None or task.attempt != attempt or task.run_status not in ACTIVE_STATUSES:
        return False
    _finish_run(task, FAILED, error=error)
    s.flush()
    return True


def mark_cancelled(s: Session, task_id: str, attempt: int) -> bool:
    """The job saw the cancel request and stopped: set ``cancelled``. False (no-op) when the
    run is not current or already finished."""
    task = _locked_task(s, task_id)
    if task is None or task.attempt != attempt or task.run_status not in ACTIVE_STATUSES:
        return False
    _finish_run(task, CANCELLED, error=None)
    s.flush()
    return True


def pending_runs(s: Session) -> list[tuple[str, int]]:
    """``(task_id, attempt)`` of every queued or running run, oldest first: what an in-process
    runner resubmits at start (a claim of a finished or stale run is a no-op anyway)."""
    rows = s.execute(
        select(Task.id, Task.attempt, Task.status, Task.version, Task.training)
        .where(Task.status.in_(ACTIVE_STATUSES) | Task.training.is_not(None))
        .order_by(Task.created_at)
    ).all()
    out = []
    for r in rows:
        state = (r.training or {}).get("status") if r.version is not None else r.status
        if state in ACTIVE_STATUSES:
            out.append((r.id, r.attempt))
    return out
