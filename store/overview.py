"""Read-only queries across tenants for the admin dashboard (``api.admin``).

Tenant-facing code uses ``store.repo``, whose functions are scoped by ``tenant_id``;
these are the operator's views of every tenant at once, so they take optional tenant
filters instead. Listing selects only the columns a table shows: the per-epoch history
and the confusion matrix are read for one task at a time (``task_detail``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from store.models import ACTIVE_STATUSES, Dataset, RunView, PromptVersion, Task, Tenant

#: Sort keys the task table accepts, mapped to columns (anything else is refused upstream).
TASK_SORTS: dict[str, Any] = {
    "created": Task.created_at,
    "updated": Task.updated_at,
    "name": Task.name,
    "tenant": Tenant.name,
    "method": Task.method,
    "status": Task.status,
    "progress": Task.progress,
}


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """One line of the task table."""

    id: str
    name: str
    tenant_id: str
    tenant_name: str
    method: str
    status: str
    progress: float
    version: int | None
    run_status: str | None
    run_progress: float
    error: str | None
    val_accuracy: float | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def live(self) -> bool:
        """A run is queued or running (the page keeps polling it)."""
        return self.run_status in ACTIVE_STATUSES


def _row(r: Any) -> TaskRow:
    run = RunView.of(
        status=r.status, progress=r.progress, error=r.error, history=None, version=r.version, training=r.training
    )
    acc = (r.metrics or {}).get("val_accuracy")
    return TaskRow(
        id=r.id,
        name=r.name,
        tenant_id=r.tenant_id,
        tenant_name=r.tenant_name,
        method=r.method,
        status=r.status,
        progress=float(r.progress or 0.0),
        version=r.version,
        run_status=run.status,
        run_progress=run.progress,
        error=run.error,
        val_accuracy=float(acc) if isinstance(acc, (int, float)) else None,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def _task_rows_stmt() -> Select[Any]:
    return select(
        Task.id,
        Task.name,
        Task.tenant_id,
        Tenant.name.label("tenant_name"),
        Task.method,
        Task.status,
        Task.progress,
        Task.version,
        Task.training,
        Task.error,
        Task.metrics,
        Task.created_at,
        Task.updated_at,
    ).join(Tenant, Tenant.id == Task.tenant_id)


def list_task_rows(
    s: Session,
    *,
    tenant_id: str | None = None,
    status: str | None = None,
    method: str | None = None,
    sort: str = "created",
    descending: bool = True,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[TaskRow], int]:
    """``(rows, total)``: one page of tasks over all tenants (or one), filtered by status
    and method, sorted by a ``TASK_SORTS`` key (ties by id), and the number that match."""
    where = []
    if tenant_id:
        where.append(Task.tenant_id == tenant_id)
    if status:
        where.append(Task.status == status)
    if method:
        where.append(Task.method == method)
    col = TASK_SORTS[sort]
    stmt = _task_rows_stmt().where(*where)
    stmt = stmt.order_by(col.desc() if descending else col.asc(), Task.id).limit(limit).offset(offset)
    total_stmt = select(func.count()).select_from(Task).where(*where)
    rows = [_row(r) for r in s.execute(stmt)]
    return rows, int(s.scalar(total_stmt) or 0)


def task_rows_by_id(s: Session, ids: list[str]) -> list[TaskRow]:
    """The table lines of the given tasks (unknown ids are left out)."""
    if not ids:
        return []
    return [_row(r) for r in s.execute(_task_rows_stmt().where(Task.id.in_(ids)))]


def task_methods(s: Session) -> list[str]:
    """Methods that occur in the index (for the table's filter)."""
    return sorted(m for (m,) in s.execute(select(Task.method).distinct()))


def active_run_count(s: Session) -> dict[str, int]:
    """Runs waiting and running, counting retrains of served tasks too: ``{"queued", "running"}``."""
    out = {"queued": 0, "running": 0}
    rows = s.execute(
        select(Task.status, Task.version, Task.training).where(
            Task.status.in_(ACTIVE_STATUSES) | Task.training.is_not(None)
        )
    )
    for status, version, training in rows:
        run = RunView.of(status=status, progress=None, error=None, history=None, version=version, training=training)
        if run.status in out:
            out[run.status] += 1
    return out


def tasks_per_method(s: Session) -> dict[str, int]:
    return {m: int(n) for m, n in s.execute(select(Task.method, func.count()).group_by(Task.method))}


@dataclasses.dataclass(frozen=True)
class TaskDetail:
    task: Task
    tenant_name: str
    class_counts: dict[str, int] | None
    versions: list[PromptVersion]
    #: The served version's config (``Task.served_config``); ``task.config`` is the latest run's.
    served_config: dict[str, Any]


def task_detail(s: Session, task_id: str) -> TaskDetail | None:
    """The task with its tenant's name, its dataset's images per class (None without a
    dataset, e.g. zeroshot) and its prompt versions, oldest first; None if unknown."""
    row = s.execute(select(Task, Tenant.name).join(Tenant, Tenant.id == Task.tenant_id).where(Task.id == task_id)).first()
    if row is None:
        return None
    task, tenant_name = row
    counts = None
    if task.dataset_id is not None:
        ds = s.get(Dataset, task.dataset_id)
        if ds is not None:
            counts = {str(k): int(v) for k, v in (ds.counts or {}).items()}
    versions = list(
        s.scalars(select(PromptVersion).where(PromptVersion.task_id == task.id).order_by(PromptVersion.version))
    )
    return TaskDetail(
        task=task, tenant_name=tenant_name, class_counts=counts, versions=versions, served_config=task.served_config
    )


def tenant_names(s: Session) -> list[tuple[str, str]]:
    """``(id, name)`` of every tenant, by name (for the table's filter)."""
    return [(i, n) for i, n in s.execute(select(Tenant.id, Tenant.name).order_by(Tenant.name))]


def tenant_count(s: Session) -> int:
    return int(s.scalar(select(func.count()).select_from(Tenant)) or 0)


def total_tenant_requests(s: Session) -> int:
    """Requests counted on tenants (``repo.count_request``) since they were created."""
    return int(s.scalar(select(func.coalesce(func.sum(Tenant.request_count), 0))) or 0)
