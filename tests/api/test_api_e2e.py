"""End to end through HTTP on ``open_clip:tiny:random``: tenant -> upload -> tune -> classify
-> download -> retrain -> cancel -> delete, on Postgres + SeaweedFS S3 and on the embedded
SQLite + file:// defaults, with jobs in the in-process ThreadDispatcher."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from psdata import b64, dataset_zip, image_bytes

from backbone import method_names
from backbone.methods import get_method

#: Small, fast configs per method (a few epochs on a handful of 32 px images).
FAST: dict[str, dict[str, Any]] = {m: get_method(m).smoke_config for m in method_names()}  # the registry's
CLASSES = ("bird", "cat", "dog")  # sorted: dataset classes follow the folder order

def test_fast_configs_cover_every_registered_method() -> None:
    assert sorted(FAST) == sorted(method_names())


def _settings(settings_factory: Any, backend: str) -> Any:
    """"postgres": Postgres + SeaweedFS S3; "sqlite": the embedded SQLite + file:// defaults."""
    if backend == "postgres":
        return settings_factory(db="postgres", objects="s3")
    return settings_factory(db="sqlite", objects="local")


def safetensors_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"]


def object_keys(settings: Any) -> set[str]:
    """Every key in the app's object store, read around the store's own code."""
    url = settings.object_store_url
    if url.startswith("file://"):
        root = Path(url[len("file://") :])
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()
    from minio import Minio

    from store.objects import S3ObjectStore

    store = S3ObjectStore.from_url(url, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key)
    client: Minio = store.client
    if not client.bucket_exists(store.bucket):
        return set()
    return {o.object_name for o in client.list_objects(store.bucket, recursive=True)}


