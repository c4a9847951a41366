"""What happened to a task, and its heavy parts (tenant):

- ``GET /v1/tasks/{id}/events``: the task's events oldest first (``store.events``), as JSON
  pages, or with ``Accept: text/event-stream`` as Server-Sent Events that follow new ones;
- ``GET /v1/tasks/{id}/history``: the per-epoch history of the served version and of a run
  in progress;
- ``GET /v1/tasks/{id}/confusion``: the served version's validation confusion matrix with its
  class labels (and per-class metrics).

A stream polls the database every ``POLL_S`` seconds, each time in a short session of its own:
no connection is held while it waits. It sends a comment every ``HEARTBEAT_S`` seconds of
silence (proxies keep the connection), ``event: deleted`` and ends once the task is gone, and
ends when the client goes. With ``until_idle=true`` it also ends once the task has no queued or
running run or evaluation and nothing new arrived.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTenant, DbSession, current_tenant, get_state
from api.errors import ApiError
from api.schemas import (
    ErrorOut,
    EventList,
    RunHistory,
    TaskConfusion,
    TaskHistory,
    confusion_of,
    event_out,
    history_of,
)
from api.state import ServiceState
from store import listing, repo
from store.db import session_scope
from store.events import EventCursor, list_events
from store.models import ACTIVE_STATUSES, READY, Evaluation, Task

log = logging.getLogger("promptstore.api")

router = APIRouter(prefix="/v1/tasks", tags=["events"])

#: Seconds between two reads of a stream's new events.
POLL_S = 0.5
#: Seconds of silence after which a stream sends a comment line.
HEARTBEAT_S = 15.0
#: The reconnection delay a stream asks of EventSource clients (``retry:``), in milliseconds.
RETRY_MS = 2000
#: Events read per poll at most (a stream reads again at once while there are more).
BATCH = 500
#: Largest event id (BIGINT).
MAX_EVENT_ID = 2**63 - 1

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key."},
    404: {"model": ErrorOut, "description": "Unknown task (or another tenant's)."},
    422: {"model": ErrorOut, "description": "A bad parameter (the detail names it and what is accepted)."},
}


def _not_found(task_id: str) -> ApiError:
    return ApiError(404, f"task {task_id} not found")


def _owned(s: Session, task_id: str, tenant_id: str) -> bool:
    return s.scalar(select(exists().where(Task.id == task_id, Task.tenant_id == tenant_id))) is True


# --------------------------------------------------------------------------- parameters


def _position(after: int | None, last_event_id: str | None) -> int:
    """Where to start: after ``after`` or the ``Last-Event-ID`` header (a reconnecting
    EventSource sends it with the original URL: the later of the two)."""
    if after is not None and not 0 <= after <= MAX_EVENT_ID:
        raise ApiError(422, f"after: {after} is not an event id; send an integer from 0 (the default) to {MAX_EVENT_ID}")
    start = after or 0
    if last_event_id is not None and last_event_id.strip():
        raw = last_event_id.strip()
        if not raw.isdigit() or int(raw) > MAX_EVENT_ID:
            raise ApiError(
                422, f"Last-Event-ID: {raw[:40]!r} is not an event id; send the id of an event received (an integer >= 0)"
            )
        start = max(start, int(raw))
    return start


def wants_stream(request: Request) -> bool:
    """The client asked for ``text/event-stream`` (with a non-zero quality)."""
    for part in request.headers.get("accept", "").split(","):
        media, *params = [p.strip() for p in part.split(";")]
        if media.lower() != "text/event-stream":
            continue
        q = next((p.split("=", 1)[1] for p in params if p.replace(" ", "").lower().startswith("q=")), "1")
        try:
            return float(q) > 0
        except ValueError:
            return True
    return False


# --------------------------------------------------------------------------- the stream


@dataclass
class _Poll:
    gone: bool = False
    active: bool = False
    events: list[Any] = field(default_factory=list)
    more: bool = False


def _poll(sm: sessionmaker[Session], task_id: str, tenant_id: str, follower: EventCursor, idle_check: bool) -> _Poll:
    """One short session: is the task still there (and busy), and its events not sent yet."""
    with session_scope(sm) as s:
        run_status = s.execute(
            select(Task.run_status).where(Task.id == task_id, Task.tenant_id == tenant_id)
        ).first()
        if run_status is None:
            return _Poll(gone=True)
        active = False
        if idle_check:  # read before the events: an idle run's last events are then visible too
            active = run_status[0] in ACTIVE_STATUSES or s.scalar(select(exists().where(
                Evaluation.task_id == task_id, Evaluation.status.in_(ACTIVE_STATUSES)
            ))) is True
        found, more = follower.read(s, task_id, tenant_id=tenant_id, limit=BATCH)
        return _Poll(active=active, events=[event_out(e) for e in found], more=more)


def _sse(kind: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def follow(
    sm: sessionmaker[Session], task_id: str, tenant_id: str, after: int, *, until_idle: bool = False
) -> AsyncIterator[str]:
    """The Server-Sent Events of the task's events after ``after``, then of new ones as they
    commit (see the module's docstring)."""
    follower = EventCursor(after)
    yield f"retry: {RETRY_MS}\n\n"
    quiet_since = time.monotonic()
    while True:
        poll = await run_in_threadpool(_poll, sm, task_id, tenant_id, follower, until_idle)
        now = time.monotonic()
        if poll.gone:
            yield _sse("deleted", {"task_id": task_id})
            return
        for e in poll.events:
            follower.sent(e.id, now)
            # the stream's position, so that Last-Event-ID resumes without loss (an event
            # that committed late goes out after higher ids, with the highest sent)
            yield _sse(e.kind, e.model_dump(mode="json"), follower.last)
        follower.settle(now)
        if poll.events:
            quiet_since = now
        elif until_idle and not poll.active:
            return
        if poll.more:
            continue
        if now - quiet_since >= HEARTBEAT_S:
            yield ": heartbeat\n\n"
            quiet_since = now
        await anyio.sleep(POLL_S)


# --------------------------------------------------------------------------- routes


@router.get(
    "/{task_id}/events",
    response_model=EventList,
    responses={
        **_ERRORS,
        200: {
            "description": "The events (JSON); with `Accept: text/event-stream`, a stream of Server-Sent Events "
            "(`id:`, `event: <kind>`, `data: <the item as JSON>`) that follows new ones.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
def task_events(
    request: Request,
    task_id: str,
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
    after: int | None = Query(None, description="Only events with a larger id (default 0: from the start)."),
    limit: int | None = Query(None, description="JSON: events per answer, 1 to 1000 (default 100)."),
    until_idle: bool = Query(
        False, description="Stream: end once the task has no queued or running run or evaluation and nothing "
        "new arrived (else it follows until the task is deleted or the client goes)."
    ),
) -> Any:
    """The task's events, oldest first: created, queued, started (on which worker), epoch (loss,
    val_accuracy), published, served, failed (reason), cancel_requested, cancelled, requeued,
    evaluation_queued, evaluated, min_score. With ``Accept: text/event-stream``: Server-Sent
    Events that follow new ones, resuming after ``Last-Event-ID`` (or ``after``)."""
    start = _position(after, request.headers.get("last-event-id"))
    stream = wants_stream(request)
    try:
        n = listing.check_limit(limit)
    except listing.InvalidListing as exc:
        raise ApiError(422, str(exc)) from None
    with session_scope(state.sessionmaker) as s:
        if not _owned(s, task_id, tenant.id):
            raise _not_found(task_id)
        if not stream:
            events = list_events(s, task_id, tenant_id=tenant.id, after=start, limit=n)
            items = [event_out(e) for e in events]
            return EventList(items=items, next_after=items[-1].id if items else start)
    return StreamingResponse(
        follow(state.sessionmaker, task_id, tenant.id, start, until_idle=until_idle),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _served(s: Session, task: Task) -> Any:
    """The served ``PromptVersion`` when it records its own metrics (versions published before
    2026-12-05 do not: the task's columns hold the latest run's), else None."""
    if task.version is None:
        return None
    pv = repo.get_served_version(s, task.id, tenant_id=task.tenant_id)
    return pv if pv is not None and pv.metrics is not None else None


@router.get("/{task_id}/history", response_model=TaskHistory, responses=_ERRORS)
def task_history(task_id: str, s: DbSession, tenant: CurrentTenant = Depends(current_tenant)) -> TaskHistory:
    """The per-epoch history (epoch, loss, val_accuracy, ...) of the served version, and of
    the latest run while it is not the served version's (queued, running, failed, cancelled)."""
    task = repo.get_task(s, task_id, tenant_id=tenant.id)
    if task is None:
        raise _not_found(task_id)
    served = None
    if task.version is not None:
        pv = _served(s, task)
        served = history_of(pv.history if pv is not None else task.history)
    run = task.run
    current = None
    if run.status is not None and run.status != READY:
        err = run.error
        current = RunHistory(
            status=str(run.status), progress=run.progress, history=history_of(run.history),
            error=err if isinstance(err, str) or err is None else str(err),
        )
    return TaskHistory(task_id=task.id, version=task.version, history=served, run=current)


@router.get("/{task_id}/confusion", response_model=TaskConfusion, responses=_ERRORS)
def task_confusion(task_id: str, s: DbSession, tenant: CurrentTenant = Depends(current_tenant)) -> TaskConfusion:
    """The served version's validation confusion matrix (rows: true class, columns: predicted,
    labelled by ``classes``) and per-class metrics; ``matrix`` null without a validation split
    or before the first version."""
    task = repo.get_task(s, task_id, tenant_id=tenant.id)
    if task is None:
        raise _not_found(task_id)
    classes: Any = task.classes
    matrix = per_class = None
    if task.version is not None:
        pv = _served(s, task)
        if pv is not None and isinstance(pv.classes, list):
            classes = pv.classes
        matrix = confusion_of(pv.confusion if pv is not None else task.confusion)
        metrics = pv.metrics if pv is not None else task.metrics
        found = metrics.get("per_class") if isinstance(metrics, dict) else None
        if isinstance(found, list) and all(isinstance(x, dict) for x in found):
            per_class = found
    labels = [c if isinstance(c, str) else str(c) for c in classes] if isinstance(classes, list) else []
    return TaskConfusion(task_id=task.id, version=task.version, classes=labels, matrix=matrix, per_class=per_class)
