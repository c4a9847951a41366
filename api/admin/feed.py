"""The task page's live feed: ``GET /admin/tasks/{id}/events``, Server-Sent Events for the
admin (the tenant's own feed is ``GET /v1/tasks/{id}/events``).

The stream sends, in this order on each poll:

- every event of the task (``store.events``) newer than the client's cursor, as
  ``id: <event id>`` / ``event: <kind>`` / ``data: {"id", "kind", "data", "created_at",
  "time", "text"}`` (``text``: the line the page shows, the same as the server renders);
- ``event: state`` without an id when the task's live state changed (status, run status,
  run progress, version, error; the ``/admin/api/tasks`` row): progress moves between
  epochs, and this does not move the client's cursor;
- ``event: deleted`` (``{"task_id"}``) when the task no longer exists, then the stream ends.

Events and ``deleted`` are as the tenant's stream sends them (``api.routes.events``), the
event's ``data`` with ``time`` and ``text`` added. The cursor is the later of
``Last-Event-ID`` (what the browser sends when it reconnects) and the ``after`` query
parameter (the last event the page rendered); an event that committed after a higher id was
sent still goes out (``store.events.EventCursor``). The database is read every
``POLL_S`` seconds, each time with a short session of its own, so a waiting stream holds no
connection; a comment line every ``HEARTBEAT_S`` seconds keeps proxies from closing an idle
stream and finds a client that went away. A stream ends after ``MAX_STREAM_S``; the browser
reconnects from where it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from store import events as store_events, overview
from store.db import session_scope
from store.models import TaskEvent

POLL_S = 0.5
HEARTBEAT_S = 15.0
MAX_STREAM_S = 300.0
#: Events per database read; a backlog is sent in batches of this many without waiting.
BATCH = 500
#: Milliseconds the browser waits before reconnecting after the stream ended or broke.
RETRY_MS = 2000
#: Events the task page renders (the newest), before the feed appends to them.
PAGE_EVENTS = 50

EVENT_KINDS = store_events.EVENT_KINDS


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def _g(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def describe(kind: str, data: dict[str, Any] | None) -> str:
    """One line for an event, as the page shows it (plain text: the page escapes it)."""
    d = data if isinstance(data, dict) else {}
    run = f"run {_g(d.get('attempt'))}"
    if kind == "created":
        return f"task created ({_g(d.get('method'))}, {_g(d.get('classes'))} classes)"
    if kind == "queued":
        return f"{run} queued" + (" (a retrain)" if d.get("retrain") else "")
    if kind == "started":
        return f"{run} started" + (f" on {d['worker']}" if d.get("worker") else "")
    if kind == "epoch":
        return f"{run}, epoch {_g(d.get('epoch'))}: loss {_g(d.get('loss'))}, val. accuracy {_pct(d.get('val_accuracy'))}"
    if kind == "published":
        acc = d.get("val_accuracy")
        return f"version {_g(d.get('version'))} published" + (f" (val. accuracy {_pct(acc)})" if acc is not None else "")
    if kind == "served":
        return f"version {_g(d.get('version'))} served instead of version {_g(d.get('previous'))}"
    if kind == "failed":
        return f"{run} failed: {_g(d.get('reason'))}"
    if kind == "cancel_requested":
        return f"cancel of {run} requested"
    if kind == "cancelled":
        return f"{run} cancelled"
    if kind == "requeued":
        return f"{run} queued again (its worker stopped renewing its lease; requeue {_g(d.get('requeues'))})"
    if kind == "evaluation_queued":
        return f"evaluation {str(d.get('evaluation_id') or '')[:8]} of version {_g(d.get('version'))} queued"
    if kind == "evaluated":
        what = f"failed: {d['error']}" if d.get("error") else f"accuracy {_pct(d.get('accuracy'))}"
        return f"evaluation {str(d.get('evaluation_id') or '')[:8]} of version {_g(d.get('version'))}: {what}"
    if kind == "min_score":
        v = d.get("min_score")
        return "default min_score cleared" if v is None else f"default min_score set to {_g(v)}"
    return f"{kind}: {json.dumps(d, sort_keys=True, default=str)}"


def event_json(e: TaskEvent) -> dict[str, Any]:
    """An event as the feed sends it (and as the page renders it)."""
    created = e.created_at
    return {
        "id": int(e.id),
        "kind": e.kind,
        "data": e.data if isinstance(e.data, dict) else {},
        "created_at": created.isoformat() if created else None,
        "time": created.strftime("%Y-%m-%d %H:%M:%S") if created else "—",
        "text": describe(e.kind, e.data),
    }


def recent_events(s: Session, task_id: str, *, tenant_id: str, limit: int = PAGE_EVENTS) -> list[dict[str, Any]]:
    """The task's newest ``limit`` events, oldest first."""
    rows = list(
        s.scalars(
            select(TaskEvent)
            .where(TaskEvent.task_id == task_id, TaskEvent.tenant_id == tenant_id)
            .order_by(TaskEvent.id.desc())
            .limit(limit)
        )
    )
    return [event_json(e) for e in reversed(rows)]


