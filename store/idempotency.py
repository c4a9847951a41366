"""Idempotency keys: a job-creating request (``POST /v1/tasks``, ``retrain``) sent again with
the same ``Idempotency-Key`` gets the first answer instead of a second task.

The key and the answer are written in the transaction that creates the task (or the run),
unique per ``(tenant_id, key)`` in the database: so the guarantee holds across API replicas,
and of two concurrent requests with one key exactly one commits; the other rolls back its
rows and answers what the first did. A key is remembered ``idempotency_key_ttl`` seconds
(default 24 h); the same key with another request (other fields, path or file) is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from store.db import utcnow
from store.models import IdempotencyKey

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,%d}$" % MAX_KEY_LENGTH)


class InvalidIdempotencyKey(ValueError):
    """The header is not 1-255 visible ASCII characters."""


class KeyReused(Exception):
    """The key was used, within its retention, for another request."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"{HEADER} {key!r} was already used for another request (other fields, file or path); "
            "send a new key for a new request, the same key only to retry the same request"
        )


def check_key(raw: str) -> str:
    if not _KEY_RE.match(raw):
        raise InvalidIdempotencyKey(
            f"{HEADER} must be 1-{MAX_KEY_LENGTH} visible ASCII characters (a UUID, say), without spaces"
        )
    return raw


def fingerprint(method: str, path: str, fields: dict[str, Any]) -> str:
    """sha256 hex of the request: its method, path and the fields that decide what it does
    (a file as its sha256)."""
    doc = json.dumps({"method": method.upper(), "path": path, "fields": fields}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def lookup(s: Session, tenant_id: str, key: str, fp: str, *, ttl_s: float) -> IdempotencyKey | None:
    """The remembered answer for ``key`` (None if unknown or expired); ``KeyReused`` when the
    key was used for a request with another fingerprint."""
    row = s.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key))
    if row is None or row.created_at < utcnow() - dt.timedelta(seconds=ttl_s):
        return None
    if row.fingerprint != fp:
        raise KeyReused(key)
    return row


def record(
    s: Session, tenant_id: str, key: str, fp: str, *, status_code: int, response: dict[str, Any],
    task_id: str | None, ttl_s: float,
) -> None:
    """Remember the answer, in the caller's transaction (flushed: a concurrent request that
    holds the same key makes this raise ``IntegrityError``). Expired keys are deleted first."""
    s.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - dt.timedelta(seconds=ttl_s)))
    s.add(IdempotencyKey(
        tenant_id=tenant_id, key=key, fingerprint=fp, status_code=status_code, response=response, task_id=task_id,
    ))
    s.flush()
