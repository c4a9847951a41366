"""Functions that read and write the models. Each takes a ``Session`` and never commits:
the caller owns the transaction (``store.db.session_scope``).

Tenant-scoped functions take ``tenant_id=`` as a keyword and answer ``None`` for
another tenant's ids exactly as for unknown ones. Job-side functions (``claim_run``,
``record_progress``, ``publish_version``, ``fail_run``, ``mark_cancelled``, ...) are
keyed by ``(task_id, attempt)``: the worker receives only ids, and a stale attempt
(the task was retrained or cancelled since) makes them no-ops.

Concurrency (docs/operations.md, "Concurrent changes to one task"): every state transition
of a task (create run, retrain, cancel, claim, progress, publish, fail, delete, re-queue) is
ONE conditional write, ``UPDATE tasks SET ... WHERE id = :id AND attempt = :seen AND
run_status = :seen_state ...``, whose row count decides who won; ``attempt`` is incremented
in SQL. No ``SELECT ... FOR UPDATE`` is needed: Postgres re-evaluates the WHERE clause on the
latest committed row after waiting for a concurrent writer, and SQLite runs one writer at a
time (pysqlite opens the transaction at the first write, so the condition is checked against
the latest commit). A read beforehand only decides which values to write; the write then
holds only if the row is still as read. The loser gets ``TaskStateError`` (HTTP 409) on the
tenant side and ``None``/``False`` (do nothing) on the job side.

Leases: a job execution claims a run as ``owner`` with a lease (``lease_expires_at``) that
it renews while it runs (``renew_lease``, every progress write). A claim of a running attempt
whose lease is live and held by another owner is refused, so a re-delivered message never
runs an attempt twice at once; once the lease expired another owner may take the run over,
and the first execution's writes (``owner=`` given) then find the owner changed and do nothing.
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
from sqlalchemy.orm import Session, selectinload

from store.db import utcnow
from store.events import MAX_EPOCH_EVENTS, add_event
from store.models import (
    ACTIVE_STATUSES,
    CANCELLED,
    FAILED,
    QUEUED,
    READY,
    RUNNING,
    ApiKey,
    Dataset,
    Prediction,
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
    from store.textinput import InputError, check_name

    try:  # the name rules of docs/inputs.md "Text and JSON" (API, dashboard and CLI alike)
        name = check_name("tenant name", name)
    except InputError as exc:
        raise StoreError(exc.message) from None
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


def list_tenants(s: Session, *, name_prefix: str | None = None) -> list[TenantSummary]:
    """All tenants (admin) whose name starts with ``name_prefix`` (all without), oldest first:
    (created_at, id), the order of the API's pages (``store.listing.tenant_page``), with their
    task and request counts."""
    from store.listing import tenant_filters

    counts = (
        select(Task.tenant_id, func.count(Task.id).label("n")).group_by(Task.tenant_id).subquery()
    )
    rows = s.execute(
        select(Tenant, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.tenant_id == Tenant.id)
        .where(*tenant_filters(name_prefix=name_prefix))
        .order_by(Tenant.created_at, Tenant.id)
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
    zero_shot_until_trained: bool = False,
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
        run_status=QUEUED,
        queued_at=utcnow(),
        progress=0.0,
        attempt=1,
        cancel_requested=False,
        requeues=0,
        zero_shot_until_trained=bool(zero_shot_until_trained),
    )
    s.add(task)
    s.flush()
    add_event(s, task_id=task.id, tenant_id=tenant_id, kind="created", method=method, classes=len(task.classes))
    add_event(s, task_id=task.id, tenant_id=tenant_id, kind="queued", attempt=1, retrain=False)
    return task


def get_task(s: Session, task_id: str, *, tenant_id: str) -> Task | None:
    """The tenant's task, or None (unknown and foreign ids alike)."""
    return s.scalar(select(Task).where(Task.id == task_id, Task.tenant_id == tenant_id))


def list_tasks(
    s: Session,
    *,
    tenant_id: str,
    status: str | Sequence[str] | None = None,
    method: str | None = None,
    name_prefix: str | None = None,
) -> list[Task]:
    """All the tenant's tasks matching the filters (``store.listing.task_filters``; a bad one
    raises ``listing.InvalidListing``), newest first: (created_at, id) descending, the order of
    the API's pages (``store.listing.task_page``, which reads one page of slim rows)."""
    from store.listing import task_filters

    return list(
        s.scalars(
            select(Task)
            .where(*task_filters(tenant_id, status=status, method=method, name_prefix=name_prefix))
            .order_by(Task.created_at.desc(), Task.id.desc())
            .options(selectinload(Task.served_version))  # the served configs in one more query
        )
    )


