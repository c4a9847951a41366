"""Evaluation rows (``POST /v1/tasks/{id}/evaluate``): create, read, and the job side's claim,
lease, finish and fail, plus what the reconciler needs. Each function takes a ``Session`` and
never commits: the caller owns the transaction (``store.db.session_scope``).

As ``store.repo`` does for runs, every state transition is ONE conditional write
(``UPDATE evaluations SET ... WHERE id = :id AND status = :seen ...``) whose row count decides
who won: a duplicate delivery of the job finds the evaluation running under another owner's
live lease (or finished) and does nothing; an execution whose lease expired and was taken over
finds its owner changed and writes nothing. Tenant-scoped reads take ``tenant_id=`` and answer
None for another tenant's ids exactly as for unknown ones.

Life cycle: ``queued`` (zip stored under ``evaluations/{tenant}/{task}/{id}.zip``) -> ``running``
(claimed with a lease by one job execution) -> ``ready`` (``result`` stored) or ``failed``
(``error``, readable). Finishing either way clears ``object_key`` in the same transaction; the
job deletes the zip after the commit (a zip that outlives a failed delete has no row and the
garbage collector takes it, ``store.consistency``).

Events (``store.events``): ``evaluation_queued`` when created, ``evaluated`` (with the accuracy,
or the error) when finished. Each is written with a touch of the task row (``updated_at``) in
the same transaction, so that on Postgres the event ids of one task are in commit order (the
touch takes the task's row lock before the event's id is drawn).

Two columns serve the queued state too: while an evaluation is queued, ``lease_expires_at``
holds when its message was last sent (None: when it was created), so the reconciler re-sends it
at most once per ``requeue_queued_after_s``; ``params["requeues"]`` counts how often the
reconciler put it back to queued after its worker stopped renewing the lease.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.db import utcnow
from store.events import add_event
from store.models import FAILED, QUEUED, READY, RUNNING, Evaluation, Task, new_id

#: Default lease of a claimed evaluation when the caller gives none (the job passes
#: ``settings.run_lease_s``).
DEFAULT_LEASE_S = 30.0
ACTIVE = (QUEUED, RUNNING)

__all__ = [
    "ACTIVE", "DEFAULT_LEASE_S", "StuckEvaluation", "claim_evaluation", "create_evaluation", "fail_evaluation",
    "fail_stalled_evaluation", "finish_evaluation", "get_evaluation", "get_evaluation_for_job",
    "list_evaluations", "mark_evaluation_resent", "new_evaluation_id", "pending_evaluations",
    "release_evaluation_lease", "renew_evaluation_lease", "requeue_stalled_evaluation", "stuck_evaluations",
]


def new_evaluation_id() -> str:
    """An id for an evaluation whose zip is stored before its row (the key names the id)."""
    return new_id()


def _touch_task(s: Session, task_id: str) -> None:
    """Take the task's row lock before an event of it is written (see the module doc)."""
    s.execute(
        update(Task).where(Task.id == task_id).values(updated_at=utcnow()).execution_options(synchronize_session=False)
    )


def _cas(s: Session, evaluation_id: str, *conditions: Any, values: Mapping[str, Any]) -> bool:
    """``UPDATE evaluations SET values WHERE id = :id AND conditions``: True when this row
    changed (the caller won), False when it is gone or no longer as read."""
    result = s.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation_id, *conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _read(s: Session, evaluation_id: str) -> Evaluation | None:
    """The row as committed now (refreshing a copy already in the session)."""
    return s.scalar(
        select(Evaluation).where(Evaluation.id == evaluation_id).execution_options(populate_existing=True)
    )


# --------------------------------------------------------------------------- tenant side


def create_evaluation(
    s: Session,
    *,
    task_id: str,
    tenant_id: str,
    version: int,
    object_key: str,
    sha256: str,
    size: int,
    params: Mapping[str, Any],
    evaluation_id: str | None = None,
) -> Evaluation:
    """A queued evaluation of ``version`` whose zip is already stored at ``object_key``, with its
    ``evaluation_queued`` event. Submit the job after the commit."""
    _touch_task(s, task_id)
    ev = Evaluation(
        id=evaluation_id or new_id(),
        task_id=task_id,
        tenant_id=tenant_id,
        version=int(version),
        status=QUEUED,
        object_key=object_key,
        sha256=sha256,
        size=int(size),
        params=dict(params),
        created_at=utcnow(),
    )
    s.add(ev)
    s.flush()
    add_event(s, task_id=task_id, tenant_id=tenant_id, kind="evaluation_queued", evaluation_id=ev.id,
              version=int(version))
    return ev


def get_evaluation(s: Session, task_id: str, evaluation_id: str, *, tenant_id: str) -> Evaluation | None:
    """The tenant's evaluation of that task, or None (unknown and foreign ids alike)."""
    return s.scalar(
        select(Evaluation).where(
            Evaluation.id == evaluation_id, Evaluation.task_id == task_id, Evaluation.tenant_id == tenant_id
        )
    )


