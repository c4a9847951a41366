"""``method: auto`` and ``config.search`` through the service: the task is created and tuned as
any other; its version is an ordinary prompt of the method the search chose (listed with that
method and the chosen config), the task exposes the leaderboard, and it classifies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from apiclient import Api
from psdata import dataset_zip, image_bytes

CLASSES = ("cat", "dog", "owl")
AUTO = {
    "budget_s": 60,
    "candidates": [
        {"method": "linear-probe", "config": {"l2_grid": [1.0, 0.01], "max_iter": 30}},
        {"method": "coop", "config": {"epochs": 2, "n_ctx": 2}},
    ],
}


@pytest.mark.parametrize("backend", [("sqlite", "local"), ("postgres", "s3")], ids=["sqlite-local", "postgres-s3"])
def test_auto_task_publishes_the_chosen_method_and_exposes_its_leaderboard(
    backend: Any, settings_factory: Any, make_api: Any
) -> None:
    db, objects = backend
    api: Api = make_api(settings_factory(db=db, objects=objects))
    tenant = api.tenant()
    task = api.create_task(tenant, "auto", dataset=dataset_zip(CLASSES, per_class=4), config=AUTO).json()
    assert task["method"] == "auto" and task["config"]["budget_s"] == 60
    ready = api.wait_ready(tenant, task["id"], timeout=300)
    search = ready["metrics"]["search"]
    board = search["leaderboard"]
    assert {row["method"] for row in board} == {"linear-probe", "coop"}
    for row in board:
        assert {"method", "config", "val_accuracy", "tuning_seconds", "resident_bytes", "status"} <= set(row)
    chosen = search["chosen"]
    assert chosen["method"] in ("linear-probe", "coop")
    done = [row for row in board if row["status"] == "done"]
    assert max(r["val_accuracy"] for r in done) == next(
        r["val_accuracy"] for r in done if r["method"] == chosen["method"]
    )

    # the version is an ordinary prompt of the chosen method, recorded with its config
    version = api.client.get(f"/v1/tasks/{task['id']}/versions/1", headers=tenant).json()
    assert version["method"] == chosen["method"] and version["config"] == chosen["config"]
    prompt = api.client.get(f"/v1/tasks/{task['id']}/prompt", headers=tenant)
    from backbone.artifacts import read_prompt_metadata

    meta = read_prompt_metadata(prompt.content)
    assert meta["method"] == chosen["method"] and json.loads(meta["config"]) == chosen["config"]
    files = [("images", ("a.png", image_bytes(1, seed=3), "image/png"))]
    r = api.client.post(f"/v1/tasks/{task['id']}/classify", files=files, headers=tenant)
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    assert {p["label"] for p in r.json()["predictions"][0]} == set(CLASSES)
    # listed and filtered as auto
    listed = api.client.get("/v1/tasks?method=auto", headers=tenant).json()
    assert [t["id"] for t in listed["items"]] == [task["id"]]


def test_auto_and_search_configs_are_checked_at_create(settings_factory: Any, make_api: Any) -> None:
    api: Api = make_api(settings_factory())
    tenant = api.tenant()
    data = dataset_zip(CLASSES, per_class=3)
    for config, word in (
        ({"budget_s": -1}, "budget_s"),
        ({"candidates": [{"method": "magic"}]}, "magic"),
        ({"bogus": 1}, "bogus"),
    ):
        r = api.create_task(tenant, "auto", dataset=data, config=config, expect=None)
        assert r.status_code == 422 and word in r.json()["detail"], (config, r.text)
    r = api.create_task(tenant, "auto", classes=list(CLASSES), expect=None)  # auto is tuned on images
    assert r.status_code == 422 and "dataset" in r.json()["detail"], r.text
    r = api.create_task(tenant, "zeroshot", classes=list(CLASSES), config={"search": True}, expect=None)
    assert r.status_code == 422 and "search" in r.json()["detail"], r.text
    r = api.create_task(tenant, "linear-probe", dataset=data, config={"search": True, "l2_grid": [1.0], "max_iter": 20})
    t = api.wait_ready(tenant, r.json()["id"], timeout=300)
    version = api.client.get(f"/v1/tasks/{t['id']}/versions/1", headers=tenant).json()
    assert version["method"] == "linear-probe" and version["config"]["search"] is False
    assert t["config"]["search"] is False  # the served version's: the config the search chose