def _create(api: Any, headers: dict[str, str], method: str, config: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    cfg = FAST[method] if config is None else config
    if not get_method(method).needs_dataset:
        return api.create_task(headers, method, classes=list(CLASSES), config=cfg, **kw).json()
    return api.create_task(headers, method, dataset=dataset_zip(CLASSES, per_class=4), config=cfg, **kw).json()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("method", list(FAST))
def test_method_end_to_end(method: str, backend: str, settings_factory: Any, make_api: Any) -> None:
    settings = _settings(settings_factory, backend)
    api = make_api(settings)
    tenant = api.tenant()

    created = _create(api, tenant, method, name=f"{method} task")
    assert created["status"] == "queued" and created["method"] == method
    assert created["classes"] == list(CLASSES) and created["version"] is None and created["progress"] == 0.0

    seen: list[dict[str, Any]] = []
    task = api.wait_ready(tenant, created["id"], seen=seen)
    progress = [t["progress"] for t in seen]
    assert progress == sorted(progress), f"progress went down: {progress}"
    assert 0.0 <= progress[0] and progress[-1] == 1.0
    for field in ("id", "name", "method", "status", "progress", "classes", "metrics", "error", "created_at", "updated_at"):
        assert field in task
    assert task["version"] == 1 and task["error"] is None and task["training"] is None
    for key in ("val_accuracy", "train_seconds", "n_train", "n_val"):
        assert key in task["metrics"]
    if get_method(method).needs_dataset:
        assert task["metrics"]["n_train"] + task["metrics"]["n_val"] == 4 * len(CLASSES)

    listed = api.client.get("/v1/tasks", headers=tenant).json()
    assert listed["count"] == 1 and listed["items"][0]["id"] == task["id"]

    # Classify: multipart, then the same images as base64 JSON.
    imgs = [image_bytes(0, seed=100), image_bytes(2, seed=101, fmt="JPEG")]
    r = api.classify_files(tenant, task["id"], imgs, top_k=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task_id"] == task["id"] and body["version"] == 1
    assert len(body["predictions"]) == 2 and all(len(p) == 2 for p in body["predictions"])
    for preds in body["predictions"]:
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
        assert {p["label"] for p in preds} <= set(CLASSES)

    r = api.client.post(f"/v1/tasks/{task['id']}/classify", json={"images": [b64(i) for i in imgs]}, headers=tenant)
    assert r.status_code == 200, r.text
    full = r.json()["predictions"]
    assert all(len(p) == len(CLASSES) for p in full)
    for preds in full:
        assert sum(p["score"] for p in preds) == pytest.approx(1.0, abs=1e-4)
    for top2, all3 in zip(body["predictions"], full):
        assert [p["label"] for p in top2] == [p["label"] for p in all3[:2]]
        assert [p["score"] for p in top2] == pytest.approx([p["score"] for p in all3[:2]], abs=1e-5)

    # The prompt: safetensors whose header says what it is.
    r = api.client.get(f"/v1/tasks/{task['id']}/prompt", headers=tenant)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    meta = safetensors_metadata(r.content)
    assert meta["method"] == method and meta["version"] == "1"
    assert meta["backbone"].startswith("open_clip:tiny:random")
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert isinstance(json.loads(meta["config"]), dict)
    from safetensors.torch import load as st_load

    assert isinstance(st_load(r.content), dict)

    # Delete: 204, the prompt objects are gone at once, the dataset zip (shared by content) with
    # the garbage collector's pass (grace made 0 here); every verb answers 404 after.
    keys_before = object_keys(settings)
    assert any(k.startswith("prompts/") for k in keys_before)
    r = api.client.delete(f"/v1/tasks/{task['id']}", headers=tenant)
    assert r.status_code == 204 and r.content == b""
    assert {k for k in object_keys(settings) if not k.startswith("datasets/")} == set()
    from store.consistency import check, collect

    collect(api.state.sessionmaker, api.state.objects, grace_s=0)
    assert object_keys(settings) == set()
    assert check(api.state.sessionmaker, api.state.objects, grace_s=0).orphans == []
    assert api.client.get(f"/v1/tasks/{task['id']}", headers=tenant).status_code == 404
    assert api.client.get(f"/v1/tasks/{task['id']}/prompt", headers=tenant).status_code == 404
    r = api.client.post(f"/v1/tasks/{task['id']}/classify", json={"images": [b64(imgs[0])]}, headers=tenant)
    assert r.status_code == 404
    assert api.client.get("/v1/tasks", headers=tenant).json()["count"] == 0


def test_progress_rises_while_running(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    tenant = api.tenant()
    task = _create(api, tenant, "coop", config={"epochs": 60, "n_ctx": 2, "batch_size": 4})
    seen: list[dict[str, Any]] = []
    api.wait_ready(tenant, task["id"], seen=seen, interval=0.01)
    progress = [t["progress"] for t in seen]
    assert progress == sorted(progress)
    assert any(0.0 < p < 1.0 for p in progress), f"no intermediate progress observed: {progress}"
    assert any(t["status"] == "running" for t in seen)
    final = api.client.get(f"/v1/tasks/{task['id']}", params={"include": "history"}, headers=tenant).json()
    assert final["history"] and len(final["history"]) == 60


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_retrain_serves_old_version_until_new_one_then_cancel_and_retry(
    backend: str, settings_factory: Any, make_api: Any
) -> None:
    settings = _settings(settings_factory, backend)
    api = make_api(settings)
    tenant = api.tenant()
    task = _create(api, tenant, "coop")
    tid = task["id"]
    api.wait_ready(tenant, tid)
    probe = {"images": [b64(image_bytes(1, seed=5))]}

    def classify_version() -> int:
        r = api.client.post(f"/v1/tasks/{tid}/classify", json=probe, headers=tenant)
        assert r.status_code == 200, r.text
        return r.json()["version"]

    # A long retrain: the task stays ready on version 1 while it runs.
    r = api.client.post(f"/v1/tasks/{tid}/retrain", data={"config": json.dumps({"epochs": 10_000, "n_ctx": 2})}, headers=tenant)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "ready" and body["version"] == 1 and body["training"]["status"] in ("queued", "running")
    running = api.wait(tenant, tid, lambda t: t["training"]["status"] == "running" and t["training"]["progress"] > 0)
    assert running["status"] == "ready" and running["version"] == 1
    # the task shows the served version's config, classes and metrics; the run's under training
    v1_config = task["config"]
    for shown in (body, running, api.task(tenant, tid)):
        assert shown["config"] == v1_config and shown["config"]["epochs"] == FAST["coop"]["epochs"]
        assert shown["training"]["config"]["epochs"] == 10_000 and shown["training"]["config"]["n_ctx"] == 2, (shown["config"], shown["training"])
    assert [t["config"] for t in api.client.get("/v1/tasks", headers=tenant).json()["items"]] == [v1_config]
    assert classify_version() == 1
    # A second retrain while one runs is refused.
    r = api.client.post(f"/v1/tasks/{tid}/retrain", headers=tenant)
    assert r.status_code == 409 and "running" in r.json()["detail"]

    # Cancel it: still ready on version 1.
    r = api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant)
    assert r.status_code == 202
    t = api.wait(tenant, tid, lambda t: t["training"]["status"] == "cancelled", timeout=60)
    assert t["status"] == "ready" and t["version"] == 1
    assert classify_version() == 1

    # A short retrain (config omitted: the last one is kept -> give one) -> version 2.
    r = api.client.post(f"/v1/tasks/{tid}/retrain", data={"config": json.dumps(FAST["coop"])}, headers=tenant)
    assert r.status_code == 202, r.text
    t = api.wait(tenant, tid, lambda t: t["version"] == 2)
    assert t["status"] == "ready" and t["training"]["status"] == "ready"
    assert t["config"] == t["training"]["config"] and t["config"]["epochs"] == FAST["coop"]["epochs"]
    assert classify_version() == 2
    meta = safetensors_metadata(api.client.get(f"/v1/tasks/{tid}/prompt", headers=tenant).content)
    assert meta["version"] == "2"

    # Retrain with a new dataset (other classes) -> version 3 with the new classes.
    r = api.client.post(
        f"/v1/tasks/{tid}/retrain",
        files={"dataset": ("d.zip", dataset_zip(("apple", "pear"), per_class=3), "application/zip")},
        headers=tenant,
    )
    assert r.status_code == 202, r.text
    served_dataset = t["dataset_id"]
    assert r.json()["dataset_id"] == served_dataset and r.json()["training"]["dataset_id"] not in (None, served_dataset)
    assert r.json()["classes"] == t["classes"]  # the served version's, until the new one publishes
    new_dataset = r.json()["training"]["dataset_id"]
    t = api.wait(tenant, tid, lambda t: t["version"] == 3)
    assert t["classes"] == ["apple", "pear"] and t["dataset_id"] == new_dataset
    r = api.client.post(f"/v1/tasks/{tid}/classify", json=probe, headers=tenant)
    assert {p["label"] for p in r.json()["predictions"][0]} == {"apple", "pear"}

    # Old versions' objects are kept until the task is deleted; then its prompts are gone at
    # once and its (shared-by-content) dataset zips with the garbage collector's pass.
    assert sum(k.startswith("prompts/") for k in object_keys(settings)) == 3
    assert api.client.delete(f"/v1/tasks/{tid}", headers=tenant).status_code == 204
    assert {k for k in object_keys(settings) if k.startswith("prompts/")} == set()
    from store.consistency import collect

    collect(api.state.sessionmaker, api.state.objects, grace_s=0)  # the grace made 0 for the test
    assert object_keys(settings) == set()


def test_cancel_first_run_then_retry(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    tenant = api.tenant()
    task = _create(api, tenant, "coop", config={"epochs": 10_000, "n_ctx": 2})
    tid = task["id"]
    api.wait(tenant, tid, lambda t: t["status"] == "running" and t["progress"] > 0)
    r = api.client.post(f"/v1/tasks/{tid}/classify", json={"images": [b64(image_bytes())]}, headers=tenant)
    assert r.status_code == 409 and "not ready" in r.json()["detail"]
    assert api.client.get(f"/v1/tasks/{tid}/prompt", headers=tenant).status_code == 409
    r = api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant)
    assert r.status_code == 202
    t = api.wait(tenant, tid, lambda t: t["status"] == "cancelled", timeout=60)
    assert t["version"] is None and t["error"] is None
    # Cancel again: nothing to cancel, 409 naming the state, and the task is unchanged.
    r = api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant)
    assert r.status_code == 409 and "no queued or running run to cancel (status cancelled)" in r.json()["detail"]
    assert api.task(tenant, tid)["status"] == "cancelled"
    # Retrain is the way to retry.
    r = api.client.post(f"/v1/tasks/{tid}/retrain", data={"config": json.dumps(FAST["coop"])}, headers=tenant)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    t = api.wait_ready(tenant, tid)
    assert t["version"] == 1