def list_evaluations(s: Session, task_id: str, *, tenant_id: str, limit: int = 1000) -> list[Evaluation]:
    """The task's evaluations, newest first, at most ``limit``."""
    return list(
        s.scalars(
            select(Evaluation)
            .where(Evaluation.task_id == task_id, Evaluation.tenant_id == tenant_id)
            .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
            .limit(limit)
        )
    )


# --------------------------------------------------------------------------- job side


def get_evaluation_for_job(s: Session, evaluation_id: str) -> Evaluation | None:
    """The evaluation by id alone, for the worker (which receives only ids). Not for HTTP paths."""
    return _read(s, evaluation_id)


def _lease_live(ev: Evaluation, now: dt.datetime) -> bool:
    return ev.lease_owner is not None and ev.lease_expires_at is not None and ev.lease_expires_at > now


def claim_evaluation(
    s: Session, evaluation_id: str, *, owner: str, lease_s: float = DEFAULT_LEASE_S
) -> Evaluation | None:
    """Mark the evaluation running, held by ``owner`` with a lease of ``lease_s`` seconds, and
    return it; None when there is nothing to do: deleted (with its task), finished, or running
    under another owner's live lease (a duplicate delivery). A running evaluation whose lease
    expired (or was released) is taken over. One conditional UPDATE decides."""
    ev = _read(s, evaluation_id)
    if ev is None or ev.status not in ACTIVE:
        return None
    now = utcnow()
    if ev.status == QUEUED:
        conditions: list[Any] = [Evaluation.status == QUEUED]
    else:
        if _lease_live(ev, now) and ev.lease_owner != owner:
            return None
        conditions = [
            Evaluation.status == RUNNING,
            Evaluation.lease_owner.is_(None) if ev.lease_owner is None else Evaluation.lease_owner == ev.lease_owner,
        ]
        if ev.lease_owner != owner:
            conditions.append(Evaluation.lease_expires_at.is_(None) | (Evaluation.lease_expires_at <= now))
    won = _cas(s, ev.id, *conditions, values={
        "status": RUNNING, "lease_owner": owner, "lease_expires_at": now + dt.timedelta(seconds=lease_s),
    })
    return _read(s, evaluation_id) if won else None