#: Default lease of a claimed run when the caller gives none (the job passes
#: ``settings.run_lease_s``).
DEFAULT_LEASE_S = 30.0


def _read_task(s: Session, task_id: str, *, tenant_id: str | None = None) -> Task | None:
    """The task as committed now (refreshing a copy already in the session). A plain read:
    the conditional write that follows decides, not a row lock."""
    stmt = select(Task).where(Task.id == task_id)
    if tenant_id is not None:
        stmt = stmt.where(Task.tenant_id == tenant_id)
    return s.scalar(stmt.execution_options(populate_existing=True))


def _same_version(version: int | None) -> Any:
    """The task is still in the shape it was read in: no version served (the run's state in
    ``status``) or one served (in ``training``). Which version is served may change meanwhile
    (``serve_version``) without touching the run, so a rollback never stops a retrain."""
    return Task.version.is_(None) if version is None else Task.version.is_not(None)


def _cas(s: Session, task_id: str, *conditions: Any, values: dict[str, Any]) -> bool:
    """``UPDATE tasks SET values WHERE id = task_id AND conditions``: True when exactly this
    row was changed (the caller won), False when the row is gone or no longer as read."""
    result = s.execute(
        update(Task)
        .where(Task.id == task_id, *conditions)
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _inactive() -> Any:
    return Task.run_status.is_(None) | Task.run_status.not_in(ACTIVE_STATUSES)


def _lease_cleared() -> dict[str, Any]:
    return {"lease_owner": None, "lease_expires_at": None}


def _finish_values(task: Task, state: str, *, error: str | None) -> dict[str, Any]:
    """The values that end the current run of ``task`` (as read) in ``state``: ``status``
    before the first version, ``training`` once one is served; the lease is released."""
    values: dict[str, Any] = {"run_status": state, "cancel_requested": False, **_lease_cleared()}
    if task.version is not None:
        progress = float((task.training or {}).get("progress", 0.0))
        values["training"] = {"status": state, "progress": progress, "error": error}
    else:
        values["status"] = state
        values["error"] = error
    return values


def _refused(task_id: str, task: Task | None, doing: str) -> TaskStateError:
    """The loser's error: names the state the winner left the task in."""
    if task is None:
        return TaskStateError(f"task {task_id} was deleted meanwhile")
    if task.run_status in ACTIVE_STATUSES:
        return TaskStateError(
            f"task {task_id} already has a {task.run_status} run; cancel it or wait until it finishes"
        )
    return TaskStateError(
        f"task {task_id} changed while {doing} (a concurrent request or its run finished; status "
        f"{task.status}); read it and try again"
    )


def request_retrain(
    s: Session,
    task_id: str,
    *,
    tenant_id: str,
    dataset_id: str | None = None,
    config: dict[str, Any] | None = None,
    samples_at_least: int | None = None,
) -> Task | None:
    """Start a new run (also the way to retry a failed/cancelled task). Omitted dataset/config
    are kept. ``attempt`` += 1 (in SQL); enqueue ``(task.id, task.attempt)`` after the commit.
    A new dataset replaces the task's sample set (``store.samples``): its rows go in the same
    transaction and the run expands the new zip. ``samples_at_least``: the automatic retrain
    (``store.samples.request_auto_retrain``), which holds only while ``samples_since_run`` is
    still at least that.

    - a task serving a version stays ``ready`` (it keeps classifying with that version) and
      ``training`` becomes ``{"status": "queued", "progress": 0.0, "error": None}``;
    - a failed/cancelled task without a version goes back to ``queued``.

    One conditional UPDATE (attempt and run state as read): of concurrent retrains exactly one
    wins and its config/dataset are the ones the run uses; the others, and a retrain while a run
    is queued or running, raise ``TaskStateError``. None if unknown/foreign.
    """
    task = _read_task(s, task_id, tenant_id=tenant_id)
    if task is None:
        return None
    ds = None
    if dataset_id is not None:
        ds = get_dataset(s, dataset_id, tenant_id=tenant_id)
        if ds is None:
            raise InvalidReference(f"unknown dataset {dataset_id!r}")
    if task.run_status in ACTIVE_STATUSES:
        raise _refused(task_id, task, "retraining")
    values: dict[str, Any] = {
        "attempt": Task.attempt + 1,
        "cancel_requested": False,
        "run_status": QUEUED,
        "queued_at": utcnow(),
        "requeues": 0,
        **_lease_cleared(),
    }
    if ds is not None:
        values["dataset_id"] = ds.id
        values.update(samples_seeded=False, samples_since_run=0)  # the new zip replaces the samples
    if config is not None:
        values["config"] = dict(config)
    if task.version is not None:
        values["training"] = {"status": QUEUED, "progress": 0.0, "error": None}
    else:
        values.update(status=QUEUED, progress=0.0, error=None, metrics=None, history=None, confusion=None, training=None)
        if ds is not None:
            values["classes"] = list(ds.classes)
    auto = (Task.samples_since_run >= samples_at_least,) if samples_at_least is not None else ()
    won = _cas(
        s, task.id, Task.tenant_id == tenant_id, Task.attempt == task.attempt, _same_version(task.version),
        _inactive(), *auto, values=values,
    )
    if not won:
        raise _refused(task_id, _read_task(s, task_id, tenant_id=tenant_id), "retraining")
    if ds is not None:
        from store.models import Sample

        s.execute(delete(Sample).where(Sample.task_id == task.id).execution_options(synchronize_session=False))
    extra = {"auto": True} if samples_at_least is not None else {}
    add_event(s, task_id=task.id, tenant_id=tenant_id, kind="queued", attempt=task.attempt + 1,
              retrain=task.version is not None, **extra)
    return _read_task(s, task_id, tenant_id=tenant_id)


def request_cancel(s: Session, task_id: str, *, tenant_id: str) -> Task | None:
    """Cancel the task's current run: a queued run is cancelled at once; a running one gets
    ``cancel_requested`` and the job sets ``cancelled`` when it sees it. None if
    unknown/foreign. Raises ``TaskStateError`` (naming the state) when no run is queued or
    running, or a cancel of the running run is already requested: there is nothing to cancel
    (also when the run finished or was published while this request ran: a cancel and a
    publish never both win; of concurrent cancels one wins). A queued run claimed meanwhile is
    cancelled as a running one."""
    for _ in range(3):  # queued -> running (a claim) between the read and the write: try again
        task = _read_task(s, task_id, tenant_id=tenant_id)
        if task is None:
            return None
        state = task.run_status
        same = (Task.tenant_id == tenant_id, Task.attempt == task.attempt, _same_version(task.version))
        if state == QUEUED:
            won = _cas(s, task.id, *same, Task.run_status == QUEUED, values=_finish_values(task, CANCELLED, error=None))
        elif state == RUNNING:
            if task.cancel_requested:
                raise TaskStateError(f"task {task_id}: a cancel of its running run is already requested")
            won = _cas(
                s, task.id, *same, Task.run_status == RUNNING, Task.cancel_requested.is_(False),
                values={"cancel_requested": True},
            )
        else:
            what = f"status {task.status}" if state is None or state == task.status else f"its last run is {state}"
            raise TaskStateError(f"task {task_id} has no queued or running run to cancel ({what})")
        if won:
            add_event(s, task_id=task.id, tenant_id=tenant_id, kind="cancelled" if state == QUEUED else "cancel_requested",
                      attempt=task.attempt)
            return _read_task(s, task_id, tenant_id=tenant_id)
    raise _refused(task_id, _read_task(s, task_id, tenant_id=tenant_id), "cancelling")


def delete_task(s: Session, task_id: str, *, tenant_id: str) -> list[str] | None:
    """Delete the task, its prompt versions (its events, evaluations, samples and predictions
    go by ON DELETE CASCADE) and the tenant's datasets no task uses any more. Returns the
    object keys to delete *after* the commit: the task's prompts and kept classify images (no
    other row can refer to ``prompts/{tenant}/{task}/...`` or ``predictions/{tenant}/{task}/...``);
    None if unknown/foreign. Dataset zips and sample images are shared by content and are never
    returned, nor are evaluation zips: the garbage collector (``store.consistency``) deletes them
    once no row refers to them. A running job finds the task gone and stops."""
    task = _read_task(s, task_id, tenant_id=tenant_id)
    if task is None:
        return None
    # A conditional write first: it takes the row's write lock (both databases) before the
    # versions are read, so a publish racing with the delete either committed before (its
    # version's key is collected) or finds no row; of concurrent deletes one wins (others: None).
    locked = s.execute(
        update(Task)
        .where(Task.id == task.id, Task.tenant_id == tenant_id)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    if locked.rowcount != 1:
        return None
    keys = list(s.scalars(select(PromptVersion.object_key).where(PromptVersion.task_id == task.id)))
    # the task's kept classify images (unique per prediction): gone with it, not after a grace
    keys += list(s.scalars(
        select(Prediction.object_key).where(Prediction.task_id == task.id, Prediction.object_key.is_not(None))
    ))
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
    #: Grows whenever the served prompt changes (``Task.serving_generation``).
    generation: int = 0
    #: The task's default threshold (``Task.min_score``).
    min_score: float | None = None
    #: The served version's method (a task's may differ per version); None: the task's.
    version_method: str | None = None
    #: Serve zero-shot predictions while no version is (``Task.zero_shot_until_trained``).
    zero_shot: bool = False


def serving_info(s: Session, task_id: str, *, tenant_id: str) -> ServingInfo | None:
    """The tenant's task and its served version in one query of only the columns classify
    needs (the hot path: no JSON history or confusion matrix is loaded). None: no such task."""
    row = s.execute(
        select(
            Task.status, Task.error, Task.method, Task.classes,
            PromptVersion.version, PromptVersion.object_key, PromptVersion.fingerprint,
            Task.serving_generation, Task.min_score, PromptVersion.method, Task.zero_shot_until_trained,
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


def get_version(s: Session, task_id: str, version: int, *, tenant_id: str) -> PromptVersion | None:
    """Version ``version`` of the tenant's task, or None (unknown task, foreign, or no such
    version, e.g. pruned)."""
    return s.scalar(
        select(PromptVersion).where(
            PromptVersion.task_id == task_id, PromptVersion.tenant_id == tenant_id, PromptVersion.version == version
        )
    )


def serving_generation(s: Session, task_id: str) -> int | None:
    """The task's serving generation now (job side: by id alone); None if it is gone."""
    return s.scalar(select(Task.serving_generation).where(Task.id == task_id))


def next_version_number(s: Session, task_id: str) -> int:
    """The number the task's next published version gets: one more than any it ever had
    (versions only grow, also after a rollback; pruned numbers are never reused because the
    served and the newest versions are never pruned)."""
    return int(s.scalar(select(func.max(PromptVersion.version)).where(PromptVersion.task_id == task_id)) or 0) + 1


def no_such_version(task_id: str, version: int, kept: Sequence[int]) -> str:
    """The message for a version the task does not have, naming the ones it keeps (API: 404)."""
    have = ", ".join(map(str, kept)) if kept else "none yet"
    return f"task {task_id} has no version {version} (versions kept: {have})"


class VersionNotFound(StoreError):
    """The task has no such version (never published, or pruned) (API: 404)."""


class VersionIncompatible(StoreError):
    """The version cannot be served here, e.g. made on another backbone (API: 409)."""


def serve_version(
    s: Session, task_id: str, version: int, *, tenant_id: str, fingerprint: str,
    classes: Sequence[str] | None = None,
) -> Task | None:
    """Make ``version`` the task's served prompt (a rollback or a roll-forward), effective for
    every request that reads the task after the commit: ``version`` and the task's record
    (classes, metrics, confusion, history) switch to the version's, and ``serving_generation``
    grows by one so the engines never answer again with the prompt served before. A retrain in
    progress is not touched: when it publishes, its version is served.

    ``fingerprint``: the serving backbone's; a version made on another one raises
    ``VersionIncompatible``. ``classes``: the version's classes when its row predates their
    record (read from the prompt's header by the caller). Serving the version already served
    changes nothing. None: unknown or foreign task; ``VersionNotFound``: no such version;
    ``TaskStateError``: the served version changed while this ran (try again)."""
    task = _read_task(s, task_id, tenant_id=tenant_id)
    if task is None:
        return None
    pv = get_version(s, task_id, version, tenant_id=tenant_id)
    if pv is None:
        kept = [v.version for v in list_versions(s, task_id, tenant_id=tenant_id)]
        raise VersionNotFound(no_such_version(task_id, version, kept))
    if pv.fingerprint != fingerprint:
        raise VersionIncompatible(
            f"version {version} of task {task_id} was tuned on backbone {fingerprint_label(pv.fingerprint)}, "
            f"not on the one this service runs ({fingerprint_label(fingerprint)}); retrain to make a version for it"
        )
    if task.version == version:
        return task
    pv_classes = list(pv.classes) if isinstance(pv.classes, list) else (list(classes) if classes is not None else None)
    if pv_classes is None:
        raise VersionIncompatible(f"version {version} of task {task_id} does not record its classes")
    values: dict[str, Any] = {
        "version": version,
        "serving_generation": Task.serving_generation + 1,
        "classes": pv_classes,
        "metrics": dict(pv.metrics) if isinstance(pv.metrics, dict) else None,
        "confusion": pv.confusion if isinstance(pv.confusion, list) else None,
        "history": pv.history if isinstance(pv.history, list) else None,
    }
    won = _cas(
        s, task.id, Task.tenant_id == tenant_id, Task.version == task.version,
        Task.serving_generation == task.serving_generation, values=values,
    )
    if not won:
        raise TaskStateError(f"task {task_id}: its served version changed while this request ran; read it and try again")
    add_event(s, task_id=task.id, tenant_id=tenant_id, kind="served", version=version, previous=task.version)
    return _read_task(s, task_id, tenant_id=tenant_id)


def fingerprint_label(fingerprint: str | None) -> str:
    """A fingerprint as people read it: the backbone spec and the first 12 digits of its weights'
    hash (``spec#sha256``)."""
    fp = str(fingerprint or "")
    spec, _, digest = fp.rpartition("#") if "#" in fp else (fp, "", "")
    return f"{spec} (weights {digest[:12]})" if digest else fp


def prune_versions(s: Session, task_id: str, *, keep: int) -> int:
    """Delete the task's oldest version rows beyond the newest ``keep`` (``keep`` <= 0: keep
    all), never the served one; returns how many went. Their objects are left to the garbage
    collector (``store.consistency``), which deletes unreferenced prompts after its grace
    period: a request that read a pruned version a moment ago still finds its object."""
    if keep <= 0:
        return 0
    served = s.scalar(select(Task.version).where(Task.id == task_id))
    rows = list(s.execute(
        select(PromptVersion.id, PromptVersion.version)
        .where(PromptVersion.task_id == task_id)
        .order_by(PromptVersion.version.desc())
    ))
    doomed = [r.id for r in rows[keep:] if r.version != served]
    if doomed:
        s.execute(delete(PromptVersion).where(PromptVersion.id.in_(doomed)).execution_options(synchronize_session=False))
    return len(doomed)


def set_min_score(s: Session, task_id: str, min_score: float | None, *, tenant_id: str) -> Task | None:
    """Set (or clear, None) the task's default classify threshold in [0, 1]; None if unknown."""
    task = _read_task(s, task_id, tenant_id=tenant_id)
    if task is None:
        return None
    if task.min_score == min_score:  # no change, no event
        return task
    if not _cas(s, task.id, Task.tenant_id == tenant_id, values={"min_score": min_score}):
        return None
    add_event(s, task_id=task.id, tenant_id=tenant_id, kind="min_score", min_score=min_score)
    return _read_task(s, task_id, tenant_id=tenant_id)


def task_status_counts(s: Session) -> dict[str, int]:
    """Number of tasks per status over all tenants (metrics, dashboard)."""
    return {status: int(n) for status, n in s.execute(select(Task.status, func.count()).group_by(Task.status))}


# --------------------------------------------------------------------------- job side


def get_task_for_job(s: Session, task_id: str) -> Task | None:
    """The task by id alone, for the worker (which receives only ids). Not for HTTP paths."""
    return s.get(Task, task_id)


def _owned(owner: str | None) -> tuple[Any, ...]:
    """The condition of a job-side write made by execution ``owner``: it still holds the run
    (nobody took it over, the reconciler did not re-queue it). None: no lease condition (tests,
    operator tools)."""
    return () if owner is None else (Task.lease_owner == owner,)


def new_lease_owner() -> str:
    """A unique name for one job execution: ``host:pid:random``."""
    import os
    import socket

    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(6)}"


def _lease_live(task: Task, now: dt.datetime) -> bool:
    return task.lease_owner is not None and task.lease_expires_at is not None and task.lease_expires_at > now


def claim_run(
    s: Session, task_id: str, attempt: int, *, owner: str | None = None, lease_s: float = DEFAULT_LEASE_S
) -> Task | None:
    """Mark run ``attempt`` of the task running, held by ``owner`` (default: a new name, read it
    back from ``task.lease_owner``) with a lease of ``lease_s`` seconds, and return the task; or
    None when there is nothing to do: task deleted, ``attempt`` stale (retrained since), the run
    already finished (ready/failed/cancelled), or it is running under another owner's live lease
    (a duplicate delivery: never two executions of one attempt at once). A running attempt whose
    lease expired (or that has none: released by a job that stopped) is taken over; the
    previous owner's writes then change nothing. One conditional UPDATE decides."""
    owner = owner or new_lease_owner()
    task = _read_task(s, task_id)
    if task is None or task.attempt != attempt or task.run_status not in ACTIVE_STATUSES:
        return None
    now = utcnow()
    conditions: list[Any] = [Task.attempt == attempt, _same_version(task.version)]
    if task.run_status == QUEUED:
        conditions.append(Task.run_status == QUEUED)
    else:
        if _lease_live(task, now) and task.lease_owner != owner:
            return None
        # Take over only the lease as read, and only if it is still not live: an owner that
        # woke up and renewed it meanwhile keeps it.
        conditions += [
            Task.run_status == RUNNING,
            Task.lease_owner.is_(None) if task.lease_owner is None else Task.lease_owner == task.lease_owner,
        ]
        if task.lease_owner != owner:
            conditions.append(Task.lease_expires_at.is_(None) | (Task.lease_expires_at <= now))
    values: dict[str, Any] = {
        "run_status": RUNNING,
        "lease_owner": owner,
        "lease_expires_at": now + dt.timedelta(seconds=lease_s),
    }
    if task.version is not None:
        training = {"progress": 0.0, **(task.training or {})}
        values["training"] = {**training, "status": RUNNING, "error": None}
    else:
        values["status"] = RUNNING
        values["error"] = None
    if not _cas(s, task.id, *conditions, values=values):
        return None
    add_event(s, task_id=task.id, tenant_id=task.tenant_id, kind="started", attempt=attempt, worker=owner)
    return _read_task(s, task_id)


def renew_lease(s: Session, task_id: str, attempt: int, *, owner: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """The heartbeat: extend ``owner``'s lease on running run ``attempt``. False when the run is
    not ``owner``'s any more (taken over, re-queued, finished, stale, deleted): the job must stop
    without publishing."""
    result = s.execute(
        update(Task)
        .where(Task.id == task_id, Task.attempt == attempt, Task.run_status == RUNNING, Task.lease_owner == owner)
        .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def release_lease(s: Session, task_id: str, attempt: int, *, owner: str) -> bool:
    """A job that stops without finishing its run (shutdown, transient error) gives up its
    lease, so its retry (or the next start) may claim the run at once. The run stays running."""
    result = s.execute(
        update(Task)
        .where(Task.id == task_id, Task.attempt == attempt, Task.run_status == RUNNING, Task.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _current_running(s: Session, task_id: str, attempt: int, owner: str | None = None) -> Task | None:
    task = _read_task(s, task_id)
    if task is None or task.attempt != attempt or task.run_status != RUNNING:
        return None
    if owner is not None and task.lease_owner != owner:
        return None
    return task


def record_progress(
    s: Session,
    task_id: str,
    attempt: int,
    *,
    progress: float,
    history: list[dict[str, Any]] | None = None,
    owner: str | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> bool:
    """Store the running run's progress (clamped to [0, 1], never lowered) and, if given, its
    per-epoch history; with ``owner`` it also renews that owner's lease. Returns True if the
    job should go on, False if it should stop: cancel requested, attempt stale, task deleted,
    run no longer running, or (``owner`` given) the run no longer held by ``owner``."""
    task = _current_running(s, task_id, attempt, owner)
    if task is None:
        return False
    p = min(1.0, max(0.0, float(progress)))
    values: dict[str, Any] = {}
    if task.version is not None:
        training = dict(task.training or {})
        training["progress"] = max(p, float(training.get("progress", 0.0)))
        if history is not None:
            training["history"] = list(history)
        values["training"] = training
    else:
        values["progress"] = max(p, task.progress)
        if history is not None:
            values["history"] = list(history)
    if owner is not None:
        values["lease_expires_at"] = utcnow() + dt.timedelta(seconds=lease_s)
    won = _cas(
        s, task.id, Task.attempt == attempt, Task.run_status == RUNNING, _same_version(task.version),
        *_owned(owner), values=values,
    )
    if won and history:
        seen = {h.get("epoch") for h in (task.run.history or []) if isinstance(h, dict)}
        for h in history:
            epoch = h.get("epoch") if isinstance(h, dict) else None
            if epoch is not None and epoch not in seen and (len(seen) < MAX_EPOCH_EVENTS or h is history[-1]):
                seen.add(epoch)
                add_event(s, task_id=task.id, tenant_id=task.tenant_id, kind="epoch", attempt=attempt, epoch=epoch,
                          loss=h.get("loss"), val_accuracy=h.get("val_accuracy"))
    if won:
        s.expire(task)
    return won and not task.cancel_requested


def should_stop(s: Session, task_id: str, attempt: int, *, owner: str | None = None) -> bool:
    """True when run ``attempt`` must stop: cancel requested, stale, deleted, not running, or
    (``owner`` given) no longer held by ``owner``."""
    task = s.execute(
        select(Task.attempt, Task.cancel_requested, Task.run_status, Task.lease_owner).where(Task.id == task_id)
    ).first()
    if task is None or task.attempt != attempt or task.cancel_requested:
        return True
    if owner is not None and task.lease_owner != owner:
        return True
    return task.run_status != RUNNING


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
    owner: str | None = None,
    keep_versions: int = 0,
    method: str | None = None,
    samples: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> PromptVersion | None:
    """Publish the run's prompt whose object is already stored: switch the task to version
    ``next_version_number`` (status ready, progress 1, metrics, confusion, history, classes;
    ``training`` shows ready for a retrain) with one conditional UPDATE, then insert that
    ``PromptVersion``. Make it the only write of its transaction and commit right after.

    Returns None, changing nothing, when the run is not current (stale attempt, deleted task,
    already published/failed/cancelled), a cancel was requested (a cancel and a publish never
    both win), or ``owner`` given and the run is no longer held by it (taken over after its
    lease expired). A duplicate version row (unique(task_id, version)) rolls the session back
    and gives None too. ``keep_versions`` > 0: prune older versions beyond that many
    (``prune_versions``) in the same transaction. ``method``: the prompt's method when it is
    not the task's (a task of method ``auto`` publishes a prompt of the method it chose);
    ``config``: the config the prompt was trained with when not the run's (the one a search
    chose; the task's own ``config`` stays the run's request). ``samples``: the snapshot of samples the run trained on (``store.samples.Snapshot.record``:
    ``samples_sha256``, ``n_samples``, ``sample_counts``), recorded on the version.
    """
    task = _current_running(s, task_id, attempt, owner)
    if task is None or task.cancel_requested:
        return None
    version = next_version_number(s, task.id)
    retrain = task.version is not None
    values: dict[str, Any] = {
        "version": version,
        "serving_generation": Task.serving_generation + 1,
        "status": READY,
        "run_status": READY,
        "progress": 1.0,
        "error": None,
        "metrics": dict(metrics),
        "history": list(history) if history is not None else None,
        "confusion": [list(r) for r in confusion] if confusion else None,
        "classes": list(classes),
        "training": {"status": READY, "progress": 1.0, "error": None} if retrain else None,
        "cancel_requested": False,
        **_lease_cleared(),
    }
    won = _cas(
        s, task.id, Task.attempt == attempt, Task.run_status == RUNNING, Task.cancel_requested.is_(False),
        _same_version(task.version), *_owned(owner), values=values,
    )
    if not won:
        return None
    pv = PromptVersion(
        task_id=task.id,
        tenant_id=task.tenant_id,
        version=version,
        object_key=object_key,
        sha256=sha256,
        size=size,
        fingerprint=fingerprint,
        # the prompt's config: the run's own (no retrain can change it while it runs), or the one a
        # search chose (``config``)
        config=dict(config) if config is not None else dict(task.config or {}),
        dataset_id=task.dataset_id,
        method=method or task.method,  # the prompt's own (``auto`` publishes the chosen method's)
        classes=list(classes),
        metrics=dict(metrics),
        confusion=[list(r) for r in confusion] if confusion else None,
        history=list(history) if history is not None else None,
        samples_sha256=(samples or {}).get("samples_sha256"),
        n_samples=(samples or {}).get("n_samples"),
        sample_counts=dict((samples or {}).get("sample_counts") or {}) if samples else None,
    )
    s.add(pv)
    try:
        s.flush()
    except IntegrityError:
        s.rollback()
        return None
    add_event(s, task_id=task.id, tenant_id=task.tenant_id, kind="published", version=version,
              val_accuracy=metrics.get("val_accuracy"))
    prune_versions(s, task.id, keep=keep_versions)
    s.expire(task)
    return pv


def fail_run(s: Session, task_id: str, attempt: int, *, error: str, owner: str | None = None) -> bool:
    """Mark run ``attempt`` failed with a human-readable ``error`` (``status`` failed, or
    ``training.status`` failed when a version is served and keeps serving). False (no-op)
    when the run is not current, already finished, or (``owner`` given) no longer ``owner``'s."""
    task = _read_task(s, task_id)
    if task is None or task.attempt != attempt or task.run_status not in ACTIVE_STATUSES:
        return False
    won = _cas(
        s, task.id, Task.attempt == attempt, Task.run_status == task.run_status, _same_version(task.version),
        *_owned(owner), values=_finish_values(task, FAILED, error=error),
    )
    if won:
        add_event(s, task_id=task.id, tenant_id=task.tenant_id, kind="failed", attempt=attempt, reason=error)
        s.expire(task)
    return won


def mark_cancelled(s: Session, task_id: str, attempt: int, *, owner: str | None = None) -> bool:
    """The job saw the cancel request and stopped: set ``cancelled``. False (no-op) when the
    run is not current or already finished; with ``owner``, also when the run is not that
    owner's any more or no cancel was requested (it stopped for another reason)."""
    task = _read_task(s, task_id)
    if task is None or task.attempt != attempt or task.run_status not in ACTIVE_STATUSES:
        return False
    extra = (*_owned(owner), Task.cancel_requested.is_(True)) if owner is not None else ()
    won = _cas(
        s, task.id, Task.attempt == attempt, Task.run_status == task.run_status, _same_version(task.version),
        *extra, values=_finish_values(task, CANCELLED, error=None),
    )
    if won:
        add_event(s, task_id=task.id, tenant_id=task.tenant_id, kind="cancelled", attempt=attempt)
        s.expire(task)
    return won


def pending_runs(s: Session) -> list[tuple[str, int]]:
    """``(task_id, attempt)`` of every run an in-process runner starting now should submit,
    oldest first: the queued ones, and the running ones whose lease is not live (their runner
    stopped). A running run under a live lease is left to the reconciler, which re-queues it
    once the lease expired. A claim of a finished or stale run is a no-op anyway."""
    now = utcnow()
    rows = s.execute(
        select(Task.id, Task.attempt, Task.run_status, Task.lease_owner, Task.lease_expires_at)
        .where(Task.run_status.in_(ACTIVE_STATUSES))
        .order_by(Task.created_at)
    ).all()
    return [
        (r.id, r.attempt)
        for r in rows
        if r.run_status == QUEUED or r.lease_owner is None or r.lease_expires_at is None or r.lease_expires_at <= now
    ]


# --------------------------------------------------------------------------- reconciler


@dataclasses.dataclass(frozen=True)
class StuckRun:
    """A run the reconciler must act on (``worker.reconcile``)."""

    task_id: str
    attempt: int
    run_status: str
    queued_at: dt.datetime | None
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    requeues: int


def stuck_runs(s: Session, *, now: dt.datetime, requeue_queued_after_s: float, limit: int = 500) -> list[StuckRun]:
    """Runs that are queued since before ``now - requeue_queued_after_s`` (their message may
    be lost) or running without a live lease (their worker stopped): what the reconciler
    re-sends, re-queues or fails. Oldest first, at most ``limit``."""
    cutoff = now - dt.timedelta(seconds=requeue_queued_after_s)
    queued = (Task.run_status == QUEUED) & (Task.queued_at.is_(None) | (Task.queued_at <= cutoff))
    running = (Task.run_status == RUNNING) & (
        Task.lease_owner.is_(None) | Task.lease_expires_at.is_(None) | (Task.lease_expires_at <= now)
    )
    rows = s.execute(
        select(
            Task.id, Task.attempt, Task.run_status, Task.queued_at, Task.lease_owner, Task.lease_expires_at,
            Task.requeues,
        )
        .where(queued | running)
        .order_by(Task.created_at)
        .limit(limit)
    ).all()  # fmt: skip
    return [StuckRun(r.id, r.attempt, r.run_status, r.queued_at, r.lease_owner, r.lease_expires_at, int(r.requeues or 0)) for r in rows]


def mark_resent(s: Session, run: StuckRun, *, now: dt.datetime) -> bool:
    """Record that queued run ``run`` is sent again now (``queued_at``), if it is still as the
    reconciler read it: of several reconcilers (workers, API replicas) exactly one re-sends."""
    same_queued = Task.queued_at.is_(None) if run.queued_at is None else Task.queued_at == run.queued_at
    return _cas(
        s, run.task_id, Task.attempt == run.attempt, Task.run_status == QUEUED, same_queued,
        values={"queued_at": now},
    )


def _stalled(run: StuckRun, now: dt.datetime) -> tuple[Any, ...]:
    """The run is still running under the very lease the reconciler saw, and it expired."""
    owner = Task.lease_owner.is_(None) if run.lease_owner is None else Task.lease_owner == run.lease_owner
    return (
        Task.attempt == run.attempt,
        Task.run_status == RUNNING,
        owner,
        Task.lease_expires_at.is_(None) | (Task.lease_expires_at <= now),
    )


def requeue_stalled_run(s: Session, run: StuckRun, *, now: dt.datetime) -> bool:
    """Put running run ``run``, whose lease expired, back to queued as the same attempt
    (``requeues`` + 1); the caller sends it after the commit. False: someone else acted first
    (its owner renewed, another reconciler, a cancel or a retrain)."""
    task = _read_task(s, run.task_id)
    if task is None:
        return False
    values: dict[str, Any] = {"run_status": QUEUED, "queued_at": now, "requeues": Task.requeues + 1, **_lease_cleared()}
    if task.version is not None:
        values["training"] = {**(task.training or {}), "status": QUEUED, "error": None}
    else:
        values["status"] = QUEUED
    won = _cas(s, run.task_id, *_stalled(run, now), _same_version(task.version), values=values)
    if won:
        add_event(s, task_id=task.id, tenant_id=task.tenant_id, kind="requeued", attempt=run.attempt,
                  requeues=run.requeues + 1)
    return won


def fail_stalled_run(s: Session, run: StuckRun, *, now: dt.datetime, error: str) -> bool:
    """Fail running run ``run`` whose lease expired (it was re-queued too often already) with
    the readable ``error``; False when someone else acted first."""
    task = _read_task(s, run.task_id)
    if task is None:
        return False
    won = _cas(
        s, run.task_id, *_stalled(run, now), _same_version(task.version),
        values=_finish_values(task, FAILED, error=error),
    )
    if won:
        add_event(s, task_id=task.id, tenant_id=task.tenant_id, kind="failed", attempt=run.attempt, reason=error)
        s.expire(task)
    return won