def row_json(r: overview.TaskRow) -> dict[str, Any]:
    """A task's live state (the ``/admin/api/tasks`` row and the feed's ``state`` event)."""
    return {
        "id": r.id,
        "status": r.status,
        "progress": r.progress,
        "run_status": r.run_status,
        "run_progress": r.run_progress,
        "version": r.version,
        "error": r.error,
        "val_accuracy": r.val_accuracy,
        "live": r.live,
        "updated_at": r.updated_at.isoformat(),
    }


def cursor(last_event_id: str | None, after: int) -> int:
    """Where the stream starts: after ``after`` or ``Last-Event-ID`` (what a reconnecting
    EventSource sends with the page's original URL), the later of the two; a header that is no
    event id is ignored."""
    value = (last_event_id or "").strip()
    header = int(value) if value.isdigit() and len(value) <= 18 else 0
    return max(0, after, header)


def _frame(*, event: str, data: Any, id: int | None = None) -> str:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def _poll(sm: sessionmaker[Session], task_id: str, tenant_id: str, sent: store_events.EventCursor) -> tuple[list[dict[str, Any]], bool, dict[str, Any]] | None:
    """In one short session: the events not sent yet (late commits first, then at most
    ``BATCH`` new ones; whether more are waiting) and the task's live state; None when the
    task is gone."""
    with session_scope(sm) as s:
        rows = overview.task_rows_by_id(s, [task_id])
        if not rows or rows[0].tenant_id != tenant_id:
            return None
        found, more = sent.read(s, task_id, tenant_id=tenant_id, limit=BATCH)
        return [event_json(e) for e in found], more, row_json(rows[0])


async def stream(request: Request, sm: sessionmaker[Session], task_id: str, tenant_id: str, after: int) -> AsyncIterator[str]:
    """The SSE body (text chunks); see the module's docstring."""
    sent = store_events.EventCursor(after)
    state: dict[str, Any] | None = None
    started = last_sent = time.monotonic()
    yield f"retry: {RETRY_MS}\n\n"
    while True:
        polled = await anyio.to_thread.run_sync(_poll, sm, task_id, tenant_id, sent)
        now = time.monotonic()
        if polled is None:
            yield _frame(event="deleted", data={"task_id": task_id})
            return
        evs, more, row = polled
        chunks = []
        for e in evs:
            sent.sent(e["id"], now)
            # the id is the stream's position (the highest sent): an event that committed late
            # goes out after higher ids, and Last-Event-ID resumes without loss
            chunks.append(_frame(id=sent.last, event=e["kind"], data=e))
        sent.settle(now)
        live = {k: v for k, v in row.items() if k != "updated_at"}
        if live != state:
            state = live
            chunks.append(_frame(event="state", data=row))
        if chunks:
            yield "".join(chunks)
            last_sent = now
        elif now - last_sent >= HEARTBEAT_S:
            yield ": heartbeat\n\n"
            last_sent = now
        if now - started >= MAX_STREAM_S or await request.is_disconnected():
            return
        if not more:
            await anyio.sleep(POLL_S)