def renew_evaluation_lease(s: Session, evaluation_id: str, *, owner: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """The heartbeat; False when the evaluation is not ``owner``'s running one any more."""
    return _cas(
        s, evaluation_id, Evaluation.status == RUNNING, Evaluation.lease_owner == owner,
        values={"lease_expires_at": utcnow() + dt.timedelta(seconds=lease_s)},
    )


def release_evaluation_lease(s: Session, evaluation_id: str, *, owner: str) -> bool:
    """A job that stops without finishing (shutdown, transient error) gives its lease up, so a
    retry may claim the evaluation at once; it stays running."""
    return _cas(
        s, evaluation_id, Evaluation.status == RUNNING, Evaluation.lease_owner == owner,
        values={"lease_owner": None, "lease_expires_at": None},
    )


def _finished(state: str, **values: Any) -> dict[str, Any]:
    return {"status": state, "finished_at": utcnow(), "lease_owner": None, "lease_expires_at": None,
            "object_key": None, **values}


def finish_evaluation(
    s: Session, evaluation_id: str, *, owner: str, result: Mapping[str, Any]
) -> tuple[bool, str | None]:
    """Store the result (status ready) if ``owner`` still holds the running evaluation, with its
    ``evaluated`` event; ``(won, zip key to delete after the commit)``."""
    ev = _read(s, evaluation_id)
    if ev is None or ev.status != RUNNING or ev.lease_owner != owner:
        return False, None
    key = ev.object_key
    _touch_task(s, ev.task_id)
    won = _cas(
        s, ev.id, Evaluation.status == RUNNING, Evaluation.lease_owner == owner,
        values=_finished(READY, result=dict(result), error=None),
    )
    if not won:
        return False, None
    add_event(s, task_id=ev.task_id, tenant_id=ev.tenant_id, kind="evaluated", evaluation_id=ev.id,
              version=ev.version, accuracy=result.get("accuracy"))
    return True, key


def fail_evaluation(
    s: Session, evaluation_id: str, *, error: str, owner: str | None = None
) -> tuple[bool, str | None]:
    """Fail the queued or running evaluation with a readable ``error`` (with ``owner``: only if
    it still holds it), with its ``evaluated`` event; ``(won, zip key to delete after the commit)``."""
    ev = _read(s, evaluation_id)
    if ev is None or ev.status not in ACTIVE:
        return False, None
    if owner is not None and ev.lease_owner != owner:
        return False, None
    key = ev.object_key
    conditions: list[Any] = [Evaluation.status == ev.status]
    if owner is not None:
        conditions.append(Evaluation.lease_owner == owner)
    _touch_task(s, ev.task_id)
    if not _cas(s, ev.id, *conditions, values=_finished(FAILED, error=error)):
        return False, None
    add_event(s, task_id=ev.task_id, tenant_id=ev.tenant_id, kind="evaluated", evaluation_id=ev.id,
              version=ev.version, error=error)
    return True, key


def pending_evaluations(s: Session) -> list[str]:
    """Evaluations an in-process runner starting now should submit, oldest first: the queued
    ones and the running ones without a live lease (their runner stopped)."""
    now = utcnow()
    rows = s.execute(
        select(Evaluation.id, Evaluation.status, Evaluation.lease_owner, Evaluation.lease_expires_at)
        .where(Evaluation.status.in_(ACTIVE))
        .order_by(Evaluation.created_at)
    ).all()
    return [
        r.id for r in rows
        if r.status == QUEUED or r.lease_owner is None or r.lease_expires_at is None or r.lease_expires_at <= now
    ]


# --------------------------------------------------------------------------- reconciler


@dataclasses.dataclass(frozen=True)
class StuckEvaluation:
    """An evaluation the reconciler must act on (``worker.reconcile``)."""

    id: str
    task_id: str
    tenant_id: str
    status: str
    created_at: dt.datetime
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    requeues: int


def _requeues(params: Any) -> int:
    try:
        return int((params or {}).get("requeues", 0))
    except (TypeError, ValueError, AttributeError):
        return 0


def stuck_evaluations(
    s: Session, *, now: dt.datetime, requeue_queued_after_s: float, limit: int = 500
) -> list[StuckEvaluation]:
    """Evaluations queued (or last sent) before ``now - requeue_queued_after_s`` (their message
    may be lost) and running ones without a live lease (their worker stopped), oldest first."""
    cutoff = now - dt.timedelta(seconds=requeue_queued_after_s)
    queued = (Evaluation.status == QUEUED) & (
        (Evaluation.lease_expires_at.is_(None) & (Evaluation.created_at <= cutoff))
        | (Evaluation.lease_expires_at <= cutoff)
    )
    running = (Evaluation.status == RUNNING) & (
        Evaluation.lease_owner.is_(None) | Evaluation.lease_expires_at.is_(None) | (Evaluation.lease_expires_at <= now)
    )
    rows = s.execute(
        select(
            Evaluation.id, Evaluation.task_id, Evaluation.tenant_id, Evaluation.status, Evaluation.created_at,
            Evaluation.lease_owner, Evaluation.lease_expires_at, Evaluation.params,
        )
        .where(queued | running)
        .order_by(Evaluation.created_at)
        .limit(limit)
    ).all()
    return [
        StuckEvaluation(r.id, r.task_id, r.tenant_id, r.status, r.created_at, r.lease_owner, r.lease_expires_at,
                        _requeues(r.params))
        for r in rows
    ]


def mark_evaluation_resent(s: Session, ev: StuckEvaluation, *, now: dt.datetime) -> bool:
    """Record that queued ``ev`` is sent again now, if it is still as the reconciler read it:
    of several reconcilers exactly one re-sends."""
    same = (
        Evaluation.lease_expires_at.is_(None) if ev.lease_expires_at is None
        else Evaluation.lease_expires_at == ev.lease_expires_at
    )
    return _cas(s, ev.id, Evaluation.status == QUEUED, Evaluation.lease_owner.is_(None), same,
                values={"lease_expires_at": now})


def _stalled(ev: StuckEvaluation, now: dt.datetime) -> tuple[Any, ...]:
    """Still running under the very lease the reconciler saw, and it expired."""
    owner = Evaluation.lease_owner.is_(None) if ev.lease_owner is None else Evaluation.lease_owner == ev.lease_owner
    return (
        Evaluation.status == RUNNING,
        owner,
        Evaluation.lease_expires_at.is_(None) | (Evaluation.lease_expires_at <= now),
    )


def requeue_stalled_evaluation(s: Session, ev: StuckEvaluation, *, now: dt.datetime) -> bool:
    """Put running ``ev``, whose lease expired, back to queued (``params["requeues"]`` + 1); the
    caller sends it after the commit. False: someone else acted first."""
    row = _read(s, ev.id)
    if row is None:
        return False
    params = {**(row.params or {}), "requeues": _requeues(row.params) + 1}
    return _cas(s, ev.id, *_stalled(ev, now), values={
        "status": QUEUED, "lease_owner": None, "lease_expires_at": now, "params": params,
    })


def fail_stalled_evaluation(s: Session, ev: StuckEvaluation, *, now: dt.datetime, error: str) -> tuple[bool, str | None]:
    """Fail running ``ev`` whose lease expired (re-queued too often already); ``(won, zip key to
    delete after the commit)``."""
    row = _read(s, ev.id)
    if row is None:
        return False, None
    key = row.object_key
    _touch_task(s, ev.task_id)
    if not _cas(s, ev.id, *_stalled(ev, now), values=_finished(FAILED, error=error)):
        return False, None
    add_event(s, task_id=row.task_id, tenant_id=row.tenant_id, kind="evaluated", evaluation_id=row.id,
              version=row.version, error=error)
    return True, key
