"""Zero-shot until trained: a task created with ``zero_shot_until_trained`` answers classify
with zero-shot predictions on its class names (``version`` 0, ``zero_shot`` true) from the
moment it exists until its first version is published, then with that version and never
again with version 0. Without the option, or when zero-shot cannot serve (a class name too
long for the text encoder, a backbone without a text tower), a task with no version keeps
the contract's 409."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from apiclient import Api
from psdata import dataset_zip, image_bytes

CLASSES = ("cat", "dog", "owl")
#: A run slow enough to classify during it on a loaded machine (linear-probe is too quick).
SLOW = {"epochs": 200, "n_ctx": 4}


def _create(api: Api, tenant: dict[str, str], *, zero_shot: bool | None, classes: tuple[str, ...] = CLASSES,
            method: str = "coop", config: dict[str, Any] | None = None) -> Any:
    data = {"name": "z", "method": method, "config": json.dumps(config if config is not None else SLOW)}
    if zero_shot is not None:
        data["zero_shot_until_trained"] = "true" if zero_shot else "false"
    files = {"dataset": ("d.zip", dataset_zip(classes, per_class=3), "application/zip")}
    return api.client.post("/v1/tasks", data=data, files=files, headers=tenant)


def _classify(api: Api, tenant: dict[str, str], task_id: str) -> Any:
    files = [("images", (f"{i}.png", image_bytes(i, seed=60 + i), "image/png")) for i in range(3)]
    return api.client.post(f"/v1/tasks/{task_id}/classify", files=files, headers=tenant)


@pytest.mark.parametrize("backend", [("sqlite", "local"), ("postgres", "s3")], ids=["sqlite-local", "postgres-s3"])
def test_zero_shot_before_the_first_version_then_version_1_and_never_0_again(
    backend: Any, settings_factory: Any, make_api: Any
) -> None:
    db, objects = backend
    api = make_api(settings_factory(db=db, objects=objects))
    tenant = api.tenant()
    # the reference: a zeroshot task on the same class names
    ref = api.create_task(tenant, "zeroshot", classes=list(CLASSES)).json()
    api.wait_ready(tenant, ref["id"])
    expected = _classify(api, tenant, ref["id"]).json()["predictions"]

    r = _create(api, tenant, zero_shot=True)
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["zero_shot_until_trained"] is True and task["version"] is None
    first = _classify(api, tenant, task["id"])  # at once, whatever state the run is in
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["version"] == 0 and body["zero_shot"] is True
    for got, want in zip(body["predictions"], expected):
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-6)

    # classify without pause while the run finishes: version 0 until the publish, then version 1
    answers: list[tuple[int, float]] = []  # (version, when the request was sent)
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            r = _classify(api, tenant, task["id"])
            assert r.status_code == 200, r.text
            answers.append((r.json()["version"], sent))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        api.wait_ready(tenant, task["id"], timeout=300)
        ready_at = time.monotonic()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(30)
    versions = [v for v, _ in answers]
    assert set(versions) <= {0, 1} and versions == sorted(versions), versions  # never 0 after a 1
    assert all(v == 1 for v, sent in answers if sent > ready_at)  # a request sent after the publish: version 1
    after = _classify(api, tenant, task["id"]).json()
    assert after["version"] == 1 and after["zero_shot"] is False


def _stopped(api: Api, tenant: dict[str, str], task_id: str) -> dict[str, Any]:
    """Cancel the task's first run and wait until it is cancelled: it has no version, for sure."""
    r = api.client.post(f"/v1/tasks/{task_id}/cancel", headers=tenant)
    assert r.status_code == 202, r.text
    task = api.wait(tenant, task_id, lambda t: t["status"] in ("cancelled", "failed", "ready"))
    assert task["status"] == "cancelled" and task["version"] is None, task
    return task


def test_without_the_option_or_when_zero_shot_cannot_serve_it_is_409(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    tenant = api.tenant()
    plain = _create(api, tenant, zero_shot=None).json()
    assert plain["zero_shot_until_trained"] is False
    _stopped(api, tenant, plain["id"])
    r = _classify(api, tenant, plain["id"])
    assert r.status_code == 409, r.text
    assert "not ready" in r.json()["detail"]

    # switched on later by PATCH (a cancelled task too has no version): version 0; off again: 409
    r = api.client.patch(f"/v1/tasks/{plain['id']}", json={"zero_shot_until_trained": True}, headers=tenant)
    assert r.status_code == 200 and r.json()["zero_shot_until_trained"] is True
    assert _classify(api, tenant, plain["id"]).json()["version"] == 0
    api.client.patch(f"/v1/tasks/{plain['id']}", json={"zero_shot_until_trained": False}, headers=tenant)
    assert _classify(api, tenant, plain["id"]).status_code == 409

    # a class name whose zero-shot prompt does not fit the text encoder: CoOp builds text
    # prompts and refuses it at upload already; a VPT task with a linear head builds none, so
    # its upload is accepted, and zero-shot cannot serve it
    long = "very " * 90 + "long"
    t = _create(api, tenant, zero_shot=True, classes=("cat", long), method="coop", config=SLOW)
    assert t.status_code == 422, t.text
    t = _create(api, tenant, zero_shot=True, classes=("cat", long), method="vpt-shallow",
                config={"epochs": 200, "head": "linear"})
    assert t.status_code == 202, t.text
    _stopped(api, tenant, t.json()["id"])
    r = _classify(api, tenant, t.json()["id"])
    assert r.status_code == 409, r.text
    assert "zero-shot" in r.json()["detail"] and "token" in r.json()["detail"]

    for bad in ("maybe", "2"):
        r = api.client.post("/v1/tasks", data={"name": "x", "method": "coop", "zero_shot_until_trained": bad},
                            files={"dataset": ("d.zip", dataset_zip(CLASSES, per_class=3), "application/zip")},
                            headers=tenant)
        assert r.status_code == 422 and "zero_shot_until_trained" in r.json()["detail"], r.text


def test_a_backbone_without_a_text_tower_keeps_409(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory(backbone="timm:vit_tiny_patch16_224:random"))
    tenant = api.tenant()
    t = _create(api, tenant, zero_shot=True, method="vpt-shallow", config={"epochs": 200, "head": "linear"})
    assert t.status_code == 202, t.text
    _stopped(api, tenant, t.json()["id"])
    r = _classify(api, tenant, t.json()["id"])
    assert r.status_code == 409, r.text
    assert "no text tower" in r.json()["detail"]
