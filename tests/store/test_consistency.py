"""Objects and rows stay consistent (store.consistency, docs/operations.md): on both databases
and both object stores, the check lists orphans and missing objects, the garbage collector
deletes only unreferenced objects older than the grace, and the races of the kind "a shared
object deleted while still referenced / an object written without its row" leave nothing
missing and nothing behind once collected:

- delete a task while another is being created from the same zip (the shared dataset stays);
- a publish whose task is deleted meanwhile (its object goes at once);
- a publish refused because its run went stale (its object goes with the collector);
- an upload whose row never commits (collected after the grace, never before).

Every scenario ends with ``assert_consistent``: nothing missing, and every orphan collected
once the grace is made 0."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from store import repo
from store.consistency import PeriodicCollector, check, collect
from store.db import session_scope
from store.models import Dataset
from store.objects import dataset_key, sha256_hex
from store.publish import publish_prompt

ZIP = b"PK-pretend-zip-bytes"
METRICS = {"val_accuracy": 1.0, "train_seconds": 0.1, "n_train": 4, "n_val": 2}
DAY = 24 * 3600.0


def assert_consistent(sm, objects):
    """fsck after a scenario: nothing missing; young orphans only, all gone after a GC with
    the grace made 0. Returns the first report."""
    first = check(sm, objects, grace_s=DAY)
    assert first.missing == [], first.missing
    assert all(not o.collectable for o in first.orphans), first.orphans
    collect(sm, objects, grace_s=0)
    after = check(sm, objects, grace_s=0)
    assert (after.orphans, after.missing) == ([], []), after.as_json()
    return first


def new_tenant(sm, name="acme"):
    with session_scope(sm) as s:
        tenant, _ = repo.create_tenant(s, name)
    return tenant.id


def create_from_zip(sm, objects, tenant_id, data=ZIP, name="t"):
    """What POST /v1/tasks does: the object, then the dataset and task rows in one commit."""
    key = dataset_key(tenant_id, sha256_hex(data))
    objects.put(key, data)
    with session_scope(sm) as s:
        ds = repo.create_dataset(s, tenant_id=tenant_id, object_key=key, sha256=sha256_hex(data), size=len(data),
                                 classes=["a", "b"], counts={"a": 1, "b": 1})  # fmt: skip
        task = repo.create_task(s, tenant_id=tenant_id, name=name, method="coop", config={}, classes=["a", "b"],
                                dataset_id=ds.id)  # fmt: skip
    return task.id, key


def delete_task(sm, objects, task_id, tenant_id):
    """What DELETE /v1/tasks/{id} does: the rows (committed), then the returned keys."""
    with session_scope(sm) as s:
        keys = repo.delete_task(s, task_id, tenant_id=tenant_id)
    for key in keys or []:
        objects.delete(key)
    return keys


def test_delete_during_create_from_the_same_zip_loses_nothing(session_factory, object_store):
    sm = session_factory
    tenant_id = new_tenant(sm)
    x, key = create_from_zip(sm, object_store, tenant_id, name="x")
    # Y is being created from the same zip: its object is (re)written, its rows not yet committed ...
    object_store.put(key, ZIP)
    # ... when X is deleted (X's dataset row goes: no committed task uses it) ...
    keys = delete_task(sm, object_store, x, tenant_id)
    assert key not in keys
    # ... and Y commits: its dataset's object is there.
    with session_scope(sm) as s:
        ds = repo.create_dataset(s, tenant_id=tenant_id, object_key=key, sha256=sha256_hex(ZIP), size=len(ZIP),
                                 classes=["a", "b"], counts={"a": 1, "b": 1})  # fmt: skip
        repo.create_task(s, tenant_id=tenant_id, name="y", method="coop", config={}, classes=["a", "b"],
                         dataset_id=ds.id)  # fmt: skip
    assert object_store.get(key) == ZIP
    report = assert_consistent(sm, object_store)
    assert report.orphans == []
    assert object_store.get(key) == ZIP  # referenced: the collector kept it, grace 0 or not


def test_two_tasks_share_a_dataset_one_is_deleted(session_factory, object_store):
    sm = session_factory
    tenant_id = new_tenant(sm)
    a, key = create_from_zip(sm, object_store, tenant_id, name="a")
    b, key_b = create_from_zip(sm, object_store, tenant_id, name="b")
    assert key == key_b
    delete_task(sm, object_store, a, tenant_id)
    collect(sm, object_store, grace_s=0)
    assert object_store.get(key) == ZIP  # b still trains from it
    with session_scope(sm) as s:
        assert repo.get_task(s, b, tenant_id=tenant_id).dataset.object_key == key
    # The last task using it goes: its dataset row goes, the zip stays until the collector's pass.
    delete_task(sm, object_store, b, tenant_id)
    assert object_store.exists(key)
    with session_scope(sm) as s:
        assert s.scalars(select(Dataset)).all() == []
    report = assert_consistent(sm, object_store)
    assert [o.key for o in report.orphans] == [key]
    assert not object_store.exists(key)


def _running(sm, tenant_id, name="p"):
    with session_scope(sm) as s:
        task = repo.create_task(s, tenant_id=tenant_id, name=name, method="zeroshot", config={}, classes=["a", "b"])
    with session_scope(sm) as s:
        assert repo.claim_run(s, task.id, 1) is not None
    return task.id


class HookedStore:
    """A real store whose ``put`` runs ``after_put(key)`` once the object is written: the
    moment a concurrent request or job acts in the race."""

    def __init__(self, inner, after_put):
        self.inner, self.after_put = inner, after_put
        self.location = inner.location

    def put(self, key, data):
        self.inner.put(key, data)
        self.after_put(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _publish(sm, objects, task_id, data=b"prompt", attempt=1):
    return publish_prompt(sm, objects, task_id=task_id, attempt=attempt, data=data, fingerprint="fp",
                          classes=["a", "b"], metrics=METRICS)  # fmt: skip


def test_a_task_deleted_while_its_job_publishes_leaves_no_object(session_factory, object_store):
    sm = session_factory
    tenant_id = new_tenant(sm)
    task_id = _running(sm, tenant_id)
    written = []

    def delete_now(key):
        written.append(key)
        delete_task(sm, object_store, task_id, tenant_id)

    assert _publish(sm, HookedStore(object_store, delete_now), task_id) is None
    assert written and not object_store.exists(written[0])
    assert assert_consistent(sm, object_store).orphans == []


def test_a_publish_refused_as_stale_is_collected_and_a_later_run_keeps_its_object(session_factory, object_store):
    sm = session_factory
    tenant_id = new_tenant(sm)
    task_id = _running(sm, tenant_id)

    def run_fails_meanwhile(key):
        with session_scope(sm) as s:
            assert repo.fail_run(s, task_id, 1, error="lost its worker")

    assert _publish(sm, HookedStore(object_store, run_fails_meanwhile), task_id) is None
    key = f"prompts/{tenant_id}/{task_id}/{sha256_hex(b'prompt')}.safetensors"
    report = check(sm, object_store, grace_s=DAY)
    assert [(o.key, o.collectable) for o in report.orphans] == [(key, False)]  # young: kept for now
    assert collect(sm, object_store, grace_s=DAY).collected == []
    assert object_store.exists(key)
    # the retry publishes the very same bytes under the same key: the row keeps it
    with session_scope(sm) as s:
        assert repo.request_retrain(s, task_id, tenant_id=tenant_id) is not None
    with session_scope(sm) as s:
        assert repo.claim_run(s, task_id, 2) is not None
    assert _publish(sm, object_store, task_id, attempt=2).version == 1
    assert assert_consistent(sm, object_store).orphans == []
    assert object_store.exists(key)


def test_an_upload_whose_row_never_commits_is_collected_after_the_grace(session_factory, object_store):
    sm = session_factory
    tenant_id = new_tenant(sm)
    key = dataset_key(tenant_id, sha256_hex(b"refused"))
    object_store.put(key, b"refused")  # e.g. a retrain refused with 409 after its upload
    report = check(sm, object_store, grace_s=DAY)
    assert [(o.key, o.size, o.collectable) for o in report.orphans] == [(key, 7, False)]
    assert report.missing == []
    assert collect(sm, object_store, grace_s=DAY).collected == []
    assert object_store.exists(key)
    # as the grace is exceeded (a check "from the future") it becomes collectable
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=DAY + 60)
    assert [o.collectable for o in check(sm, object_store, grace_s=DAY, now=later).orphans] == [True]
    assert collect(sm, object_store, grace_s=0).collected == [key]
    assert not object_store.exists(key)
    assert_consistent(sm, object_store)


def test_rows_without_objects_are_listed_as_missing(session_factory, object_store):
    sm = session_factory
    tenant_id = new_tenant(sm)
    task_id, key = create_from_zip(sm, object_store, tenant_id)
    object_store.delete(key)
    report = check(sm, object_store, grace_s=DAY)
    assert [(m.table, m.tenant_id, m.object_key) for m in report.missing] == [("datasets", tenant_id, key)]
    assert report.as_json()["missing"][0]["object_key"] == key
    # a missing object is never "collected" and stays reported
    assert collect(sm, object_store, grace_s=0).collected == []
    assert len(check(sm, object_store, grace_s=0).missing) == 1


def test_objects_outside_the_service_prefixes_are_not_touched(session_factory, object_store):
    object_store.put("backups/keep.bin", b"x")
    assert check(session_factory, object_store, grace_s=0).orphans == []
    collect(session_factory, object_store, grace_s=0)
    assert object_store.exists("backups/keep.bin")


def test_the_periodic_collector_passes_and_survives_errors(session_factory, object_store):
    tenant_id = new_tenant(session_factory)
    key = dataset_key(tenant_id, sha256_hex(b"old"))
    object_store.put(key, b"old")
    gc = PeriodicCollector(session_factory, object_store, interval=3600, grace_s=0)
    report = gc.run_once()
    assert report is not None and report.collected == [key]

    class Down:
        location = "nowhere"

        def list(self, prefix=""):
            raise OSError("store down")

    broken = PeriodicCollector(session_factory, Down(), interval=3600, grace_s=0)
    assert broken.run_once() is None and broken.passes == 1
