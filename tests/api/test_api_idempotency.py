"""Idempotency-Key on task creation and retrain: the same key again answers the first answer
and creates nothing; another request with it is refused; keys are per tenant, remembered 24 h
(a setting), and hold under concurrent duplicates (the unique key in the database), on SQLite
and Postgres alike."""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

import pytest
from psdata import dataset_zip
from sqlalchemy import update

from store.models import IdempotencyKey

ZS = {"name": "pets", "method": "zeroshot", "classes": json.dumps(["cat", "dog"])}


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, settings_factory: Any, make_api: Any) -> Any:
    return make_api(settings_factory(db=request.param))


def post(api: Any, headers: dict[str, str], key: Any, data: dict[str, str] = ZS, **kw: Any) -> Any:
    h = dict(headers)
    if key is not None:
        h["Idempotency-Key"] = key
    return api.client.post("/v1/tasks", data=data, headers=h, **kw)


def count(api: Any, headers: dict[str, str]) -> int:
    return api.client.get("/v1/tasks", headers=headers).json()["count"]


def test_same_key_replays_the_first_answer_and_creates_nothing(api: Any) -> None:
    headers = api.tenant()
    first = post(api, headers, "k-1")
    assert first.status_code == 202, first.text
    again = post(api, headers, "k-1")
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert count(api, headers) == 1
    # with a dataset: the file is part of the request
    files = {"dataset": ("d.zip", dataset_zip(), "application/zip")}
    data = {"name": "coop", "method": "coop", "config": json.dumps({"epochs": 1})}
    a = post(api, headers, "k-2", data, files=files)
    b = post(api, headers, "k-2", data, files={"dataset": ("d.zip", dataset_zip(), "application/zip")})
    assert a.status_code == b.status_code == 202, (a.text, b.text)
    assert a.json()["id"] == b.json()["id"]
    assert count(api, headers) == 2
    # without a key nothing is remembered
    assert post(api, headers, None).json()["id"] != post(api, headers, None).json()["id"]


def test_same_key_for_another_request_is_refused(api: Any) -> None:
    headers = api.tenant()
    assert post(api, headers, "k").status_code == 202
    other = post(api, headers, "k", {**ZS, "name": "other"})
    assert other.status_code == 422
    assert "Idempotency-Key 'k' was already used for another request" in other.json()["detail"]
    files = {"dataset": ("d.zip", dataset_zip(seed=1), "application/zip")}
    r = post(api, headers, "k2", {"name": "c", "method": "coop"}, files=files)
    assert r.status_code == 202, r.text
    r = post(api, headers, "k2", {"name": "c", "method": "coop"},
             files={"dataset": ("d.zip", dataset_zip(seed=2), "application/zip")})
    assert r.status_code == 422, r.text
    assert count(api, headers) == 2
    for bad in ("", "a b", "x" * 256, "é".encode()):
        r = post(api, headers, bad)
        assert r.status_code == 422, (bad, r.text)
        assert "Idempotency-Key must be 1-255 visible ASCII characters" in r.json()["detail"]


def test_keys_are_per_tenant(api: Any) -> None:
    a, b = api.tenant(), api.tenant()
    ra, rb = post(api, a, "shared"), post(api, b, "shared")
    assert ra.status_code == rb.status_code == 202
    assert ra.json()["id"] != rb.json()["id"]
    assert count(api, a) == count(api, b) == 1


def test_a_key_is_forgotten_after_its_retention(api: Any) -> None:
    headers = api.tenant()
    first = post(api, headers, "old").json()
    sm = api.state.sessionmaker

    def age(hours: float) -> None:
        when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)
        with sm.begin() as s:
            s.execute(update(IdempotencyKey).values(created_at=when))

    age(23)  # still remembered
    assert post(api, headers, "old").json()["id"] == first["id"]
    age(25)  # past the default 24 h: a new request
    second = post(api, headers, "old", {**ZS, "name": "new"})
    assert second.status_code == 202, second.text
    assert second.json()["id"] != first["id"]
    assert post(api, headers, "old", {**ZS, "name": "new"}).json()["id"] == second.json()["id"]


def test_concurrent_duplicates_create_one_task(api: Any) -> None:
    headers = api.tenant()
    for round_ in range(3):
        barrier = threading.Barrier(4)
        results: list[Any] = []
        data = {"name": f"c{round_}", "method": "coop", "config": json.dumps({"epochs": 1})}
        zipped = dataset_zip()  # once: a zip's entries carry the time they were written

        def send() -> None:
            files = {"dataset": ("d.zip", zipped, "application/zip")}
            barrier.wait()
            results.append(post(api, headers, f"race-{round_}", data, files=files))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [r.status_code for r in results] == [202] * 4, [r.text for r in results]
        assert len({r.json()["id"] for r in results}) == 1
        assert count(api, headers) == round_ + 1


def test_retrain_with_a_key_runs_once(api: Any) -> None:
    headers = api.tenant()
    task = post(api, headers, None).json()
    api.wait_ready(headers, task["id"])
    h = {**headers, "Idempotency-Key": "retrain-1"}
    first = api.client.post(f"/v1/tasks/{task['id']}/retrain", headers=h)
    assert first.status_code == 202, first.text
    api.wait(headers, task["id"], lambda t: t["version"] == 2 and (t["training"] or {}).get("status") not in ("queued", "running"))
    again = api.client.post(f"/v1/tasks/{task['id']}/retrain", headers=h)
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert api.task(headers, task["id"])["version"] == 2  # no third run
    other = api.client.post(f"/v1/tasks/{task['id']}/retrain", headers=h, data={"config": "{}"})
    assert other.status_code == 422, other.text
    # the same key on task creation is another request too
    assert post(api, headers, "retrain-1").status_code == 422
