"""Atomic publication of a prompt: the object first, then one transaction for the row.

Readers only find a prompt through ``task.version`` -> ``PromptVersion.object_key``, and
that row is committed only after the object is fully stored, so no reader ever sees a
half-written prompt or a row pointing at a missing object.

A publish that loses its race (the row is refused: the task was deleted, retrained or
cancelled meanwhile, or a duplicate delivery committed first) removes what it wrote or leaves
it to the garbage collector: when the task is gone no row can ever refer to its
``prompts/{tenant}/{task}/`` keys, so the object is deleted at once; otherwise the key is
content-addressed and may be the very object another run of the task is about to commit (or
has committed), so it is left to ``store.consistency.collect``, which deletes it after the
grace period if no row refers to it by then.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from store import repo
from store.db import session_scope
from store.models import PromptVersion
from store.objects import ObjectStore, prompt_key, sha256_hex

log = logging.getLogger("promptstore.publish")


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
    owner: str | None = None,
    keep_versions: int = 0,
    method: str | None = None,
    samples: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> PromptVersion | None:
    """Store ``data`` under ``prompts/{tenant}/{task}/{sha256}.safetensors`` and then publish it
    as the task's next version. Returns the new ``PromptVersion``, or None when the run is not
    current any more (stale attempt, deleted, cancelled, already published) — a no-op, so a
    duplicate delivery never double-publishes; with ``owner`` (the job's lease owner) also when
    the run was taken over by another execution. ``samples``: the snapshot of samples the run
    trained on, recorded on the version (``repo.publish_version``). Object store and database
    errors propagate."""
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
            pv = repo.publish_version(
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
                owner=owner,
                keep_versions=keep_versions,
                method=method,
                samples=samples,
                config=config,
            )
    except IntegrityError:  # a concurrent duplicate committed the same version first
        pv = None
    if pv is None:
        _drop_if_task_gone(sm, objects, task_id, key)
    return pv


def _drop_if_task_gone(sm: sessionmaker[Session], objects: ObjectStore, task_id: str, key: str) -> None:
    """After a refused publish: delete the object when its task no longer exists (nothing can
    refer to it again); else leave it to the garbage collector (see the module docstring)."""
    try:
        with session_scope(sm) as s:
            gone = repo.get_task_for_job(s, task_id) is None
        if gone:
            objects.delete(key)
    except Exception as exc:  # the collector removes it later
        log.warning("publish of task %s refused; its object %s is left to the garbage collector (%s)",
                    task_id, key, type(exc).__name__)
