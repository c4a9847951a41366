"""Feedback from predictions over HTTP: classify with ``keep=true`` keeps each image for the
retention period and answers a prediction id per image; ``POST /v1/tasks/{id}/feedback`` with
one and the right label turns that image into a sample (the next run trains on it). Without
``keep`` nothing is stored and no id can be labelled (404); an expired prediction is refused
with 404 saying when it expired; the periodic sweep deletes the expired images and, later,
their records. On SQLite with local objects and on Postgres with the S3 server."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest
from apiclient import Api
from psdata import b64, dataset_zip, image_bytes
from sqlalchemy import func, select, update

from store.db import session_scope
from store.models import Prediction, Sample
from store.samples import sweep_predictions

BACKENDS = [("sqlite", "local"), ("postgres", "s3")]
IDS = ["sqlite-local", "postgres-s3"]
CONFIG = {"l2_grid": [1.0], "max_iter": 30}


@pytest.fixture(params=BACKENDS, ids=IDS)
def ready(request: Any, settings_factory: Any, make_api: Any) -> tuple[Api, dict[str, str], str]:
    db, objects = request.param
    api = make_api(settings_factory(db=db, objects=objects, prediction_retention_s=3600, prediction_record_s=600))
    tenant = api.tenant()
    task = api.create_task(tenant, "linear-probe", dataset=dataset_zip(("cat", "dog"), per_class=4), config=CONFIG).json()
    api.wait_ready(tenant, task["id"])
    return api, tenant, task["id"]


def _prediction_objects(api: Api) -> set[str]:
    return {i.key for i in api.state.objects.list("predictions/")}


def _prediction_rows(api: Api, task_id: str) -> int:
    """Kept predictions of the task (the Postgres database is shared by the session's tests)."""
    with session_scope(api.state.sessionmaker) as s:
        return int(s.scalar(select(func.count()).select_from(Prediction).where(Prediction.task_id == task_id)) or 0)


def _feedback(api: Api, tenant: dict[str, str], task_id: str, prediction_id: str, label: str) -> Any:
    return api.client.post(f"/v1/tasks/{task_id}/feedback", json={"prediction_id": prediction_id, "label": label},
                           headers=tenant)


def test_feedback_turns_a_kept_prediction_into_a_sample(ready: Any) -> None:
    api, tenant, task_id = ready
    owl, other = image_bytes(2, seed=900), image_bytes(1, seed=901)
    plain = api.classify_files(tenant, task_id, [owl, other], top_k=1).json()

    files = [("images", ("a.png", owl, "image/png")), ("images", ("b.png", other, "image/png"))]
    r = api.client.post(f"/v1/tasks/{task_id}/classify?keep=true&top_k=1", files=files, headers=tenant)
    assert r.status_code == 200, r.text
    kept = r.json()
    ids = kept["prediction_ids"]
    assert len(ids) == 2 and len(set(ids)) == 2 and kept["kept_until"] is not None
    assert kept["predictions"] == plain["predictions"] and kept["version"] == plain["version"] == 1
    assert len(_prediction_objects(api)) == 2
    # JSON bodies keep too, one id per image in order
    r = api.client.post(f"/v1/tasks/{task_id}/classify?keep=true", json={"images": [b64(other)]}, headers=tenant)
    assert r.status_code == 200 and len(r.json()["prediction_ids"]) == 1

    # the right label (a new one) turns the image into a sample
    r = _feedback(api, tenant, task_id, ids[0], "owl")
    assert r.status_code == 201, r.text
    sample = r.json()
    assert sample["label"] == "owl" and sample["source"] == "feedback" and sample["prediction_id"] == ids[0]
    assert sample["sha256"] == hashlib.sha256(owl).hexdigest() and sample["size"] == len(owl)
    listed = api.client.get(f"/v1/tasks/{task_id}/samples?label=owl", headers=tenant).json()
    assert [s["id"] for s in listed["items"]] == [sample["id"]] and listed["samples_since_run"] == 1
    # the same feedback again: the same sample (200); another label for it: 409
    r = _feedback(api, tenant, task_id, ids[0], "owl")
    assert r.status_code == 200 and r.json()["id"] == sample["id"] and r.json()["duplicate"] is True
    r = _feedback(api, tenant, task_id, ids[0], "cat")
    assert r.status_code == 409 and sample["id"] in r.json()["detail"]
    # an image that is already a sample of the same class: counted once
    r = _feedback(api, tenant, task_id, ids[1], "dog")
    assert r.status_code == 201 and r.json()["duplicate"] is False
    dup = api.client.post(f"/v1/tasks/{task_id}/classify?keep=true", json={"images": [b64(other)]}, headers=tenant)
    r = _feedback(api, tenant, task_id, dup.json()["prediction_ids"][0], "dog")
    assert r.status_code == 200 and r.json()["duplicate"] is True and r.json()["id"] != sample["id"]
    # ... and under another class: refused, naming the sample it already is
    dup = api.client.post(f"/v1/tasks/{task_id}/classify?keep=true", json={"images": [b64(owl)]}, headers=tenant)
    r = _feedback(api, tenant, task_id, dup.json()["prediction_ids"][0], "cat")
    assert r.status_code == 422 and sample["id"] in r.json()["detail"] and "'owl'" in r.json()["detail"]

    # the next run trains on it
    r = api.client.post(f"/v1/tasks/{task_id}/retrain", headers=tenant)
    assert r.status_code == 202, r.text
    api.wait(tenant, task_id, lambda t: t["version"] == 2 and t["training"]["status"] == "ready")
    v2 = api.client.get(f"/v1/tasks/{task_id}/versions/2", headers=tenant).json()
    assert v2["classes"] == ["cat", "dog", "owl"] and v2["sample_counts"] == {"cat": 4, "dog": 5, "owl": 1}


def test_without_keep_nothing_is_stored_and_no_feedback(ready: Any) -> None:
    api, tenant, task_id = ready
    r = api.classify_files(tenant, task_id, [image_bytes(0, seed=950)])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prediction_ids"] is None and body["kept_until"] is None
    assert set(body) == {"task_id", "version", "zero_shot", "min_score", "predictions", "prediction_ids", "kept_until"}
    assert _prediction_objects(api) == set() and _prediction_rows(api, task_id) == 0
    # an id that was never kept, or another task's (or tenant's) kept one: 404
    r = _feedback(api, tenant, task_id, "0" * 32, "cat")
    assert r.status_code == 404 and "keep=true" in r.json()["detail"]
    other_task = api.create_task(tenant, "linear-probe", dataset=dataset_zip(("cat", "dog"), per_class=4),
                                 config=CONFIG).json()["id"]
    api.wait_ready(tenant, other_task)
    r = api.client.post(f"/v1/tasks/{other_task}/classify?keep=true", json={"images": [b64(image_bytes(0))]},
                        headers=tenant)
    foreign = r.json()["prediction_ids"][0]
    assert _feedback(api, tenant, task_id, foreign, "cat").status_code == 404
    assert _feedback(api, api.tenant(), other_task, foreign, "cat").status_code == 404
    with session_scope(api.state.sessionmaker) as s:
        assert s.scalar(select(func.count()).select_from(Sample).where(
            Sample.source == "feedback", Sample.task_id.in_([task_id, other_task]))) == 0


def test_feedback_bad_input(ready: Any) -> None:
    api, tenant, task_id = ready
    r = api.client.post(f"/v1/tasks/{task_id}/classify?keep=true", json={"images": [b64(image_bytes(2))]},
                        headers=tenant)
    pid = r.json()["prediction_ids"][0]
    cases = [
        (_feedback(api, tenant, task_id, pid, ""), 422, "label is blank"),
        (_feedback(api, tenant, task_id, pid, "a\x00b"), 422, "label"),
        (_feedback(api, tenant, "0" * 32, pid, "owl"), 404, f"task {'0' * 32} not found"),
        (api.client.post(f"/v1/tasks/{task_id}/feedback", json={"prediction_id": pid}, headers=tenant), 422, "label"),
        (api.client.post(f"/v1/tasks/{task_id}/feedback", json={"prediction_id": pid, "label": "owl", "x": 1},
                         headers=tenant), 422, "x"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, r.text
        assert words in r.json()["detail"], r.json()
    r = api.client.post(f"/v1/tasks/{task_id}/classify?keep=maybe", json={"images": [b64(image_bytes(2))]},
                        headers=tenant)
    assert r.status_code == 422 and "keep" in r.json()["detail"]


def test_an_expired_prediction_is_refused_with_when_and_swept(ready: Any) -> None:
    api, tenant, task_id = ready
    r = api.client.post(f"/v1/tasks/{task_id}/classify?keep=true", json={"images": [b64(image_bytes(2, seed=5))]},
                        headers=tenant)
    pid = r.json()["prediction_ids"][0]
    (key,) = _prediction_objects(api)
    # its retention is over (moved into the past: no waiting)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=60)
    with session_scope(api.state.sessionmaker) as s:
        s.execute(update(Prediction).where(Prediction.id == pid).values(
            created_at=past - dt.timedelta(seconds=3600), expires_at=past))
    r = _feedback(api, tenant, task_id, pid, "owl")
    assert r.status_code == 404, r.text
    detail = r.json()["detail"]
    assert "expired at" in detail and past.isoformat(timespec="seconds")[:16] in detail and "3600 s" in detail
    # the sweep deletes the image and keeps the record: still "expired", not "unknown"
    settings = api.state.settings
    report = sweep_predictions(api.state.sessionmaker, api.state.objects, record_s=settings.prediction_record_s)
    assert report.images == [key] and report.records == 0
    assert _prediction_objects(api) == set() and _prediction_rows(api, task_id) == 1
    r = _feedback(api, tenant, task_id, pid, "owl")
    assert r.status_code == 404 and "expired at" in r.json()["detail"]
    # once the record's time is over too, the row goes
    later = past + dt.timedelta(seconds=settings.prediction_record_s + 1)  # before any other row expires
    report = sweep_predictions(api.state.sessionmaker, api.state.objects, record_s=settings.prediction_record_s,
                               now=later)
    assert report.records == 1 and _prediction_rows(api, task_id) == 0
    r = _feedback(api, tenant, task_id, pid, "owl")
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    # a live prediction is left alone by the sweep
    r = api.client.post(f"/v1/tasks/{task_id}/classify?keep=true", json={"images": [b64(image_bytes(2, seed=6))]},
                        headers=tenant)
    assert sweep_predictions(api.state.sessionmaker, api.state.objects, record_s=0).images == []
    assert _feedback(api, tenant, task_id, r.json()["prediction_ids"][0], "owl").status_code == 201


def test_deleting_the_task_takes_its_kept_predictions(ready: Any) -> None:
    """The rows go with the task; the images are left to the sweep/collector (no row refers to them)."""
    api, tenant, task_id = ready
    r = api.client.post(f"/v1/tasks/{task_id}/classify?keep=true", json={"images": [b64(image_bytes(2, seed=8))]},
                        headers=tenant)
    assert r.status_code == 200
    assert api.client.delete(f"/v1/tasks/{task_id}", headers=tenant).status_code == 204
    assert _prediction_rows(api, task_id) == 0
