"""Samples over time over HTTP: a task's dataset becomes its first samples, samples are added
(images with a label, or a zip; new labels allowed), listed (counts per class, pages) and
deleted; a retrain trains on the current set and its version records that snapshot (hash and
counts); a retrain with a new dataset replaces the set; a task may retrain automatically once N
samples were added, one run at a time. Refusals leave nothing behind. On SQLite with local
objects and on Postgres with the S3 server."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pytest
from apiclient import Api
from psdata import dataset_zip, image_bytes, make_zip
from sqlalchemy import select

from store.db import get_sessionmaker, session_scope
from store.models import Sample, Task, TaskEvent
from store.samples import snapshot_hash
from worker.jobs import run_tune_job

BACKENDS = [("sqlite", "local"), ("postgres", "s3")]
IDS = ["sqlite-local", "postgres-s3"]
CONFIG = {"l2_grid": [1.0], "max_iter": 30}


def _owl(n: int, seed: int = 100) -> list[bytes]:
    return [image_bytes(2, seed=seed + i) for i in range(n)]


def _add(api: Api, tenant: dict[str, str], task_id: str, label: str | None, images: list[bytes]) -> Any:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    data = {"label": label} if label is not None else {}
    return api.client.post(f"/v1/tasks/{task_id}/samples", data=data, files=files, headers=tenant)


def _samples(api: Api, tenant: dict[str, str], task_id: str, query: str = "") -> dict[str, Any]:
    r = api.client.get(f"/v1/tasks/{task_id}/samples{query}", headers=tenant)
    assert r.status_code == 200, r.text
    return r.json()


def _versions(api: Api, tenant: dict[str, str], task_id: str) -> list[dict[str, Any]]:
    r = api.client.get(f"/v1/tasks/{task_id}/versions", headers=tenant)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _sample_objects(api: Api) -> set[str]:
    return {i.key for i in api.state.objects.list("samples/")}


def _member(zip_bytes: bytes, name: str) -> bytes:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        return zf.read(name)


def _zip_pairs(zip_bytes: bytes) -> list[tuple[str, str]]:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        return [(n.split("/")[0], hashlib.sha256(zf.read(n)).hexdigest()) for n in zf.namelist() if not n.endswith("/")]


@pytest.fixture(params=BACKENDS, ids=IDS)
def ready_task(request: Any, settings_factory: Any, make_api: Any) -> tuple[Api, dict[str, str], str, bytes]:
    db, objects = request.param
    api = make_api(settings_factory(db=db, objects=objects))
    tenant = api.tenant()
    data = dataset_zip(("cat", "dog"), per_class=4)
    task = api.create_task(tenant, "linear-probe", dataset=data, config=CONFIG).json()
    api.wait_ready(tenant, task["id"])
    return api, tenant, task["id"], data


def test_samples_add_list_delete_and_retrain_on_the_current_set(ready_task: Any) -> None:
    api, tenant, task_id, data = ready_task

    # the dataset became the first samples; version 1 records that it trained on exactly them
    first = _samples(api, tenant, task_id)
    assert first["counts"] == {"cat": 4, "dog": 4} and first["n_samples"] == 8 and first["count"] == 8
    assert {s["source"] for s in first["items"]} == {"dataset"}
    assert first["samples_sha256"] == snapshot_hash(_zip_pairs(data))
    (v1,) = _versions(api, tenant, task_id)
    assert v1["samples_sha256"] == first["samples_sha256"]
    assert v1["n_samples"] == 8 and v1["sample_counts"] == {"cat": 4, "dog": 4} and v1["classes"] == ["cat", "dog"]

    # add: a new label, one image twice (counted once)
    owls = _owl(3)
    r = _add(api, tenant, task_id, "owl", [*owls, owls[0]])
    assert r.status_code == 201, r.text
    added = r.json()
    assert [s["label"] for s in added["items"]] == ["owl"] * 3
    assert [s["sha256"] for s in added["items"]] == [hashlib.sha256(o).hexdigest() for o in owls]
    assert {s["source"] for s in added["items"]} == {"upload"}
    assert len(added["warnings"]) == 1 and "images[3]" in added["warnings"][0] and "counted once" in added["warnings"][0]
    assert added["counts"] == {"cat": 4, "dog": 4, "owl": 3} and added["n_samples"] == 11
    assert added["samples_since_run"] == 3 and added["retrain_queued"] is False
    # the same picture again under its label: counted once, nothing new
    again = _add(api, tenant, task_id, "owl", owls[:1]).json()
    assert again["items"] == [] and again["n_samples"] == 11

    # list: a class, and pages that cover the set exactly once
    owl_page = _samples(api, tenant, task_id, "?label=owl")
    assert owl_page["count"] == 3 and {s["label"] for s in owl_page["items"]} == {"owl"}
    assert owl_page["counts"] == {"cat": 4, "dog": 4, "owl": 3}  # counts are over the whole set
    seen: list[str] = []
    cursor = None
    while True:
        page = _samples(api, tenant, task_id, "?limit=4" + (f"&cursor={cursor}" if cursor else ""))
        assert page["count"] == 11 and len(page["items"]) <= 4
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 11

    # delete one; the second delete finds nothing
    gone = owl_page["items"][0]["id"]
    r = api.client.delete(f"/v1/tasks/{task_id}/samples/{gone}", headers=tenant)
    assert r.status_code == 204, r.text
    r = api.client.delete(f"/v1/tasks/{task_id}/samples/{gone}", headers=tenant)
    assert r.status_code == 404 and gone in r.json()["detail"]
    now = _samples(api, tenant, task_id)
    assert now["counts"] == {"cat": 4, "dog": 4, "owl": 2} and gone not in {s["id"] for s in now["items"]}

    # retrain (no dataset): trains on the set as it is now, the new label included
    r = api.client.post(f"/v1/tasks/{task_id}/retrain", headers=tenant)
    assert r.status_code == 202, r.text
    api.wait(tenant, task_id, lambda t: t["version"] == 2 and t["training"]["status"] == "ready")
    v2 = _versions(api, tenant, task_id)[0]
    assert v2["version"] == 2 and v2["classes"] == ["cat", "dog", "owl"]
    assert v2["n_samples"] == 10 and v2["sample_counts"] == {"cat": 4, "dog": 4, "owl": 2}
    assert v2["samples_sha256"] == now["samples_sha256"] != v1["samples_sha256"]
    assert _samples(api, tenant, task_id)["samples_since_run"] == 0
    r = api.classify_files(tenant, task_id, [image_bytes(2, seed=7)])
    assert r.status_code == 200 and {p["label"] for p in r.json()["predictions"][0]} == {"cat", "dog", "owl"}
    assert r.json()["prediction_ids"] is None  # without keep nothing is kept

    # a zip in the dataset format adds several classes at once
    more = make_zip({"owl/a.png": image_bytes(2, seed=300), "bat/b.png": image_bytes(3, seed=301)})
    r = api.client.post(f"/v1/tasks/{task_id}/samples", files={"dataset": ("more.zip", more, "application/zip")},
                        headers=tenant)
    assert r.status_code == 201, r.text
    assert r.json()["counts"] == {"bat": 1, "cat": 4, "dog": 4, "owl": 3}

    # a retrain with a new dataset replaces the set
    new = dataset_zip(("fox", "hen"), per_class=3, seed=50)
    r = api.client.post(f"/v1/tasks/{task_id}/retrain", files={"dataset": ("new.zip", new, "application/zip")},
                        headers=tenant)
    assert r.status_code == 202, r.text
    api.wait(tenant, task_id, lambda t: t["version"] == 3 and t["training"]["status"] == "ready")
    replaced = _samples(api, tenant, task_id)
    assert replaced["counts"] == {"fox": 3, "hen": 3} and {s["source"] for s in replaced["items"]} == {"dataset"}
    v3 = _versions(api, tenant, task_id)[0]
    assert v3["samples_sha256"] == replaced["samples_sha256"] == snapshot_hash(_zip_pairs(new))


def test_refused_samples_leave_nothing_behind(ready_task: Any) -> None:
    api, tenant, task_id, data = ready_task
    before = _samples(api, tenant, task_id)
    objects = _sample_objects(api)
    assert objects == set()  # the dataset's samples are members of its zip: no object of their own
    dog_bytes = _member(data, "dog/000.png")
    dog = next(s for s in before["items"] if s["sha256"] == hashlib.sha256(dog_bytes).hexdigest())

    cases = [
        # a picture already a sample of another class, with good new ones: refused whole
        (_add(api, tenant, task_id, "cat", [*_owl(2, seed=400), dog_bytes]), 422, ["images[2]", dog["id"], "'dog'"]),
        # an empty label, a blank one, a control character
        (_add(api, tenant, task_id, "", _owl(1, seed=410)), 422, ["label", "blank"]),
        (_add(api, tenant, task_id, "   ", _owl(1, seed=411)), 422, ["label", "blank"]),
        (_add(api, tenant, task_id, "ca\u202et", _owl(1, seed=412)), 422, ["label", "U+202E"]),
        # no label, no image, a broken image after a good one
        (_add(api, tenant, task_id, None, _owl(1, seed=413)), 422, ["label is required"]),
        (api.client.post(f"/v1/tasks/{task_id}/samples", data={"label": "owl"}, headers=tenant), 415,
         ["multipart"]),
        (_add(api, tenant, task_id, "owl", [*_owl(1, seed=414), b"not an image"]), 422,
         ["images[1]", "PNG, JPEG, WebP, BMP, GIF"]),
        # a zip under two labels, one class only, and both kinds at once
        (api.client.post(f"/v1/tasks/{task_id}/samples", headers=tenant, files={"dataset": (
            "x.zip", make_zip({"owl/a.png": image_bytes(2, seed=420), "bat/a.png": image_bytes(2, seed=420)}),
            "application/zip")}), 422, ["same image", "'owl'", "'bat'"]),
        (api.client.post(f"/v1/tasks/{task_id}/samples", headers=tenant, data={"label": "owl"}, files=[
            ("images", ("a.png", image_bytes(2, seed=421), "image/png")),
            ("dataset", ("x.zip", dataset_zip(), "application/zip"))]), 422, ["not both"]),
        # an unknown field
        (api.client.post(f"/v1/tasks/{task_id}/samples", headers=tenant, data={"label": "owl", "lable": "x"},
                         files=[("images", ("a.png", image_bytes(2, seed=422), "image/png"))]), 422, ["'lable'"]),
    ]
    for r, status, words in cases:
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and all(w in detail for w in words), detail
    after = _samples(api, tenant, task_id)
    assert after["samples_sha256"] == before["samples_sha256"] and after["samples_since_run"] == 0
    assert _sample_objects(api) == objects  # nothing stored for a refused upload

    # unknown task (and another tenant's): 404, for every samples route
    other = api.tenant()
    for headers, tid in ((tenant, "0" * 32), (other, task_id)):
        assert _add(api, headers, tid, "owl", _owl(1)).status_code == 404
        assert api.client.get(f"/v1/tasks/{tid}/samples", headers=headers).status_code == 404
        r = api.client.delete(f"/v1/tasks/{tid}/samples/{dog['id']}", headers=headers)
        assert r.status_code == 404 and r.json()["detail"] == f"task {tid} not found"
    # a bad page parameter names itself
    r = api.client.get(f"/v1/tasks/{task_id}/samples?limit=0", headers=tenant)
    assert r.status_code == 422 and "limit" in r.json()["detail"]
    r = api.client.get(f"/v1/tasks/{task_id}/samples?cursor=nope", headers=tenant)
    assert r.status_code == 422 and "cursor" in r.json()["detail"]


def test_zeroshot_tasks_take_no_samples(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    tenant = api.tenant()
    task = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()
    r = _add(api, tenant, task["id"], "cat", _owl(1))
    assert r.status_code == 422 and "zeroshot" in r.json()["detail"]
    r = api.client.post("/v1/tasks", headers=tenant, data={
        "name": "z", "method": "zeroshot", "classes": '["a", "b"]', "retrain_after_samples": "3"})
    assert r.status_code == 422 and "retrain_after_samples" in r.json()["detail"]


def _auto_events(api: Api, task_id: str) -> list[dict[str, Any]]:
    with session_scope(api.state.sessionmaker) as s:
        return [e.data for e in s.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.kind == "queued"))
                if e.data.get("auto")]


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_auto_retrain_once(
    backend: Any, settings_factory: Any, make_api: Any, redis_url: str, request: pytest.FixtureRequest
) -> None:
    """With a broker and no worker, runs stay queued until this test runs their job (the body
    a Celery worker runs): the order of adds and runs is the test's own."""
    import redis

    from worker.celery_app import QUEUE

    # the messages this test sends stay on the session's broker: gone with it, so that no later
    # test counts them and no later worker picks them up
    request.addfinalizer(lambda: redis.Redis.from_url(redis_url).delete(QUEUE))
    db, objects = backend
    settings = settings_factory(db=db, objects=objects, broker_url=redis_url)
    api = make_api(settings)
    tenant = api.tenant()
    r = api.client.post("/v1/tasks", headers=tenant, data={
        "name": "auto", "method": "linear-probe", "config": json.dumps(CONFIG), "retrain_after_samples": "3",
    }, files={"dataset": ("d.zip", dataset_zip(("cat", "dog"), per_class=4), "application/zip")})
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    assert run_tune_job(task_id, 1, settings=settings) == "published"
    assert _samples(api, tenant, task_id)["retrain_after_samples"] == 3

    # below the threshold: no run
    r = _add(api, tenant, task_id, "owl", _owl(2))
    assert r.status_code == 201 and r.json()["retrain_queued"] is False and r.json()["samples_since_run"] == 2
    assert api.task(tenant, task_id)["training"] is None
    # the third sample reaches it: one run is queued
    r = _add(api, tenant, task_id, "owl", _owl(1, seed=200))
    assert r.status_code == 201 and r.json()["retrain_queued"] is True
    task = api.task(tenant, task_id)
    assert task["training"]["status"] == "queued"
    # more samples while that run is queued: no second run; they are in its snapshot
    r = _add(api, tenant, task_id, "owl", _owl(3, seed=300))
    assert r.json()["retrain_queued"] is False and r.json()["samples_since_run"] == 6
    r = api.client.patch(f"/v1/tasks/{task_id}", json={"retrain_after_samples": 2}, headers=tenant)
    assert r.status_code == 200, r.text  # lowering it while a run is queued starts no second one
    assert len(_auto_events(api, task_id)) == 1
    assert run_tune_job(task_id, 2, settings=settings) == "published"  # no follow-up: its snapshot took them all
    versions = _versions(api, tenant, task_id)
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[0]["n_samples"] == 14 and versions[0]["sample_counts"] == {"cat": 4, "dog": 4, "owl": 6}
    state = _samples(api, tenant, task_id)
    assert state["samples_since_run"] == 0 and state["samples_sha256"] == versions[0]["samples_sha256"]
    assert api.task(tenant, task_id)["training"]["status"] == "ready"
    assert len(_auto_events(api, task_id)) == 1

    # null turns it off
    r = api.client.patch(f"/v1/tasks/{task_id}", json={"retrain_after_samples": None}, headers=tenant)
    assert r.status_code == 200
    r = _add(api, tenant, task_id, "owl", _owl(3, seed=500))
    assert r.json()["retrain_queued"] is False and r.json()["retrain_after_samples"] is None
    r = api.client.patch(f"/v1/tasks/{task_id}", json={"retrain_after_samples": 0}, headers=tenant)
    assert r.status_code == 422 and "retrain_after_samples" in r.json()["detail"]
    # switched on again below the samples already added: the run is requested at once
    r = api.client.patch(f"/v1/tasks/{task_id}", json={"retrain_after_samples": 3}, headers=tenant)
    assert r.status_code == 200
    assert api.task(tenant, task_id)["training"]["status"] == "queued" and len(_auto_events(api, task_id)) == 2
    # its message stays on the session's broker: cancelled, a later worker finds nothing to do
    assert api.client.post(f"/v1/tasks/{task_id}/cancel", headers=tenant).status_code == 202


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_samples_added_during_a_run_start_the_next_one(backend: Any, settings_factory: Any, make_api: Any) -> None:
    """In-process jobs: samples added while a run is active count towards the next run, which
    starts when that run publishes (the job itself) or at the next add (the API), whichever
    sees it first; either way one run follows, never two at once, and it trains on them."""
    db, objects = backend
    api = make_api(settings_factory(db=db, objects=objects))
    tenant = api.tenant()
    task = api.create_task(tenant, "linear-probe", dataset=dataset_zip(("cat", "dog"), per_class=4), config=CONFIG).json()
    task_id = task["id"]
    api.wait_ready(tenant, task_id)
    r = api.client.patch(f"/v1/tasks/{task_id}", json={"retrain_after_samples": 2}, headers=tenant)
    assert r.status_code == 200
    # two adders at once, each past the threshold
    results: list[Any] = []

    def add(seed: int) -> None:
        results.append(_add(api, tenant, task_id, "owl", _owl(2, seed=seed)))

    threads = [threading.Thread(target=add, args=(seed,)) for seed in (100, 200, 300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [201] * 3

    def settled(t: dict[str, Any]) -> bool:
        # the counter first, then the run: below the threshold with no run active, nothing follows
        below = _samples(api, tenant, task_id)["samples_since_run"] < 2
        t = api.task(tenant, task_id)
        return below and t["training"] is not None and t["training"]["status"] == "ready"

    api.wait(tenant, task_id, settled, interval=0.1)
    final = _versions(api, tenant, task_id)[0]
    current = _samples(api, tenant, task_id)
    assert final["samples_sha256"] == current["samples_sha256"] and final["sample_counts"]["owl"] == 6
    # one run at a time: every run was queued after the one before it had ended
    with session_scope(api.state.sessionmaker) as s:
        kinds = [e.kind for e in s.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id))
                 if e.kind in ("queued", "published", "failed", "cancelled")]
    assert kinds[0] == "queued"
    for a, b in zip(kinds, kinds[1:]):
        assert (a == "queued") != (b == "queued"), kinds
    assert 2 <= kinds.count("published") <= 4


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_tasks_created_before_samples_expand_their_dataset_lazily(backend: Any, settings_factory: Any,
                                                                   make_api: Any) -> None:
    """A task whose samples were never expanded (made before samples existed) lists its
    dataset's images at the first samples call, once (three calls at once), and its retrain
    trains on exactly them."""
    settings = settings_factory(db=backend[0], objects=backend[1])
    api = make_api(settings)
    tenant = api.tenant()
    data = dataset_zip(("cat", "dog"), per_class=3)
    task_id = api.create_task(tenant, "linear-probe", dataset=data, config=CONFIG).json()["id"]
    api.wait_ready(tenant, task_id)
    sm = get_sessionmaker(settings.database_url)
    with session_scope(sm) as s:  # as a task of before: no samples, not expanded
        s.execute(Sample.__table__.delete().where(Sample.task_id == task_id))
        s.execute(Task.__table__.update().where(Task.id == task_id).values(samples_seeded=False))
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(_samples(api, tenant, task_id))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r["n_samples"] for r in results} == {6}
    with session_scope(sm) as s:
        assert s.scalar(select(Task.samples_seeded).where(Task.id == task_id)) is True
        assert len(list(s.scalars(select(Sample.id).where(Sample.task_id == task_id)))) == 6
    r = api.client.post(f"/v1/tasks/{task_id}/retrain", headers=tenant)
    assert r.status_code == 202
    api.wait(tenant, task_id, lambda t: t["version"] == 2 and t["training"]["status"] == "ready")
    assert _versions(api, tenant, task_id)[0]["samples_sha256"] == snapshot_hash(_zip_pairs(data))
