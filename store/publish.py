"""Atomic publication of a prompt: the object first, then one transaction for the row.

Readers only find a prompt through ``task.version`` -> ``PromptVersion.object_key``, and
that row is committed only after the object is fully stored, so no reader ever sees a
half-written prompt or a row pointing at a missing object. If the commit fails, the
object stays behind unreferenced (harmless; its key is content-addressed, so it may be the
very object a concurrent duplicate publish committed, which is why it is not deleted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from store import repo
from store.db import session_scope
from store.models import PromptVersion
from store.objects import ObjectStore, prompt_key, sha256_hex


def publish_prompt(
    sm: sessionmaker[Session],
    objects: ObjectStore,
    *,
    task_id: str,
    attempt: int,
    data: bytes,
    fingerprint: str,
    classes: Sequence[str],
    metrics: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    confusion: list[list[int]] | None = None,
) -> PromptVersion | None:
    """Store ``data`` under ``prompts/{tenant}/{task}/{sha256}.safetensors`` and then publish it
    as the task's next version. Returns the new ``PromptVersion``, or None when the run is not
    current any more (stale attempt, deleted, cancelled, already published) — a no-op, so a
    duplicate delivery never double-publishes. Object store and database errors propagate."""
    with session_scope(sm) as s:
        task = repo.get_task_for_job(s, task_id)
        if task is None or task.attempt != attempt:
            return None
        tenant_id = task.tenant_id
    digest = sha256_hex(data)
    key = prompt_key(tenant_id, task_id, digest)
    objects.put(key, data)
    try:
        with session_scope(sm) as s:
            return repo.publish_version(
                s,
                task_id,
                attempt,
                object_key=key,
                sha256=digest,
                size=len(data),
                fingerprint=fingerprint,
                classes=classes,
                metrics=metrics,
                history=history,
                confusion=confusion,
            )
    except IntegrityError:  # a concurrent duplicate committed the same version first
        return None
