"""Keyset pagination of the long lists: a tenant's tasks and the tenants (admin).

A page is read after the sort key of the previous page's last item, never at an offset, so
a page costs the same at the start and at the end of 10,000 tasks and nothing is repeated or
skipped while items are added (or removed) between pages:

- tasks: newest first, ``(created_at DESC, id DESC)``, within one tenant: the index
  ``ix_tasks_tenant_id_created_at`` (tenant_id, created_at) serves the range and the order
  (ties on created_at, rare, are sorted by id within them);
- tenants: oldest first, ``(created_at, id)``.

The cursor given out is opaque to clients: url-safe base64 (no padding) of the JSON
``{"v": CURSOR_VERSION, "l": list, "t": created_at, "i": id}`` of the last item's sort key.
``InvalidListing`` names the parameter and what is accepted (HTTP 422 at the API).

``count`` is the total number of items matching the filters (all pages), counted in the same
transaction as the page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from store.models import TASK_STATUSES, Task, Tenant

T = TypeVar("T")

#: Bumped when the cursor's content changes; an older cursor is then refused as malformed.
CURSOR_VERSION = 1
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Bound of a ``name_prefix`` (names are at most 200 characters).
MAX_PREFIX_CHARS = 200
#: Longest cursor accepted (a real one is about 120 characters).
MAX_CURSOR_CHARS = 512

TASKS = "tasks"
TENANTS = "tenants"

#: The columns of a task list item: no history, confusion, training or config (``TASK_ROW``).
TASK_ROW = (
    Task.id, Task.name, Task.method, Task.status, Task.progress, Task.classes, Task.metrics, Task.error,
    Task.version, Task.created_at, Task.updated_at, Task.config, Task.dataset_id,
)


@dataclasses.dataclass(frozen=True)
class PageExtras:
    """What a page of ``TASK_ROW`` rows needs from other tables, read in two small queries."""

    #: task id -> the served version's config (absent: the task's own, the pending run's).
    configs: dict[str, dict[str, Any]]
    #: dataset id -> what its upload dropped or ignored (the task's ``warnings``).
    warnings: dict[str, list[Any]]


def page_extras(s: Session, rows: Sequence[Any]) -> PageExtras:
    """The served versions' configs (by primary-key pairs) and the datasets' warnings of the
    rows of one page."""
    from store.models import Dataset, PromptVersion

    configs: dict[str, dict[str, Any]] = {}
    pairs = [(r.id, r.version) for r in rows if r.version is not None]
    if pairs:
        found = s.execute(
            select(PromptVersion.task_id, PromptVersion.config).where(
                or_(*(and_(PromptVersion.task_id == t, PromptVersion.version == v) for t, v in pairs))
            )
        )
        configs = {t: c for t, c in found if isinstance(c, dict)}
    warnings: dict[str, list[Any]] = {}
    dataset_ids = sorted({r.dataset_id for r in rows if r.dataset_id is not None})
    if dataset_ids:
        found = s.execute(select(Dataset.id, Dataset.warnings).where(Dataset.id.in_(dataset_ids)))
        warnings = {d: w for d, w in found if isinstance(w, list)}
    return PageExtras(configs=configs, warnings=warnings)


class InvalidListing(ValueError):
    """A list parameter that cannot be used; the message names it and what is accepted."""


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    #: Items matching the filters on every page.
    count: int
    #: Pass it back as ``cursor`` for the next page; None on the last page.
    next_cursor: str | None


# --------------------------------------------------------------------------- parameters


def check_limit(limit: int | str | None) -> int:
    """``limit`` as an int in [1, MAX_LIMIT] (DEFAULT_LIMIT when None)."""
    if limit is None or limit == "":
        return DEFAULT_LIMIT
    if isinstance(limit, str):
        try:
            limit = int(limit.strip())
        except ValueError:
            raise InvalidListing(
                f"limit: {limit[:40]!r} is not an integer; send 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})"
            ) from None
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidListing(f"limit: {limit} is out of range; send 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})")
    return limit


def check_statuses(status: str | Sequence[str] | None) -> tuple[str, ...]:
    """Task statuses to keep: a status, a comma-separated list or a sequence; () for all."""
    if status is None:
        return ()
    raw = [status] if isinstance(status, str) else list(status)
    wanted = [p.strip() for r in raw for p in str(r).split(",") if p.strip()]
    for w in wanted:
        if w not in TASK_STATUSES:
            raise InvalidListing(
                f"status: {w[:40]!r} is not a task status; accepted: {', '.join(TASK_STATUSES)} "
                "(several separated by commas)"
            )
    return tuple(dict.fromkeys(wanted))


def check_prefix(name_prefix: str | None) -> str | None:
    """The prefix (None or "" for none); at most MAX_PREFIX_CHARS characters."""
    if not name_prefix:
        return None
    if len(name_prefix) > MAX_PREFIX_CHARS:
        raise InvalidListing(
            f"name_prefix: {len(name_prefix)} characters, over the limit of {MAX_PREFIX_CHARS} (names are at most 200)"
        )
    return name_prefix


_BAD_CURSOR = (
    "cursor: not a cursor of this list; pass the next_cursor of the previous page unchanged, "
    "or omit cursor for the first page"
)


def encode_cursor(kind: str, created_at: dt.datetime, item_id: str) -> str:
    """The opaque cursor after the item with sort key ``(created_at, item_id)`` of list ``kind``."""
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=dt.timezone.utc)
    body = {"v": CURSOR_VERSION, "l": kind, "t": created_at.astimezone(dt.timezone.utc).isoformat(), "i": item_id}
    raw = json.dumps({**body, "c": _checksum(body)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _checksum(body: dict[str, Any]) -> str:
    """A check of the cursor's fields, so that an edited cursor is refused rather than read as
    another position. Not a secret: every list is filtered by the caller's tenant, so a forged
    cursor only moves within what the caller may read anyway."""
    canonical = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.blake2b(canonical, digest_size=8, person=b"ps-cursor").hexdigest()


def decode_cursor(kind: str, cursor: str) -> tuple[dt.datetime, str]:
    """``(created_at, id)`` of a cursor of list ``kind``; InvalidListing naming ``cursor`` else."""
    if not isinstance(cursor, str) or not 1 <= len(cursor) <= MAX_CURSOR_CHARS:
        raise InvalidListing(_BAD_CURSOR)
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        data = json.loads(text)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidListing(_BAD_CURSOR) from None
    if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION or data.get("l") != kind:
        raise InvalidListing(_BAD_CURSOR)
    body = {k: v for k, v in data.items() if k != "c"}
    if set(data) != {"v", "l", "t", "i", "c"} or not hmac.compare_digest(str(data["c"]), _checksum(body)):
        raise InvalidListing(_BAD_CURSOR)  # edited: not a position this list gave out
    stamp, item_id = data.get("t"), data.get("i")
    if not isinstance(stamp, str) or not isinstance(item_id, str) or not 1 <= len(item_id) <= 64:
        raise InvalidListing(_BAD_CURSOR)
    try:
        created_at = dt.datetime.fromisoformat(stamp)
    except ValueError:
        raise InvalidListing(_BAD_CURSOR) from None
    if created_at.tzinfo is None:
        raise InvalidListing(_BAD_CURSOR)
    return created_at.astimezone(dt.timezone.utc), item_id


def _name_starts(column: Any, prefix: str) -> Any:
    """``column`` starts with ``prefix``, literally (LIKE wildcards escaped) and case-sensitively
    on both databases (SQLite's LIKE ignores ASCII case: the substring test decides)."""
    return and_(column.startswith(prefix, autoescape=True), func.substr(column, 1, len(prefix)) == prefix)


# --------------------------------------------------------------------------- tasks


def task_filters(
    tenant_id: str,
    *,
    status: str | Sequence[str] | None = None,
    method: str | None = None,
    name_prefix: str | None = None,
) -> list[Any]:
    """WHERE conditions of a tenant's task list (parameters checked: InvalidListing)."""
    conds: list[Any] = [Task.tenant_id == tenant_id]
    statuses = check_statuses(status)
    if statuses:
        conds.append(Task.status == statuses[0] if len(statuses) == 1 else Task.status.in_(statuses))
    if method:
        conds.append(Task.method == method)
    prefix = check_prefix(name_prefix)
    if prefix is not None:
        conds.append(_name_starts(Task.name, prefix))
    return conds


def _task_after(created_at: dt.datetime, task_id: str) -> Any:
    """Strictly after ``(created_at, task_id)`` in the order (created_at DESC, id DESC); the
    redundant ``created_at <=`` bounds the index range."""
    return and_(
        Task.created_at <= created_at,
        or_(Task.created_at < created_at, and_(Task.created_at == created_at, Task.id < task_id)),
    )


def task_page_query(
    tenant_id: str,
    *,
    limit: int | str | None = None,
    cursor: str | None = None,
    status: str | Sequence[str] | None = None,
    method: str | None = None,
    name_prefix: str | None = None,
    columns: Sequence[Any] = TASK_ROW,
) -> Any:
    """The SELECT of one page (``limit`` + 1 rows: the extra one says whether a next page
    exists); for ``task_page`` and for reading its query plan."""
    n = check_limit(limit)
    conds = task_filters(tenant_id, status=status, method=method, name_prefix=name_prefix)
    if cursor:
        conds.append(_task_after(*decode_cursor(TASKS, cursor)))
    return select(*columns).where(*conds).order_by(Task.created_at.desc(), Task.id.desc()).limit(n + 1)


def task_page(
    s: Session,
    *,
    tenant_id: str,
    limit: int | str | None = None,
    cursor: str | None = None,
    status: str | Sequence[str] | None = None,
    method: str | None = None,
    name_prefix: str | None = None,
) -> Page[Any]:
    """One page of the tenant's tasks, newest first, as rows of ``TASK_ROW`` (attribute
    access: ``row.id``, ``row.name``, ...), with the total matching the filters."""
    n = check_limit(limit)
    stmt = task_page_query(
        tenant_id, limit=n, cursor=cursor, status=status, method=method, name_prefix=name_prefix
    )
    rows = list(s.execute(stmt).all())
    total = s.scalar(
        select(func.count()).select_from(Task).where(
            *task_filters(tenant_id, status=status, method=method, name_prefix=name_prefix)
        )
    )
    more = len(rows) > n
    rows = rows[:n]
    next_cursor = encode_cursor(TASKS, rows[-1].created_at, rows[-1].id) if more and rows else None
    return Page(items=rows, count=int(total or 0), next_cursor=next_cursor)


# --------------------------------------------------------------------------- tenants


@dataclasses.dataclass(frozen=True)
class TenantRow:
    """A tenant with its counters (``repo.TenantSummary`` has the same fields)."""

    id: str
    name: str
    created_at: dt.datetime
    task_count: int
    request_count: int
    last_request_at: dt.datetime | None


def tenant_filters(*, name_prefix: str | None = None) -> list[Any]:
    prefix = check_prefix(name_prefix)
    return [] if prefix is None else [_name_starts(Tenant.name, prefix)]


def task_counts(s: Session, tenant_ids: Sequence[str]) -> dict[str, int]:
    """Tasks per tenant, for these tenants only (served by the tasks' tenant index)."""
    if not tenant_ids:
        return {}
    rows = s.execute(
        select(Task.tenant_id, func.count()).where(Task.tenant_id.in_(list(tenant_ids))).group_by(Task.tenant_id)
    ).all()
    return {tid: int(n) for tid, n in rows}


def tenant_page(
    s: Session,
    *,
    limit: int | str | None = None,
    cursor: str | None = None,
    name_prefix: str | None = None,
) -> Page[TenantRow]:
    """One page of the tenants, oldest first, with their task and request counters."""
    n = check_limit(limit)
    conds = tenant_filters(name_prefix=name_prefix)
    if cursor:
        created_at, tenant_id = decode_cursor(TENANTS, cursor)
        conds.append(and_(
            Tenant.created_at >= created_at,
            or_(Tenant.created_at > created_at, and_(Tenant.created_at == created_at, Tenant.id > tenant_id)),
        ))
    tenants = list(
        s.execute(
            select(Tenant.id, Tenant.name, Tenant.created_at, Tenant.request_count, Tenant.last_request_at)
            .where(*conds)
            .order_by(Tenant.created_at, Tenant.id)
            .limit(n + 1)
        ).all()
    )
    total = s.scalar(select(func.count()).select_from(Tenant).where(*tenant_filters(name_prefix=name_prefix)))
    more = len(tenants) > n
    tenants = tenants[:n]
    counts = task_counts(s, [t.id for t in tenants])
    items = [
        TenantRow(
            id=t.id, name=t.name, created_at=t.created_at, task_count=counts.get(t.id, 0),
            request_count=int(t.request_count or 0), last_request_at=t.last_request_at,
        )
        for t in tenants
    ]
    next_cursor = encode_cursor(TENANTS, tenants[-1].created_at, tenants[-1].id) if more and tenants else None
    return Page(items=items, count=int(total or 0), next_cursor=next_cursor)
