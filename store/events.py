"""A task's events: what happened to it, in order (``GET /v1/tasks/{id}/events``).

Every event is written in the transaction of the change it records (``store.repo`` calls
``add_event`` after its conditional write won), so an event exists exactly when its change
committed. Kinds and their ``data``:

========================  ===================================================================
``created``               ``method``, ``classes`` (count)
``queued``                ``attempt``, ``retrain`` (bool)
``started``               ``attempt``, ``worker`` (the job execution, ``host:pid:random``)
``epoch``                 ``attempt``, ``epoch``, ``loss``, ``val_accuracy``
``published``             ``version``, ``val_accuracy``
``served``                ``version``, ``previous`` (a tenant chose another version)
``failed``                ``attempt``, ``reason``
``cancel_requested``      ``attempt``
``cancelled``             ``attempt``
``requeued``              ``attempt``, ``requeues`` (its worker stopped renewing its lease)
``evaluation_queued``     ``evaluation_id``, ``version``
``evaluated``             ``evaluation_id``, ``version``, ``accuracy`` (or ``error``)
``min_score``             ``min_score`` (the default threshold changed)
========================  ===================================================================

``id`` grows with time (one sequence for all tasks): it orders a task's events and is the
Server-Sent Events id from which a client resumes (``Last-Event-ID``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import TaskEvent

#: The kinds above, for documentation and tests.
EVENT_KINDS = (
    "created", "queued", "started", "epoch", "published", "served", "failed", "cancel_requested",
    "cancelled", "requeued", "evaluation_queued", "evaluated", "min_score",
)

#: Events a task keeps at most per kind ``epoch`` and run: a run of 10,000 epochs records the
#: first ``MAX_EPOCH_EVENTS`` and the last (its history has them all).
MAX_EPOCH_EVENTS = 1000


def add_event(s: Session, *, task_id: str, tenant_id: str, kind: str, **data: Any) -> None:
    """Record an event in the caller's transaction (no flush: it commits with the change)."""
    s.add(TaskEvent(task_id=task_id, tenant_id=tenant_id, kind=kind, data=data))


def list_events(
    s: Session, task_id: str, *, tenant_id: str, after: int = 0, limit: int = 1000
) -> list[TaskEvent]:
    """The task's events with ``id > after``, oldest first, at most ``limit``."""
    return list(
        s.scalars(
            select(TaskEvent)
            .where(TaskEvent.task_id == task_id, TaskEvent.tenant_id == tenant_id, TaskEvent.id > after)
            .order_by(TaskEvent.id)
            .limit(limit)
        )
    )
