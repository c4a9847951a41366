"""A task's events: what happened to it, in order (``GET /v1/tasks/{id}/events``).

Every event is written in the transaction of the change it records (``store.repo`` calls
``add_event`` after its conditional write won), so an event exists exactly when its change
committed. Kinds and their ``data``:

========================  ===================================================================
``created``               ``method``, ``classes`` (count)
``queued``                ``attempt``, ``retrain`` (bool), ``auto`` (true: started by added samples)
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

import dataclasses
import time
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


#: An event id is taken when its row is inserted but seen when its transaction commits: two
#: transactions that do not both update the task row may commit out of id order. A follower
#: (``EventCursor``) looks again for ids below the newest it sent during this many seconds.
LATE_COMMIT_S = 10.0


@dataclasses.dataclass
class EventCursor:
    """A follower's position in a task's events (the tenant stream, the dashboard's feed):
    ``last`` (the highest id sent) and the ids sent within ``LATE_COMMIT_S`` (``recent``)
    above ``floor`` (below it every id is taken as final). ``read`` returns the events not sent
    yet: those that committed late first (ids between ``floor`` and ``last`` not sent), then
    new ones; the caller calls ``sent`` for each it delivers and ``settle`` after each read."""

    last: int
    floor: int = 0
    recent: dict[int, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.floor = self.last

    def read(self, s: Session, task_id: str, *, tenant_id: str, limit: int) -> tuple[list[TaskEvent], bool]:
        """The events not sent yet and whether more new ones are waiting (``limit`` reached)."""
        late: list[TaskEvent] = []
        if self.last > self.floor:
            ids = set(s.scalars(select(TaskEvent.id).where(
                TaskEvent.task_id == task_id, TaskEvent.id > self.floor, TaskEvent.id < self.last
            )))
            missing = sorted(ids - self.recent.keys())
            if missing:
                late = list(s.scalars(select(TaskEvent).where(TaskEvent.id.in_(missing)).order_by(TaskEvent.id)))
        new = list_events(s, task_id, tenant_id=tenant_id, after=self.last, limit=limit)
        return late + new, len(new) >= limit

    def sent(self, event_id: int, now: float | None = None) -> None:
        self.recent[event_id] = time.monotonic() if now is None else now
        self.last = max(self.last, event_id)

    def settle(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        old = [i for i, t in self.recent.items() if now - t > LATE_COMMIT_S]
        if old:
            self.floor = max(self.floor, *old)
            self.recent = {i: t for i, t in self.recent.items() if i > self.floor}


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
