"""Prompt versions over HTTP: list, inspect, download any kept one, serve an older one (a
rollback) and a newer one again, pruning beyond the per-task limit; the classify threshold
``min_score`` (per request and as the task's default set by PATCH). On SQLite with local
objects and on Postgres with the S3 server."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from apiclient import Api
from psdata import dataset_zip, image_bytes
from sqlalchemy import select

from backbone.artifacts import read_prompt_metadata
from store.db import get_sessionmaker, session_scope
from store.models import PromptVersion

BACKENDS = [("sqlite", "local"), ("postgres", "s3")]
CLASSES = ("cat", "dog", "owl")


def _config(seed: int) -> dict[str, Any]:
    return {"l2_grid": [1.0], "max_iter": 30, "seed": seed}


def _publish(api: Api, tenant: dict[str, str], task_id: str, seed: int, version: int) -> dict[str, Any]:
    r = api.client.post(f"/v1/tasks/{task_id}/retrain", data={"config": json.dumps(_config(seed))}, headers=tenant)
    assert r.status_code == 202, r.text
    return api.wait(tenant, task_id, lambda t: t["version"] == version and t["training"]["status"] == "ready")


def _classify(api: Api, tenant: dict[str, str], task_id: str, query: str = "") -> Any:
    files = [("images", (f"{i}.png", image_bytes(i % 3, seed=40 + i), "image/png")) for i in range(3)]
    return api.client.post(f"/v1/tasks/{task_id}/classify{query}", files=files, headers=tenant)


@pytest.fixture
def three_versions(request: Any, settings_factory: Any, make_api: Any) -> tuple[Api, dict[str, str], str]:
    db, objects = request.param
    api = make_api(settings_factory(db=db, objects=objects))
    tenant = api.tenant()
    task = api.create_task(tenant, "linear-probe", dataset=dataset_zip(CLASSES, per_class=4), config=_config(1)).json()
    api.wait_ready(tenant, task["id"])
    _publish(api, tenant, task["id"], 2, 2)
    _publish(api, tenant, task["id"], 3, 3)
    return api, tenant, task["id"]


@pytest.mark.parametrize("three_versions", BACKENDS, indirect=True, ids=["sqlite-local", "postgres-s3"])
def test_list_download_and_serve_an_older_version(three_versions: Any) -> None:
    api, tenant, task_id = three_versions
    r = api.client.get(f"/v1/tasks/{task_id}/versions", headers=tenant)
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["count"] == 3 and listing["served_version"] == 3
    assert [v["version"] for v in listing["items"]] == [3, 2, 1]
    assert [v["served"] for v in listing["items"]] == [True, False, False]
    for v in listing["items"]:
        assert v["method"] == "linear-probe" and v["classes"] == list(CLASSES) and v["servable"]
        assert v["config"]["seed"] == v["version"]  # each version records its own run's config
        assert v["metrics"]["n_train"] > 0 and "per_class" not in v["metrics"]
        assert v["size"] > 0 and len(v["sha256"]) == 64 and v["fingerprint"].startswith("open_clip:tiny:random")

    # any kept version downloads, its bytes matching the listing
    for v in listing["items"]:
        r = api.client.get(f"/v1/tasks/{task_id}/prompt?version={v['version']}", headers=tenant)
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == v["sha256"]
        assert read_prompt_metadata(r.content)["version"] == str(v["version"])
        assert r.headers["X-Prompt-Version"] == str(v["version"])

    # the whole record of one version: per-class validation metrics and its confusion matrix
    full = api.client.get(f"/v1/tasks/{task_id}/versions/1", headers=tenant).json()
    assert {c["label"] for c in full["per_class"] or []} <= set(CLASSES)
    assert full["history"] is not None

    before = _classify(api, tenant, task_id).json()
    assert before["version"] == 3
    r = api.client.post(f"/v1/tasks/{task_id}/versions/1/serve", headers=tenant)
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["version"] == 1 and task["config"]["seed"] == 1 and task["status"] == "ready"
    answer = _classify(api, tenant, task_id).json()
    assert answer["version"] == 1  # at once: the request after the serve answers with version 1
    assert answer["predictions"] != before["predictions"]
    assert api.client.get(f"/v1/tasks/{task_id}/prompt", headers=tenant).headers["X-Prompt-Version"] == "1"
    listing = api.client.get(f"/v1/tasks/{task_id}/versions", headers=tenant).json()
    assert listing["served_version"] == 1 and [v["served"] for v in listing["items"]] == [False, False, True]

    # serving it again changes nothing; serving the newest again is a roll-forward
    assert api.client.post(f"/v1/tasks/{task_id}/versions/1/serve", headers=tenant).json()["version"] == 1
    assert api.client.post(f"/v1/tasks/{task_id}/versions/3/serve", headers=tenant).json()["version"] == 3
    again = _classify(api, tenant, task_id).json()
    assert again["version"] == 3 and again["predictions"] == before["predictions"]

    # a retrain after a rollback publishes the next number, never a reused one
    api.client.post(f"/v1/tasks/{task_id}/versions/2/serve", headers=tenant)
    t = _publish(api, tenant, task_id, 4, 4)
    assert t["version"] == 4 and _classify(api, tenant, task_id).json()["version"] == 4


@pytest.mark.parametrize("three_versions", [BACKENDS[0]], indirect=True, ids=["sqlite-local"])
def test_unknown_version_and_foreign_backbone(three_versions: Any) -> None:
    api, tenant, task_id = three_versions
    for path in (f"versions/9/serve", "versions/9", "prompt?version=9"):
        method = api.client.post if path.endswith("serve") else api.client.get
        r = method(f"/v1/tasks/{task_id}/{path}", headers=tenant)
        assert r.status_code == 404, (path, r.text)
        assert "no version 9" in r.json()["detail"] and "1, 2, 3" in r.json()["detail"]
    for path in ("versions/0/serve", "versions/0", "prompt?version=0"):  # version 0 is no kept version: 404
        method = api.client.post if path.endswith("serve") else api.client.get
        r = method(f"/v1/tasks/{task_id}/{path}", headers=tenant)
        assert r.status_code == 404 and "versions kept: 1, 2, 3" in r.json()["detail"], (path, r.text)
    for bad in ("-1", "x", "99999999999"):
        assert api.client.post(f"/v1/tasks/{task_id}/versions/{bad}/serve", headers=tenant).status_code == 422
    other = api.tenant()
    assert api.client.get(f"/v1/tasks/{task_id}/versions", headers=other).status_code == 404
    assert api.client.post(f"/v1/tasks/{task_id}/versions/1/serve", headers=other).status_code == 404

    # a version made on another backbone (say, before the operator changed PROMPTSTORE_BACKBONE)
    sm = get_sessionmaker(api.state.settings.database_url)
    with session_scope(sm) as s:
        v1 = s.scalar(select(PromptVersion).where(PromptVersion.task_id == task_id, PromptVersion.version == 1))
        s.add(PromptVersion(
            task_id=task_id, tenant_id=v1.tenant_id, version=5, object_key=v1.object_key, sha256=v1.sha256,
            size=v1.size, fingerprint="open_clip:ViT-B-32:openai#0123456789abcdef", config=v1.config,
            method=v1.method, classes=v1.classes,
        ))
    r = api.client.post(f"/v1/tasks/{task_id}/versions/5/serve", headers=tenant)
    assert r.status_code == 409, r.text
    assert "open_clip:ViT-B-32:openai" in r.json()["detail"] and "retrain" in r.json()["detail"]
    listed = {v["version"]: v for v in api.client.get(f"/v1/tasks/{task_id}/versions", headers=tenant).json()["items"]}
    assert listed[5]["servable"] is False and listed[3]["servable"] is True
    assert _classify(api, tenant, task_id).json()["version"] == 3  # nothing changed


def test_old_versions_pruned_beyond_the_limit_never_the_served_one(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory(max_versions_per_task=2))
    tenant = api.tenant()
    task = api.create_task(tenant, "linear-probe", dataset=dataset_zip(CLASSES, per_class=4), config=_config(1)).json()
    api.wait_ready(tenant, task["id"])
    _publish(api, tenant, task["id"], 2, 2)
    assert api.client.post(f"/v1/tasks/{task['id']}/versions/1/serve", headers=tenant).status_code == 200
    _publish(api, tenant, task["id"], 3, 3)  # keeps 3 (served now) and 2 (newest after it); 1 goes
    versions = api.client.get(f"/v1/tasks/{task['id']}/versions", headers=tenant).json()
    assert [v["version"] for v in versions["items"]] == [3, 2] and versions["max_versions"] == 2
    api.client.post(f"/v1/tasks/{task['id']}/versions/2/serve", headers=tenant)
    _publish(api, tenant, task["id"], 4, 4)
    assert [v["version"] for v in api.client.get(f"/v1/tasks/{task['id']}/versions", headers=tenant).json()["items"]] == [4, 3]
    r = api.client.get(f"/v1/tasks/{task['id']}/prompt?version=1", headers=tenant)
    assert r.status_code == 404 and "versions kept: 3, 4" in r.json()["detail"]


@pytest.mark.parametrize("backend", BACKENDS, ids=["sqlite-local", "postgres-s3"])
def test_min_score_per_request_and_as_the_task_default(backend: Any, settings_factory: Any, make_api: Any) -> None:
    db, objects = backend
    api = make_api(settings_factory(db=db, objects=objects))
    tenant = api.tenant()
    task = api.create_task(tenant, "linear-probe", dataset=dataset_zip(CLASSES, per_class=4), config=_config(1)).json()
    task_id = task["id"]
    api.wait_ready(tenant, task_id)
    full = _classify(api, tenant, task_id).json()
    assert full["min_score"] is None and all(len(p) == 3 for p in full["predictions"])
    scores = sorted({p["score"] for image in full["predictions"] for p in image})
    # thresholds between the scores seen, and one above all of them: an image may keep none
    for t in (scores[0], scores[len(scores) // 2], (scores[-2] + scores[-1]) / 2, min(1.0, scores[-1] + 1e-6)):
        got = _classify(api, tenant, task_id, f"?min_score={t!r}").json()
        assert got["min_score"] == pytest.approx(t)
        assert got["predictions"] == [[p for p in image if p["score"] >= t] for image in full["predictions"]]
    top1 = _classify(api, tenant, task_id, f"?min_score=1&top_k=1").json()
    assert top1["predictions"] == [[p for p in image[:1] if p["score"] >= 1.0] for image in full["predictions"]]
    assert any(image == [] for image in top1["predictions"])  # "none of these", not a guess

    for bad in ("-0.1", "1.5", "nan", "inf", "x"):
        r = _classify(api, tenant, task_id, f"?min_score={bad}")
        assert r.status_code == 422, (bad, r.text)
        assert "min_score" in r.json()["detail"]

    # the task's default, set by PATCH, applies when a request gives none; a request overrides it
    middle = scores[len(scores) // 2]
    r = api.client.patch(f"/v1/tasks/{task_id}", json={"min_score": middle}, headers=tenant)
    assert r.status_code == 200, r.text
    assert r.json()["min_score"] == middle
    got = _classify(api, tenant, task_id).json()
    assert got["min_score"] == middle
    assert got["predictions"] == [[p for p in image if p["score"] >= middle] for image in full["predictions"]]
    assert _classify(api, tenant, task_id, "?min_score=0").json()["predictions"] == full["predictions"]
    assert api.client.patch(f"/v1/tasks/{task_id}", json={"name": "renamed"}, headers=tenant).json()["min_score"] == middle
    assert api.client.patch(f"/v1/tasks/{task_id}", json={"min_score": None}, headers=tenant).json()["min_score"] is None
    assert _classify(api, tenant, task_id).json()["predictions"] == full["predictions"]
    assert api.task(tenant, task_id)["name"] == "renamed"

    for body, word in (
        ({"min_score": 2}, "min_score"), ({"min_score": "high"}, "min_score"), ({"threshold": 0.5}, "threshold"),
        ({"name": ""}, "name"), ({"name": None}, "name"), ([1], "body"),
        # JSON types are taken as sent: true is no number, "0.6" no threshold, "yes" no boolean
        ({"min_score": True}, "min_score"), ({"min_score": "0.6"}, "min_score"),
        ({"zero_shot_until_trained": "yes"}, "zero_shot_until_trained"),
        ({"retrain_after_samples": True}, "retrain_after_samples"), ({"retrain_after_samples": "5"}, "retrain_after_samples"),
        ({"retrain_after_samples": 0}, "retrain_after_samples"),
    ):
        r = api.client.patch(f"/v1/tasks/{task_id}", json=body, headers=tenant)
        assert r.status_code == 422, (body, r.text)
        assert word in r.json()["detail"], (body, r.text)
    r = api.client.patch(f"/v1/tasks/{task_id}", content=b'{"min_score": NaN}', headers={**tenant, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    # the answer is the task as committed: each PATCH shows its own change, not the previous one
    for n in (50, 70, None):
        r = api.client.patch(f"/v1/tasks/{task_id}", json={"retrain_after_samples": n}, headers=tenant)
        assert r.status_code == 200 and r.json()["retrain_after_samples"] == n, r.text
        assert api.task(tenant, task_id)["retrain_after_samples"] == n
    # the same threshold again is no change: no second event
    def threshold_events() -> int:
        items = api.client.get(f"/v1/tasks/{task_id}/events", headers=tenant).json()["items"]
        return sum(e["kind"] == "min_score" for e in items)

    before = threshold_events()
    api.client.patch(f"/v1/tasks/{task_id}", json={"min_score": 0.25}, headers=tenant)
    api.client.patch(f"/v1/tasks/{task_id}", json={"min_score": 0.25}, headers=tenant)
    assert threshold_events() == before + 1
    assert api.client.patch("/v1/tasks/nope", json={"min_score": 0.5}, headers=tenant).status_code == 404
    assert api.client.patch(f"/v1/tasks/{task_id}", json={"min_score": 0.5}, headers=api.tenant()).status_code == 404


def test_classify_options_in_the_body_are_refused_not_ignored(settings_factory: Any, make_api: Any) -> None:
    """top_k, min_score and keep are query parameters; sent in the body they would be ignored
    (a threshold not applied is a wrong answer given with 200): 422 saying where they go."""
    from psdata import b64

    api = make_api(settings_factory())
    tenant = api.tenant()
    task = api.create_task(tenant, "linear-probe", dataset=dataset_zip(CLASSES, per_class=4), config=_config(1)).json()
    api.wait_ready(tenant, task["id"])
    url = f"/v1/tasks/{task['id']}/classify"
    for extra in ({"min_score": 0.5}, {"top_k": 1}, {"keep": True}, {"foo": 1}):
        r = api.client.post(url, json={"images": [b64(image_bytes(0))], **extra}, headers=tenant)
        assert r.status_code == 422, (extra, r.text)
        assert repr(next(iter(extra))) in r.json()["detail"] and "?top_k=K&min_score=S" in r.json()["detail"]
    files = [("images", ("a.png", image_bytes(0), "image/png"))]
    r = api.client.post(url, data={"min_score": "0.5"}, files=files, headers=tenant)
    assert r.status_code == 422 and "'min_score'" in r.json()["detail"], r.text
    assert api.client.post(url, files=files, headers=tenant).status_code == 200

    # a zeroshot task takes no samples: keeping its images would store them for nothing
    zs = api.create_task(tenant, "zeroshot", classes=list(CLASSES)).json()
    api.wait_ready(tenant, zs["id"])
    r = api.client.post(f"/v1/tasks/{zs['id']}/classify?keep=true", files=files, headers=tenant)
    assert r.status_code == 422 and "keep" in r.json()["detail"], r.text
    r = api.client.patch(f"/v1/tasks/{zs['id']}", json={"retrain_after_samples": 5}, headers=tenant)
    assert r.status_code == 422 and "retrain_after_samples" in r.json()["detail"], r.text
