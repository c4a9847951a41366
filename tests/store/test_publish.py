"""Atomic publication (store.publish) on both databases and both object stores: the object is
written before the row; a failed commit never leaves a row pointing at a missing object."""

from __future__ import annotations

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from store import repo
from store.db import session_scope
from store.models import READY, RUNNING, PromptVersion
from store.objects import ObjectStoreError, sha256_hex
from store.publish import publish_prompt

METRICS = {"val_accuracy": 1.0, "train_seconds": 0.1, "n_train": 4, "n_val": 2}


def running_task(sm):
    with session_scope(sm) as s:
        tenant, _ = repo.create_tenant(s, "acme")
        task = repo.create_task(s, tenant_id=tenant.id, name="t", method="zeroshot", config={}, classes=["a", "b"])
    with session_scope(sm) as s:
        assert repo.claim_run(s, task.id, 1) is not None
    return task


def do_publish(sm, objects, task, data=b"prompt-bytes", attempt=1):
    return publish_prompt(
        sm, objects, task_id=task.id, attempt=attempt, data=data, fingerprint="fp",
        classes=["a", "b"], metrics=METRICS, history=[], confusion=[[1, 0], [0, 1]],
    )  # fmt: skip


def every_row_points_at_an_object(sm, objects):
    with session_scope(sm) as s:
        return all(objects.exists(k) for k in s.scalars(select(PromptVersion.object_key)))


class RecordingStore:
    """Wraps a real store; records whether a PromptVersion row existed when the object was put."""

    def __init__(self, inner, sm, fail=False):
        self.inner, self.sm, self.fail = inner, sm, fail
        self.location = inner.location
        self.rows_at_put: list[int] = []

    def put(self, key, data):
        with session_scope(self.sm) as s:
            self.rows_at_put.append(s.scalar(select(func.count()).select_from(PromptVersion)))
        if self.fail:
            raise ObjectStoreError("object store down")
        self.inner.put(key, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_object_first_then_row(session_factory, object_store):
    task = running_task(session_factory)
    store = RecordingStore(object_store, session_factory)
    pv = do_publish(session_factory, store, task)
    assert store.rows_at_put == [0]
    assert pv.object_key == f"prompts/{task.tenant_id}/{task.id}/{sha256_hex(b'prompt-bytes')}.safetensors"
    assert object_store.get(pv.object_key) == b"prompt-bytes"
    with session_scope(session_factory) as s:
        t = repo.get_task(s, task.id, tenant_id=task.tenant_id)
        assert (t.status, t.version) == (READY, 1)
        served = repo.get_served_version(s, task.id, tenant_id=task.tenant_id)
        assert (served.sha256, served.size) == (sha256_hex(b"prompt-bytes"), 12)


def test_object_store_failure_publishes_nothing(session_factory, object_store):
    task = running_task(session_factory)
    with pytest.raises(ObjectStoreError):
        do_publish(session_factory, RecordingStore(object_store, session_factory, fail=True), task)
    with session_scope(session_factory) as s:
        t = repo.get_task(s, task.id, tenant_id=task.tenant_id)
        assert (t.status, t.version) == (RUNNING, None)
        assert s.scalar(select(func.count()).select_from(PromptVersion)) == 0


def test_failing_commit_leaves_no_row_pointing_at_a_missing_object(session_factory, object_store):
    task = running_task(session_factory)

    def explode(session):
        if any(isinstance(o, PromptVersion) for o in session.new) or session.info.get("publishing"):
            raise RuntimeError("database went away during commit")

    def mark(session, flush_context, instances):
        if any(isinstance(o, PromptVersion) for o in session.new):
            session.info["publishing"] = True

    event.listen(Session, "before_flush", mark)
    event.listen(Session, "before_commit", explode)
    try:
        with pytest.raises(RuntimeError, match="went away"):
            do_publish(session_factory, object_store, task)
    finally:
        event.remove(Session, "before_commit", explode)
        event.remove(Session, "before_flush", mark)
    with session_scope(session_factory) as s:
        t = repo.get_task(s, task.id, tenant_id=task.tenant_id)
        assert (t.status, t.version) == (RUNNING, None)
        assert s.scalar(select(func.count()).select_from(PromptVersion)) == 0
    assert every_row_points_at_an_object(session_factory, object_store)
    # the run can still publish afterwards (same content-addressed key, rewritten)
    assert do_publish(session_factory, object_store, task).version == 1
    assert every_row_points_at_an_object(session_factory, object_store)


def test_duplicate_and_stale_publish_are_no_ops(session_factory, object_store):
    task = running_task(session_factory)
    assert do_publish(session_factory, object_store, task).version == 1
    assert do_publish(session_factory, object_store, task, data=b"other") is None
    assert do_publish(session_factory, object_store, task, attempt=7) is None
    with session_scope(session_factory) as s:
        assert s.scalar(select(func.count()).select_from(PromptVersion)) == 1


def test_delete_task_keys_remove_the_objects(session_factory, object_store):
    task = running_task(session_factory)
    pv = do_publish(session_factory, object_store, task)
    with session_scope(session_factory) as s:
        keys = repo.delete_task(s, task.id, tenant_id=task.tenant_id)
    for key in keys:
        object_store.delete(key)
    assert not object_store.exists(pv.object_key)
