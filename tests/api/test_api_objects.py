"""Nothing lost, nothing left behind (docs/operations.md "Objects and rows stay consistent"),
through HTTP on SQLite and Postgres with the local store and the S3 server:

- deleting task X while task Y is being created from the same zip keeps the shared zip: Y
  trains, and trains again on retrain;
- a retrain refused with 409 after its upload, and a create whose request fails after the
  zip was written, leave an orphan the garbage collector removes (never a young one);
- ``GET /v1/admin/fsck`` answers the check.

Each scenario ends with the consistency check: nothing missing, every orphan collected once the
grace is made 0. The races are forced by a store wrapper that pauses a request right after its
``put`` (no timing is asserted)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from apiclient import ADMIN, Api
from freshdb import fresh_pg_url  # noqa: F401 - fixture
from psdata import dataset_zip

from store.consistency import check, collect
from store.objects import ObjectStoreError, sha256_hex

FAST = {"max_iter": 20}
DAY = 24 * 3600.0

BACKENDS = [("sqlite", "local"), ("sqlite", "s3"), ("postgres", "local"), ("postgres", "s3")]


def assert_consistent(api: Api) -> Any:
    state = api.state
    first = check(state.sessionmaker, state.objects, grace_s=DAY)
    assert first.missing == [], first.missing
    assert all(not o.collectable for o in first.orphans), first.orphans
    collect(state.sessionmaker, state.objects, grace_s=0)
    after = check(state.sessionmaker, state.objects, grace_s=0)
    assert (after.orphans, after.missing) == ([], []), after.as_json()
    return first


class PausingStore:
    """The app's store; the first ``put`` of a ``datasets/`` key (after writing it) signals
    ``written`` and waits for ``go``; with ``fail_after_put`` it then raises, as a client whose
    write landed but whose answer timed out."""

    def __init__(self, inner: Any, *, fail_after_put: bool = False) -> None:
        self.inner = inner
        self.location = inner.location
        self.written, self.go = threading.Event(), threading.Event()
        self.fail_after_put = fail_after_put
        self._armed = True

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        if key.startswith("datasets/") and self._armed:
            self._armed = False
            self.written.set()
            assert self.go.wait(60), "the test never released the paused request"
            if self.fail_after_put:
                raise ObjectStoreError(f"object store: put {key!r} failed (ReadTimeout)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def _api(settings_factory: Any, make_api: Any, db: str, objects: str, request: Any) -> Api:
    """An app on its own database: the check covers every row of the index."""
    url = request.getfixturevalue("fresh_pg_url") if db == "postgres" else "sqlite"
    return make_api(settings_factory(db=url, objects=objects))


@pytest.mark.parametrize("db,objects", BACKENDS, ids=["-".join(b) for b in BACKENDS])
def test_delete_during_create_from_the_same_zip_loses_nothing(
    db: str, objects: str, settings_factory: Any, make_api: Any, request: Any
) -> None:
    api = _api(settings_factory, make_api, db, objects, request)
    headers = api.tenant()
    data = dataset_zip(("a", "b"), per_class=2)
    x = api.create_task(headers, "linear-probe", dataset=data, config=FAST, name="x").json()
    api.wait_ready(headers, x["id"])

    real = api.state.objects
    paused = PausingStore(real)
    api.state.objects = paused
    try:
        thread, out = _in_thread(lambda: api.create_task(headers, "linear-probe", dataset=data, config=FAST,
                                                         name="y", expect=None))  # fmt: skip
        assert paused.written.wait(60), "the create never stored its zip"
        r = api.client.delete(f"/v1/tasks/{x['id']}", headers=headers)  # while Y is between put and commit
        assert r.status_code == 204, r.text
        paused.go.set()
        thread.join(60)
    finally:
        paused.go.set()
        api.state.objects = real
    assert out and out[0].status_code == 202, out and out[0].text
    y = out[0].json()
    assert y["dataset_id"] != x["dataset_id"]
    assert api.wait_ready(headers, y["id"])["version"] == 1  # not "the task's dataset is missing"
    assert_consistent(api)
    # a retrain of the surviving task trains from the shared zip again
    r = api.client.post(f"/v1/tasks/{y['id']}/retrain", headers=headers)
    assert r.status_code == 202, r.text
    t = api.wait(headers, y["id"], lambda t: (t["training"] or {}).get("status") in ("ready", "failed", "cancelled"))
    assert (t["version"], t["training"]["status"]) == (2, "ready"), t
    assert_consistent(api)
    assert api.client.get(f"/v1/tasks/{y['id']}/prompt", headers=headers).status_code == 200


@pytest.mark.parametrize("db,objects", [("sqlite", "local"), ("postgres", "s3")], ids=["sqlite-local", "postgres-s3"])
def test_a_retrain_refused_with_409_after_its_upload_leaves_nothing_behind(
    db: str, objects: str, settings_factory: Any, make_api: Any, request: Any
) -> None:
    api = _api(settings_factory, make_api, db, objects, request)
    headers = api.tenant()
    task = api.create_task(headers, "linear-probe", dataset=dataset_zip(("a", "b"), per_class=2), config=FAST).json()
    api.wait_ready(headers, task["id"])
    before = {i.key for i in api.state.objects.list("")}

    real = api.state.objects
    paused = PausingStore(real)
    api.state.objects = paused
    new_zip = dataset_zip(("a", "b"), per_class=3, seed=7)
    try:
        files = {"dataset": ("d.zip", new_zip, "application/zip")}
        thread, out = _in_thread(lambda: api.client.post(f"/v1/tasks/{task['id']}/retrain", files=files,
                                                         headers=headers))  # fmt: skip
        assert paused.written.wait(60), "the retrain never stored its zip"
        # another retrain starts a run meanwhile: the paused one finds the run active
        r = api.client.post(f"/v1/tasks/{task['id']}/retrain", headers=headers)
        assert r.status_code == 202, r.text
        paused.go.set()
        thread.join(60)
    finally:
        paused.go.set()
        api.state.objects = real
    assert out and out[0].status_code == 409, out and out[0].text
    api.wait(headers, task["id"], lambda t: (t["training"] or {}).get("status") in ("ready", "failed", "cancelled"))
    report = assert_consistent(api)
    refused = f"{sha256_hex(new_zip)}.zip"
    assert [o.key.rsplit("/", 1)[-1] for o in report.orphans] == [refused]  # young, then collected
    assert not any(i.key.endswith(refused) for i in api.state.objects.list(""))
    assert {i.key for i in api.state.objects.list("datasets/")} <= before


@pytest.mark.parametrize("db,objects", [("sqlite", "s3"), ("postgres", "local")], ids=["sqlite-s3", "postgres-local"])
def test_a_create_failing_after_its_put_leaves_an_orphan_the_collector_removes(
    db: str, objects: str, settings_factory: Any, make_api: Any, request: Any
) -> None:
    api = _api(settings_factory, make_api, db, objects, request)
    headers = api.tenant()
    real = api.state.objects
    paused = PausingStore(real, fail_after_put=True)
    paused.go.set()
    api.state.objects = paused
    try:
        r = api.create_task(headers, "linear-probe", dataset=dataset_zip(("a", "b"), per_class=2), config=FAST,
                            expect=None)  # fmt: skip
    finally:
        api.state.objects = real
    assert r.status_code >= 500, r.text
    assert api.client.get("/v1/tasks", headers=headers).json()["count"] == 0
    fsck = api.client.get("/v1/admin/fsck", headers=ADMIN)
    assert fsck.status_code == 200, fsck.text
    body = fsck.json()
    assert body["missing"] == [] and len(body["orphans"]) == 1
    assert body["orphans"][0]["key"].startswith("datasets/") and body["orphans"][0]["collectable"] is False
    assert api.client.get("/v1/admin/fsck?grace=0", headers=ADMIN).json()["orphans"][0]["collectable"] is True
    assert api.client.get("/v1/admin/fsck").status_code == 401
    report = assert_consistent(api)
    assert len(report.orphans) == 1
