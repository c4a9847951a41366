"""store.samples on both databases and both object stores: a dataset zip expands into samples
once (concurrent expansions commit one set, and no object is written for it), adds count
towards the next run until a run's snapshot takes them, the automatic retrain is requested once
per threshold and never while a run is active, concurrent adds of one picture under two labels
add it once, and the prediction sweep clears the row before it deletes the image."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from psdata import dataset_zip, image_bytes
from sqlalchemy import select

from store import repo
from store import samples as ss
from store.archive import ArchiveLimits
from store.db import session_scope
from store.models import Prediction, Sample, Task
from store.objects import dataset_key, sha256_hex


def _task(sm, objects, *, classes=("cat", "dog"), per_class=3, name="t"):
    data = dataset_zip(classes, per_class=per_class)
    with session_scope(sm) as s:
        tenant, _ = repo.create_tenant(s, f"tenant-{name}-{sha256_hex(data)[:6]}")
        key = dataset_key(tenant.id, sha256_hex(data))
        objects.put(key, data)
        ds = repo.create_dataset(s, tenant_id=tenant.id, object_key=key, sha256=sha256_hex(data), size=len(data),
                                 classes=list(classes), counts={c: per_class for c in classes})
        task = repo.create_task(s, tenant_id=tenant.id, name=name, method="linear-probe", config={},
                                classes=list(classes), dataset_id=ds.id)
        return task.id, tenant.id


def _claim(sm, task_id, attempt, owner="job"):
    with session_scope(sm) as s:
        assert repo.claim_run(s, task_id, attempt, owner=owner) is not None


def _publish(sm, task_id, attempt, owner="job"):
    with session_scope(sm) as s:
        assert repo.publish_version(
            s, task_id, attempt, object_key=f"prompts/x/{task_id}/{attempt}.safetensors", sha256="b" * 64, size=1,
            fingerprint="fp", classes=["cat", "dog"], metrics={}, owner=owner,
        ) is not None


def _add(sm, task_id, tenant_id, label, seeds):
    images = [ss.decoded_image(label, image_bytes(2, seed=x), name=f"images[{i}]", max_pixels=1 << 24)
              for i, x in enumerate(seeds)]
    with session_scope(sm) as s:
        plan = ss.plan_additions(s, task_id, images)
        return ss.insert_samples(s, task_id, plan.new, tenant_id=tenant_id, source=ss.UPLOAD)


def _row(sm, task_id):
    with session_scope(sm) as s:
        return s.execute(select(Task.samples_seeded, Task.samples_since_run, Task.run_status, Task.attempt)
                         .where(Task.id == task_id)).first()


def test_snapshot_hash_and_class_order():
    pairs = [("dog", "b" * 64), ("cat", "a" * 64), ("café", "c" * 64)]
    expected = __import__("hashlib").sha256(
        "".join(f"{label}\t{digest}\n" for label, digest in sorted(pairs)).encode("utf-8")).hexdigest()
    assert ss.snapshot_hash(pairs) == ss.snapshot_hash(list(reversed(pairs))) == expected
    assert ss.order_classes(["dog", "cat", "bird"], ["cat", "owl", "dog", "ant"]) == ["dog", "cat", "ant", "owl"]


def test_expansion_is_once_and_stores_no_object(session_factory, object_store):
    sm = session_factory
    task_id, tenant_id = _task(sm, object_store)
    before = {i.key for i in object_store.list("")}
    errors: list[BaseException] = []

    def seed():
        try:
            assert ss.ensure_seeded(sm, object_store, task_id, limits=ArchiveLimits())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=seed) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_scope(sm) as s:
        snap = ss.current_snapshot(s, task_id, tenant_id=tenant_id)
    assert len(snap.items) == 6 and snap.counts == {"cat": 3, "dog": 3} and snap.classes == ["cat", "dog"]
    assert all(i.entry is not None and i.object_key.startswith("datasets/") for i in snap.items)
    assert {i.key for i in object_store.list("")} == before
    assert _row(sm, task_id).samples_seeded is True
    # the images read back from the zip are the ones hashed
    got: list[tuple[str, str]] = []
    assert ss.load_images(object_store, snap, max_pixels=1 << 24,
                          on_image=lambda img, label: (got.append((label, img.mode)), img.close()))
    assert [g[0] for g in got] == [i.label for i in snap.items]


def test_adds_count_towards_the_next_run_and_auto_retrain_once(session_factory, object_store):
    sm = session_factory
    task_id, tenant_id = _task(sm, object_store)
    ss.ensure_seeded(sm, object_store, task_id, limits=ArchiveLimits())
    _claim(sm, task_id, 1)
    with session_scope(sm) as s:
        snap = ss.take_snapshot(s, task_id, 1, owner="job")
    assert snap is not None and len(snap.items) == 6
    with session_scope(sm) as s:
        assert ss.take_snapshot(s, task_id, 1, owner="someone else") is None  # not its run
    _add(sm, task_id, tenant_id, "owl", [1, 2])  # during the run: towards the next
    _publish(sm, task_id, 1)
    with session_scope(sm) as s:
        assert ss.set_retrain_after_samples(s, task_id, 3, tenant_id=tenant_id)
        assert not ss.set_retrain_after_samples(s, task_id, 3, tenant_id="other")
    with session_scope(sm) as s:
        assert ss.request_auto_retrain(s, task_id, tenant_id=tenant_id) is None  # 2 < 3
    _add(sm, task_id, tenant_id, "owl", [3])
    with session_scope(sm) as s:
        assert ss.request_auto_retrain(s, task_id, tenant_id="other") is None
        task = ss.request_auto_retrain(s, task_id, tenant_id=tenant_id)
        assert task is not None and task.attempt == 2 and task.run_status == "queued"
    with session_scope(sm) as s:  # a run is queued: never a second
        assert ss.request_auto_retrain(s, task_id, tenant_id=tenant_id) is None
    _add(sm, task_id, tenant_id, "owl", [4, 5, 6])
    assert _row(sm, task_id).samples_since_run == 6
    _claim(sm, task_id, 2)
    with session_scope(sm) as s:
        snap = ss.take_snapshot(s, task_id, 2, owner="job")
    assert snap.counts == {"cat": 3, "dog": 3, "owl": 6} and snap.classes == ["cat", "dog", "owl"]
    assert _row(sm, task_id).samples_since_run == 0
    _add(sm, task_id, tenant_id, "owl", [7, 8, 9])  # during run 2: the one after it
    with session_scope(sm) as s:
        assert ss.request_auto_retrain(s, task_id, tenant_id=tenant_id) is None  # run 2 is running
    _publish(sm, task_id, 2)
    with session_scope(sm) as s:
        task = ss.request_auto_retrain(s, task_id, tenant_id=tenant_id)
        assert task is not None and task.attempt == 3
    with session_scope(sm) as s:
        versions = repo.list_versions(s, task_id, tenant_id=tenant_id)
    assert len(versions) == 2


def test_the_same_picture_added_at_once_under_two_labels_is_added_once(session_factory, object_store):
    sm = session_factory
    task_id, tenant_id = _task(sm, object_store)
    ss.ensure_seeded(sm, object_store, task_id, limits=ArchiveLimits())
    results: list[str] = []
    barrier = threading.Barrier(2)

    def add(label):
        img = ss.decoded_image(label, image_bytes(3, seed=77), name="images[0]", max_pixels=1 << 24)
        try:
            with session_scope(sm) as s:
                plan = ss.plan_additions(s, task_id, [img])
                barrier.wait(10)  # both checked the set before either writes
                ss.insert_samples(s, task_id, plan.new, tenant_id=tenant_id, source=ss.UPLOAD)
            results.append("added")
        except ss.SamplesChanged:
            results.append("changed")

    threads = [threading.Thread(target=add, args=(label,)) for label in ("owl", "bat")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["added", "changed"]
    with session_scope(sm) as s:
        labels = [r.label for r in s.scalars(select(Sample).where(Sample.task_id == task_id, Sample.source == "upload"))]
        assert len(labels) == 1
        # a later add of it under the other label is refused, naming the sample
        other = "bat" if labels[0] == "owl" else "owl"
        img = ss.decoded_image(other, image_bytes(3, seed=77), name="images[0]", max_pixels=1 << 24)
        with pytest.raises(ss.SampleError, match=f"of class '{labels[0]}'"):
            ss.plan_additions(s, task_id, [img])
    assert _row(sm, task_id).samples_since_run == 1


def test_a_new_dataset_replaces_the_samples(session_factory, object_store):
    sm = session_factory
    task_id, tenant_id = _task(sm, object_store)
    ss.ensure_seeded(sm, object_store, task_id, limits=ArchiveLimits())
    _add(sm, task_id, tenant_id, "owl", [1])
    data = dataset_zip(("fox", "hen"), per_class=2, seed=9)
    with session_scope(sm) as s:
        key = dataset_key(tenant_id, sha256_hex(data))
        object_store.put(key, data)
        ds = repo.create_dataset(s, tenant_id=tenant_id, object_key=key, sha256=sha256_hex(data), size=len(data),
                                 classes=["fox", "hen"], counts={"fox": 2, "hen": 2})
        with pytest.raises(repo.TaskStateError):  # its first run is still queued
            repo.request_retrain(s, task_id, tenant_id=tenant_id, dataset_id=ds.id)
    with session_scope(sm) as s:
        repo.request_cancel(s, task_id, tenant_id=tenant_id)
    with session_scope(sm) as s:
        repo.request_retrain(s, task_id, tenant_id=tenant_id, dataset_id=ds.id)
    row = _row(sm, task_id)
    assert row.samples_seeded is False and row.samples_since_run == 0
    with session_scope(sm) as s:
        assert ss.current_snapshot(s, task_id, tenant_id=tenant_id).items == ()
        with pytest.raises(ss.SamplesChanged):  # an add racing with the replacement writes nothing
            ss.insert_samples(s, task_id, [ss.decoded_image("owl", image_bytes(2, seed=2), name="i",
                                                            max_pixels=1 << 24)], tenant_id=tenant_id, source="upload")
    ss.ensure_seeded(sm, object_store, task_id, limits=ArchiveLimits())
    with session_scope(sm) as s:
        assert ss.current_snapshot(s, task_id, tenant_id=tenant_id).counts == {"fox": 2, "hen": 2}


def test_sweep_clears_the_row_before_the_image(session_factory, object_store):
    sm = session_factory
    task_id, tenant_id = _task(sm, object_store)
    now = dt.datetime.now(dt.timezone.utc)
    ids = ss.keep_predictions(sm, object_store, tenant_id=tenant_id, task_id=task_id, version=1,
                              images=[b"one", b"two"], tops=[("cat", 0.9), (None, None)], retention_s=60, now=now)
    assert ids is not None and len(ids) == 2
    assert ss.keep_predictions(sm, object_store, tenant_id=tenant_id, task_id="0" * 32, version=1, images=[b"x"],
                               tops=[(None, None)], retention_s=60) is None
    assert len(list(object_store.list("predictions/"))) == 2  # the refused keep left nothing
    report = ss.sweep_predictions(sm, object_store, record_s=60, now=now + dt.timedelta(seconds=30))
    assert report.images == [] and report.records == 0
    report = ss.sweep_predictions(sm, object_store, record_s=60, now=now + dt.timedelta(seconds=61))
    assert sorted(report.images) == sorted(ss.prediction_key(tenant_id, task_id, i) for i in ids)
    assert list(object_store.list("predictions/")) == []
    with session_scope(sm) as s:
        rows = list(s.scalars(select(Prediction).where(Prediction.task_id == task_id)))
        assert [r.object_key for r in rows] == [None, None]
        with pytest.raises(ss.PredictionGone, match="expired at") as info:
            ss.live_prediction(s, task_id, ids[0], tenant_id=tenant_id)
        assert info.value.expired_at == now + dt.timedelta(seconds=60)
    report = ss.sweep_predictions(sm, object_store, record_s=60, now=now + dt.timedelta(seconds=121))
    assert report.records == 2
