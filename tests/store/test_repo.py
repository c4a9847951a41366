"""store.repo on both databases (SQLite and Postgres, migrated with Alembic)."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from sqlalchemy import select, text

from store import repo
from store.db import session_scope
from store.models import (
    CANCELLED,
    FAILED,
    QUEUED,
    READY,
    RUNNING,
    ApiKey,
    Dataset,
    PromptVersion,
    Task,
)

METRICS = {"val_accuracy": 0.9, "train_seconds": 1.0, "n_train": 8, "n_val": 2}


def make_tenant(sm, name="acme"):
    with session_scope(sm) as s:
        tenant, key = repo.create_tenant(s, name)
    return tenant, key


def make_task(sm, tenant_id, *, classes=("cat", "dog"), name="pets", with_dataset=True, sha="a" * 64):
    with session_scope(sm) as s:
        ds_id = None
        if with_dataset:
            ds = repo.create_dataset(
                s,
                tenant_id=tenant_id,
                object_key=f"datasets/{tenant_id}/{sha}.zip",
                sha256=sha,
                size=123,
                classes=list(classes),
                counts={c: 4 for c in classes},
            )
            ds_id = ds.id
        task = repo.create_task(
            s,
            tenant_id=tenant_id,
            name=name,
            method="coop",
            config={"n_ctx": 4},
            classes=list(classes),
            dataset_id=ds_id,
        )
    return task


def publish(sm, task_id, attempt, *, sha="b" * 64, classes=("cat", "dog"), metrics=METRICS):
    with session_scope(sm) as s:
        tenant_id = repo.get_task_for_job(s, task_id).tenant_id
        return repo.publish_version(
            s,
            task_id,
            attempt,
            object_key=f"prompts/{tenant_id}/{task_id}/{sha}.safetensors",
            sha256=sha,
            size=10,
            fingerprint="open_clip:tiny:random@0#abc",
            classes=list(classes),
            metrics=dict(metrics),
            history=[{"epoch": 1, "loss": 0.5, "val_accuracy": 0.9}],
            confusion=[[1, 0], [0, 1]],
        )


def claim(sm, task_id, attempt):
    with session_scope(sm) as s:
        return repo.claim_run(s, task_id, attempt)


def fetch(sm, task_id, tenant_id):
    with session_scope(sm) as s:
        return repo.get_task(s, task_id, tenant_id=tenant_id)


def ready_task(sm, tenant_id):
    task = make_task(sm, tenant_id)
    assert claim(sm, task.id, 1) is not None
    assert publish(sm, task.id, 1) is not None
    return fetch(sm, task.id, tenant_id)


# --------------------------------------------------------------------------- tenants and keys


def test_api_key_format_and_only_hash_stored(session_factory):
    tenant, key = make_tenant(session_factory)
    prefix, secret = key.split("_", 2)[1:]
    assert key.startswith("ps_") and len(prefix) == 12 and len(secret) >= 32
    with session_scope(session_factory) as s:
        row = s.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id))
        assert row.prefix == prefix
        assert row.hash == hashlib.sha256(key.encode()).hexdigest()
        dump = " ".join(str(v) for v in s.execute(text("SELECT * FROM api_keys")).one())
        assert secret not in dump
        assert repo.tenant_by_api_key(s, key).id == tenant.id


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # same prefix, wrong secret
        lambda k: "ps_" + "0" * 12 + "_" + k.split("_", 2)[2],  # unknown prefix
        lambda k: k.replace("ps_", "pk_", 1),  # wrong scheme
        lambda k: "",
        lambda k: None,
        lambda k: "ps_" + k.split("_")[1],  # no secret
        lambda k: k + "' OR 1=1 --",
    ],
)
def test_bad_api_keys_are_refused(session_factory, mangle):
    _, key = make_tenant(session_factory)
    with session_scope(session_factory) as s:
        assert repo.tenant_by_api_key(s, mangle(key)) is None


def test_api_key_lookup_always_compares_in_constant_time(session_factory, monkeypatch):
    _, key = make_tenant(session_factory)
    calls = []
    real = repo.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(repo.hmac, "compare_digest", spy)
    with session_scope(session_factory) as s:
        for candidate in [key, key[:-1] + "x", "ps_" + "f" * 12 + "_" + "y" * 43, "garbage"]:
            repo.tenant_by_api_key(s, candidate)
    # one digest comparison of two sha256 hex digests per lookup, hit or miss
    assert calls == [(64, 64)] * 4


def test_revoked_key_and_extra_keys(session_factory):
    tenant, key = make_tenant(session_factory)
    other, _ = make_tenant(session_factory, "other")
    with session_scope(session_factory) as s:
        key2 = repo.create_api_key(s, tenant_id=tenant.id)
    prefix = key.split("_")[1]
    with session_scope(session_factory) as s:
        assert repo.revoke_api_key(s, prefix, tenant_id=other.id) is False  # not theirs
        assert repo.revoke_api_key(s, prefix, tenant_id=tenant.id) is True
    with session_scope(session_factory) as s:
        assert repo.tenant_by_api_key(s, key) is None
        assert repo.tenant_by_api_key(s, key2).id == tenant.id


def test_duplicate_tenant_name(session_factory):
    make_tenant(session_factory, "acme")
    with pytest.raises(repo.TenantExists, match="acme"):
        make_tenant(session_factory, "acme")
    with pytest.raises(repo.StoreError, match="blank"):
        make_tenant(session_factory, "  ")


def test_list_tenants_with_counts_and_request_counter(session_factory):
    a, _ = make_tenant(session_factory, "a")
    b, _ = make_tenant(session_factory, "b")
    make_task(session_factory, a.id, name="t1")
    make_task(session_factory, a.id, name="t2", sha="c" * 64)
    with session_scope(session_factory) as s:
        repo.count_request(s, tenant_id=a.id)
        repo.count_request(s, tenant_id=a.id, n=4)
    with session_scope(session_factory) as s:
        rows = {t.name: t for t in repo.list_tenants(s)}
    assert rows["a"].task_count == 2 and rows["b"].task_count == 0
    assert rows["a"].request_count == 5 and rows["b"].request_count == 0
    assert rows["a"].last_request_at is not None and rows["b"].last_request_at is None


def test_timestamps_are_aware_utc(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    with session_scope(session_factory) as s:  # a fresh session reads from the database
        t = repo.get_task(s, task.id, tenant_id=tenant.id)
        for value in (t.created_at, t.updated_at, repo.get_tenant(s, tenant.id).created_at):
            assert value.tzinfo is not None and value.utcoffset() == dt.timedelta(0)
        assert abs((dt.datetime.now(dt.timezone.utc) - t.created_at).total_seconds()) < 60


def test_ids_are_uuid_hex(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    for value in (tenant.id, task.id):
        assert len(value) == 32 and int(value, 16) >= 0


# --------------------------------------------------------------------------- tenant isolation


def test_every_tenant_scoped_function_hides_other_tenants(session_factory):
    a, _ = make_tenant(session_factory, "a")
    b, _ = make_tenant(session_factory, "b")
    task = ready_task(session_factory, a.id)
    with session_scope(session_factory) as s:
        ds_a = s.scalar(select(Dataset).where(Dataset.tenant_id == a.id))
        b_task = repo.create_task(s, tenant_id=b.id, name="b", method="zeroshot", config={}, classes=["x", "y"])
    with session_scope(session_factory) as s:
        assert repo.get_task(s, task.id, tenant_id=b.id) is None
        assert repo.list_tasks(s, tenant_id=b.id) == [s.get(Task, b_task.id)]
        assert repo.get_dataset(s, ds_a.id, tenant_id=b.id) is None
        assert repo.get_served_version(s, task.id, tenant_id=b.id) is None
        assert repo.list_versions(s, task.id, tenant_id=b.id) == []
        assert repo.request_retrain(s, task.id, tenant_id=b.id) is None
        assert repo.request_cancel(s, task.id, tenant_id=b.id) is None
        assert repo.delete_task(s, task.id, tenant_id=b.id) is None
        with pytest.raises(repo.InvalidReference):
            repo.create_task(
                s, tenant_id=b.id, name="steal", method="coop", config={}, classes=[], dataset_id=ds_a.id
            )
    with session_scope(session_factory) as s:
        with pytest.raises(repo.InvalidReference):
            repo.request_retrain(s, b_task.id, tenant_id=b.id, dataset_id=ds_a.id)
    with session_scope(session_factory) as s:  # nothing of a's changed
        t = repo.get_task(s, task.id, tenant_id=a.id)
        assert (t.status, t.attempt, t.version, t.training) == (READY, 1, 1, None)
        assert repo.get_served_version(s, task.id, tenant_id=a.id).version == 1
        assert [x.id for x in repo.list_tasks(s, tenant_id=a.id)] == [task.id]


# --------------------------------------------------------------------------- status machine


def test_first_run_queued_running_ready(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    assert (task.status, task.attempt, task.progress, task.version, task.training) == (QUEUED, 1, 0.0, None, None)
    assert claim(session_factory, task.id, 1).status == RUNNING
    with session_scope(session_factory) as s:
        assert repo.record_progress(s, task.id, 1, progress=0.25) is True
        assert repo.record_progress(s, task.id, 1, progress=0.1) is True  # never lowered
        assert repo.record_progress(s, task.id, 1, progress=0.5, history=[{"epoch": 1}]) is True
        assert repo.should_stop(s, task.id, 1) is False
    t = fetch(session_factory, task.id, tenant.id)
    assert t.progress == 0.5 and t.history == [{"epoch": 1}]
    pv = publish(session_factory, task.id, 1)
    assert pv.version == 1
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.progress, t.version, t.error, t.training) == (READY, 1.0, 1, None, None)
    assert t.metrics == METRICS and t.confusion == [[1, 0], [0, 1]]
    with session_scope(session_factory) as s:
        served = repo.get_served_version(s, task.id, tenant_id=tenant.id)
        assert served.object_key == pv.object_key and served.fingerprint == "open_clip:tiny:random@0#abc"
        assert repo.pending_runs(s) == []


def test_progress_is_clamped(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    claim(session_factory, task.id, 1)
    with session_scope(session_factory) as s:
        repo.record_progress(s, task.id, 1, progress=7.0)
    assert fetch(session_factory, task.id, tenant.id).progress == 1.0


def test_retrain_keeps_serving_until_the_new_version_is_published(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = ready_task(session_factory, tenant.id)
    with session_scope(session_factory) as s:
        ds = repo.create_dataset(
            s,
            tenant_id=tenant.id,
            object_key=f"datasets/{tenant.id}/{'d' * 64}.zip",
            sha256="d" * 64,
            size=1,
            classes=["cat", "dog", "bird"],
            counts={"cat": 1, "dog": 1, "bird": 1},
        )
        t = repo.request_retrain(s, task.id, tenant_id=tenant.id, dataset_id=ds.id, config={"n_ctx": 8})
        assert t.attempt == 2
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.version, t.training) == (READY, 1, {"status": QUEUED, "progress": 0.0, "error": None})
    assert t.classes == ["cat", "dog"]  # the served version's classes until the switch
    assert t.config == {"n_ctx": 8} and t.dataset_id == ds.id
    with session_scope(session_factory) as s:
        assert repo.pending_runs(s) == [(task.id, 2)]
        with pytest.raises(repo.TaskStateError, match="queued"):
            repo.request_retrain(s, task.id, tenant_id=tenant.id)
    assert claim(session_factory, task.id, 1) is None  # stale delivery of the first run
    assert claim(session_factory, task.id, 2).training["status"] == RUNNING
    with session_scope(session_factory) as s:
        assert repo.record_progress(s, task.id, 2, progress=0.4) is True
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.progress, t.version, t.training["progress"]) == (READY, 1.0, 1, 0.4)
    with session_scope(session_factory) as s:
        assert repo.get_served_version(s, task.id, tenant_id=tenant.id).version == 1
    assert publish(session_factory, task.id, 1, sha="e" * 64) is None  # stale publish
    pv = publish(session_factory, task.id, 2, sha="f" * 64, classes=("cat", "dog", "bird"))
    assert pv.version == 2
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.version, t.classes) == (READY, 2, ["cat", "dog", "bird"])
    assert t.training == {"status": READY, "progress": 1.0, "error": None}
    with session_scope(session_factory) as s:
        assert repo.get_served_version(s, task.id, tenant_id=tenant.id).sha256 == "f" * 64
        assert [v.version for v in repo.list_versions(s, task.id, tenant_id=tenant.id)] == [1, 2]


def test_failed_first_run_and_retry(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    claim(session_factory, task.id, 1)
    with session_scope(session_factory) as s:
        assert repo.fail_run(s, task.id, 1, error="class 'dog' has no images") is True
        assert repo.fail_run(s, task.id, 1, error="again") is False  # already finished
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.error, t.version) == (FAILED, "class 'dog' has no images", None)
    assert claim(session_factory, task.id, 1) is None
    with session_scope(session_factory) as s:
        t = repo.request_retrain(s, task.id, tenant_id=tenant.id)
    assert (t.status, t.attempt, t.error, t.progress) == (QUEUED, 2, None, 0.0)
    assert claim(session_factory, task.id, 2).status == RUNNING


def test_failed_retrain_keeps_the_served_version(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = ready_task(session_factory, tenant.id)
    with session_scope(session_factory) as s:
        repo.request_retrain(s, task.id, tenant_id=tenant.id)
    claim(session_factory, task.id, 2)
    with session_scope(session_factory) as s:
        assert repo.fail_run(s, task.id, 2, error="out of memory") is True
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.version, t.error) == (READY, 1, None)
    assert t.training["status"] == FAILED and t.training["error"] == "out of memory"


def test_cancel_queued_is_immediate(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    with session_scope(session_factory) as s:
        assert repo.request_cancel(s, task.id, tenant_id=tenant.id).status == CANCELLED
    assert claim(session_factory, task.id, 1) is None  # the queued message becomes a no-op
    with session_scope(session_factory) as s:
        t = repo.request_retrain(s, task.id, tenant_id=tenant.id)
        assert (t.status, t.attempt) == (QUEUED, 2)


def test_cancel_running_is_seen_by_the_job(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    claim(session_factory, task.id, 1)
    with session_scope(session_factory) as s:
        t = repo.request_cancel(s, task.id, tenant_id=tenant.id)
        assert (t.status, t.cancel_requested) == (RUNNING, True)
    with session_scope(session_factory) as s:
        assert repo.should_stop(s, task.id, 1) is True
        assert repo.record_progress(s, task.id, 1, progress=0.3) is False
        with pytest.raises(repo.TaskStateError):
            repo.request_retrain(s, task.id, tenant_id=tenant.id)
    with session_scope(session_factory) as s:
        assert repo.mark_cancelled(s, task.id, 1) is True
        assert repo.mark_cancelled(s, task.id, 1) is False
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.cancel_requested) == (CANCELLED, False)
    assert publish(session_factory, task.id, 1) is None


def test_cancel_retrain_of_a_served_task(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = ready_task(session_factory, tenant.id)
    with session_scope(session_factory) as s:
        repo.request_retrain(s, task.id, tenant_id=tenant.id)
    with session_scope(session_factory) as s:
        t = repo.request_cancel(s, task.id, tenant_id=tenant.id)
        assert (t.status, t.version, t.training["status"]) == (READY, 1, CANCELLED)
    assert claim(session_factory, task.id, 2) is None


def test_cancel_without_active_run_is_refused_and_changes_nothing(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = ready_task(session_factory, tenant.id)
    with session_scope(session_factory) as s:
        with pytest.raises(repo.TaskStateError, match=r"no queued or running run to cancel \(status ready\)"):
            repo.request_cancel(s, task.id, tenant_id=tenant.id)
    with session_scope(session_factory) as s:  # a cancelled run cannot be cancelled again
        repo.request_retrain(s, task.id, tenant_id=tenant.id)
    with session_scope(session_factory) as s:
        repo.request_cancel(s, task.id, tenant_id=tenant.id)
    with session_scope(session_factory) as s:
        with pytest.raises(repo.TaskStateError, match=r"its last run is cancelled"):
            repo.request_cancel(s, task.id, tenant_id=tenant.id)
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.cancel_requested, t.training["status"]) == (READY, False, CANCELLED)


# --------------------------------------------------------------------------- idempotency


def test_claim_is_idempotent(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    assert claim(session_factory, task.id, 2) is None  # future/stale attempt number
    first = claim(session_factory, task.id, 1)
    assert first.status == RUNNING and first.lease_owner
    # a redelivery of a running attempt under a live lease does nothing (never twice at once) ...
    assert claim(session_factory, task.id, 1) is None
    # ... but the same owner may claim again (a retry of the same execution)
    with session_scope(session_factory) as s:
        assert repo.claim_run(s, task.id, 1, owner=first.lease_owner).status == RUNNING
    publish(session_factory, task.id, 1)
    assert claim(session_factory, task.id, 1) is None  # finished
    assert claim(session_factory, "0" * 32, 1) is None  # unknown


def test_duplicate_publish_is_a_no_op(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    claim(session_factory, task.id, 1)
    assert publish(session_factory, task.id, 1).version == 1
    assert publish(session_factory, task.id, 1, sha="9" * 64) is None
    with session_scope(session_factory) as s:
        rows = s.scalars(select(PromptVersion).where(PromptVersion.task_id == task.id)).all()
        assert [(r.version, r.sha256) for r in rows] == [(1, "b" * 64)]


def test_racing_publish_hits_the_unique_constraint_harmlessly(session_factory, monkeypatch):
    """A duplicate that passed the state check and read the version number before the other
    worker's commit (as two workers racing on SQLite can) is stopped by unique(task_id,
    version): rolled back, None, task untouched."""
    monkeypatch.setattr(repo, "next_version_number", lambda s, task_id: 1)  # read before the other commit
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    claim(session_factory, task.id, 1)
    with session_scope(session_factory) as s:  # the other worker's row, committed first
        s.add(
            PromptVersion(
                task_id=task.id, tenant_id=tenant.id, version=1, object_key="prompts/x/y/z.safetensors",
                sha256="1" * 64, size=1, fingerprint="f",
            )
        )  # fmt: skip
    assert publish(session_factory, task.id, 1) is None
    t = fetch(session_factory, task.id, tenant.id)
    assert (t.status, t.version) == (RUNNING, None)
    with session_scope(session_factory) as s:
        assert s.scalar(select(PromptVersion.sha256).where(PromptVersion.task_id == task.id)) == "1" * 64


def test_job_functions_on_a_deleted_task(session_factory):
    tenant, _ = make_tenant(session_factory)
    task = make_task(session_factory, tenant.id)
    claim(session_factory, task.id, 1)
    with session_scope(session_factory) as s:
        repo.delete_task(s, task.id, tenant_id=tenant.id)
    with session_scope(session_factory) as s:
        assert repo.record_progress(s, task.id, 1, progress=0.5) is False
        assert repo.should_stop(s, task.id, 1) is True
        assert repo.fail_run(s, task.id, 1, error="x") is False
        assert repo.mark_cancelled(s, task.id, 1) is False
    assert publish_missing(session_factory, task.id) is None


def publish_missing(sm, task_id):
    with session_scope(sm) as s:
        return repo.publish_version(
            s, task_id, 1, object_key="prompts/a/b/c.safetensors", sha256="c" * 64, size=1,
            fingerprint="f", classes=[], metrics={},
        )  # fmt: skip


# --------------------------------------------------------------------------- deletion


def test_delete_task_returns_keys_and_keeps_shared_datasets(session_factory):
    tenant, _ = make_tenant(session_factory)
    t1 = make_task(session_factory, tenant.id, name="one")
    claim(session_factory, t1.id, 1)
    pv = publish(session_factory, t1.id, 1)
    with session_scope(session_factory) as s:  # a second task on the same dataset row
        ds_id = repo.get_task(s, t1.id, tenant_id=tenant.id).dataset_id
        t2 = repo.create_task(
            s, tenant_id=tenant.id, name="two", method="coop", config={}, classes=["cat", "dog"], dataset_id=ds_id
        )
    with session_scope(session_factory) as s:
        keys = repo.delete_task(s, t1.id, tenant_id=tenant.id)
    assert keys == [pv.object_key]  # the dataset is still used by t2
    with session_scope(session_factory) as s:
        assert repo.get_task(s, t1.id, tenant_id=tenant.id) is None
        assert s.scalar(select(PromptVersion).where(PromptVersion.task_id == t1.id)) is None
        keys = repo.delete_task(s, t2.id, tenant_id=tenant.id)
    # The last user's dataset row goes, but never its object: dataset zips are shared by content
    # (an upload of the same zip may be in flight) and left to the garbage collector.
    assert keys == []
    with session_scope(session_factory) as s:
        assert s.scalar(select(Dataset).where(Dataset.tenant_id == tenant.id)) is None
        assert repo.delete_task(s, t2.id, tenant_id=tenant.id) is None


def test_json_none_is_sql_null(session_factory):
    tenant, _ = make_tenant(session_factory)
    make_task(session_factory, tenant.id)
    with session_scope(session_factory) as s:
        assert s.scalar(text("SELECT count(*) FROM tasks WHERE training IS NULL AND metrics IS NULL")) == 1


def test_dataset_warnings_follow_the_dataset_of_the_latest_run(session_factory):
    """Datasets keep the upload's warnings; a task shows those of its current dataset
    (none without one), also when a retrain switches the dataset in the same session."""
    tenant, _ = make_tenant(session_factory)
    task = ready_task(session_factory, tenant.id)
    bare = make_task(session_factory, tenant.id, name="zs", with_dataset=False)
    with session_scope(session_factory) as s:
        t = repo.get_task(s, task.id, tenant_id=tenant.id)
        assert t.dataset.warnings == [] and t.dataset_warnings == []
        assert repo.get_task(s, bare.id, tenant_id=tenant.id).dataset_warnings == []
        ds = repo.create_dataset(
            s, tenant_id=tenant.id, object_key=f"datasets/{tenant.id}/{'e' * 64}.zip", sha256="e" * 64, size=1,
            classes=["cat", "dog"], counts={"cat": 1, "dog": 1},
            warnings=["dropped 1 duplicate image in class 'cat': cat/b.png (same as cat/a.png)"],
        )  # fmt: skip
        t = repo.request_retrain(s, task.id, tenant_id=tenant.id, dataset_id=ds.id)
        assert t.dataset_warnings == ["dropped 1 duplicate image in class 'cat': cat/b.png (same as cat/a.png)"]
    with session_scope(session_factory) as s:
        t = repo.get_task(s, task.id, tenant_id=tenant.id)
        assert t.dataset_warnings == ["dropped 1 duplicate image in class 'cat': cat/b.png (same as cat/a.png)"]
