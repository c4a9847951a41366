"""Events (issue "Events"): ``GET /v1/tasks/{id}/events`` lists what happened to a task, oldest
first, as JSON pages, and with ``Accept: text/event-stream`` streams them as Server-Sent Events
while a run goes on (``api.routes.events``), on SQLite and Postgres, through the real app and
in-process jobs. A stream resumes after ``Last-Event-ID``, sends heartbeats while nothing
happens, says ``deleted`` and ends when the task goes, ends with ``until_idle=true`` once the
task is idle, and sends an event that committed late (out of id order).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from psdata import dataset_zip
from sqlalchemy import insert, select

import api.routes.events as events_route
from store.models import Task, TaskEvent

CLASSES = ("bird", "cat", "dog")
SSE = {"Accept": "text/event-stream"}


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_route, "POLL_S", 0.02)


def _settings(settings_factory: Any, backend: str) -> Any:
    return settings_factory(db=backend, objects="local")


def _coop(api: Any, tenant: dict[str, str], config: dict[str, Any]) -> dict[str, Any]:
    return api.create_task(tenant, "coop", dataset=dataset_zip(CLASSES, per_class=4), config=config).json()


def sse_blocks(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The stream's blocks: ``{"id", "event", "data"}`` for an event (data parsed), ``{"comment"}``
    for a comment line, ``{"retry"}``."""
    block: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if block:
                if "data" in block:
                    block["data"] = json.loads(block["data"])
                yield block
            block = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            block[name] = value[1:] if value.startswith(" ") else value
    if block:
        yield block


def stream(api: Any, headers: dict[str, str], task_id: str, **params: Any) -> list[dict[str, Any]]:
    """The whole stream (it must end: ``until_idle`` or a delete), as event blocks."""
    extra = {k: str(v) for k, v in params.items() if k != "last_event_id"}
    hdrs = {**headers, **SSE}
    if "last_event_id" in params:
        hdrs["Last-Event-ID"] = str(params["last_event_id"])
    with api.client.stream("GET", f"/v1/tasks/{task_id}/events", params=extra, headers=hdrs) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        return [b for b in sse_blocks(r.iter_lines()) if "event" in b]


def listed(api: Any, headers: dict[str, str], task_id: str, **params: Any) -> dict[str, Any]:
    r = api.client.get(f"/v1/tasks/{task_id}/events", params=params, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_run_streams_its_events_in_order_and_lists_them(backend: str, settings_factory: Any, make_api: Any) -> None:
    api = make_api(_settings(settings_factory, backend))
    tenant = api.tenant()
    task = _coop(api, tenant, {"epochs": 5, "n_ctx": 2})
    tid = task["id"]

    # followed from its creation until the run is over, without polling the task
    got = stream(api, tenant, tid, until_idle="true")
    kinds = [b["event"] for b in got]
    assert kinds == ["created", "queued", "started"] + ["epoch"] * 5 + ["published"], kinds
    ids = [b["data"]["id"] for b in got]
    assert ids == sorted(set(ids)) and [int(b["id"]) for b in got] == ids
    assert all(b["data"]["kind"] == b["event"] for b in got)
    data = [b["data"]["data"] for b in got]
    assert data[0] == {"method": "coop", "classes": 3} and data[1] == {"attempt": 1, "retrain": False}
    assert data[2]["attempt"] == 1 and isinstance(data[2]["worker"], str) and data[2]["worker"]
    assert [d["epoch"] for d in data[3:8]] == [1, 2, 3, 4, 5]
    assert all(isinstance(d["loss"], float) for d in data[3:8])
    assert data[8]["version"] == 1 and data[8]["val_accuracy"] == api.task(tenant, tid)["metrics"]["val_accuracy"]

    # the same as JSON, oldest first, in pages after an id
    everything = listed(api, tenant, tid)
    assert everything["items"] == [b["data"] for b in got] and everything["next_after"] == ids[-1]
    pages: list[dict[str, Any]] = []
    after = 0
    while page := listed(api, tenant, tid, after=after, limit=4)["items"]:
        pages += page
        after = page[-1]["id"]
    assert pages == everything["items"]
    assert listed(api, tenant, tid, after=ids[-1]) == {"items": [], "next_after": ids[-1]}

    # a stream resumes after Last-Event-ID (the later of it and `after`)
    assert [b["data"]["id"] for b in stream(api, tenant, tid, until_idle="true", last_event_id=ids[4])] == ids[5:]
    resumed = stream(api, tenant, tid, until_idle="true", after=ids[1], last_event_id=ids[6])
    assert [b["data"]["id"] for b in resumed] == ids[7:]
    assert stream(api, tenant, tid, until_idle="true", after=ids[-1]) == []

    # a retrain, cancelled while it runs: followed live, the cancel in the middle of the stream
    r = api.client.post(f"/v1/tasks/{tid}/retrain", data={"config": json.dumps({"epochs": 10_000, "n_ctx": 2})},
                        headers=tenant)  # fmt: skip
    assert r.status_code == 202, r.text
    seen: list[dict[str, Any]] = []
    with api.client.stream("GET", f"/v1/tasks/{tid}/events", params={"after": ids[-1], "until_idle": "true"},
                           headers={**tenant, **SSE}) as r:  # fmt: skip
        for block in sse_blocks(r.iter_lines()):
            if "event" not in block:
                continue
            seen.append(block)
            if block["event"] == "epoch" and block["data"]["data"]["epoch"] == 2:
                assert api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant).status_code == 202
    kinds = [b["event"] for b in seen]
    assert kinds[:3] == ["queued", "started", "epoch"] and kinds[-1] == "cancelled", kinds
    assert seen[0]["data"]["data"] == {"attempt": 2, "retrain": True}
    # the epoch in progress may still be recorded after the cancel request
    asked = kinds.index("cancel_requested")
    assert asked > 3 and set(kinds[2:asked] + kinds[asked + 1 : -1]) == {"epoch"}, kinds
    epochs = [b["data"]["data"]["epoch"] for b in seen if b["event"] == "epoch"]
    assert epochs == list(range(1, len(epochs) + 1))
    assert [b["data"] for b in seen] == listed(api, tenant, tid, after=ids[-1])["items"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_failed_run_says_why(backend: str, settings_factory: Any, make_api: Any) -> None:
    api = make_api(_settings(settings_factory, backend))
    tenant = api.tenant()
    diverging = {"epochs": 10, "warmup_epochs": 1, "warmup_lr": 1e4, "weight_decay": 1.0, "n_ctx": 2, "batch_size": 1}
    tid = _coop(api, tenant, diverging)["id"]
    got = stream(api, tenant, tid, until_idle="true")
    assert [b["event"] for b in got][:3] == ["created", "queued", "started"] and got[-1]["event"] == "failed"
    assert got[-1]["data"]["data"]["attempt"] == 1 and "warmup_lr=10000" in got[-1]["data"]["data"]["reason"]
    assert got[-1]["data"]["data"]["reason"] == api.task(tenant, tid)["error"]


def test_a_quiet_stream_sends_heartbeats_then_deleted(settings_factory: Any, make_api: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(events_route, "HEARTBEAT_S", 0.05)
    api = make_api(settings_factory())
    tenant = api.tenant()
    task = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()
    api.wait_ready(tenant, task["id"])
    blocks: list[dict[str, Any]] = []
    deleted = False
    with api.client.stream("GET", f"/v1/tasks/{task['id']}/events", headers={**tenant, **SSE}) as r:
        assert r.status_code == 200
        for block in sse_blocks(r.iter_lines()):
            blocks.append(block)
            if block.get("comment") == "heartbeat" and not deleted:  # nothing new for a while: delete it
                assert api.client.delete(f"/v1/tasks/{task['id']}", headers=tenant).status_code == 204
                deleted = True
    assert blocks[0] == {"retry": str(events_route.RETRY_MS)}
    kinds = [b["event"] for b in blocks if "event" in b]
    assert kinds == ["created", "queued", "started", "published", "deleted"], kinds
    assert blocks[-1] == {"event": "deleted", "data": {"task_id": task["id"]}}  # then the stream ended
    first_beat = next(i for i, b in enumerate(blocks) if "comment" in b)
    assert [b.get("event") for b in blocks[first_beat:] if "event" in b] == ["deleted"]
    r = api.client.get(f"/v1/tasks/{task['id']}/events", headers=tenant)
    assert r.status_code == 404 and r.json() == {"detail": f"task {task['id']} not found"}


def test_a_client_that_leaves_ends_its_stream(settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory())
    tenant = api.tenant()
    task = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()
    api.wait_ready(tenant, task["id"])
    with api.client.stream("GET", f"/v1/tasks/{task['id']}/events", headers={**tenant, **SSE}) as r:
        first = next(b for b in sse_blocks(r.iter_lines()) if "event" in b)
    # leaving the block closed the connection; the test client waits until the app's stream
    # stopped (it would hang here if the stream went on polling)
    assert first["event"] == "created"
    assert api.client.get(f"/v1/tasks/{task['id']}/events", headers=tenant).status_code == 200


def test_an_event_that_commits_late_is_still_sent(settings_factory: Any, make_api: Any) -> None:
    """Ids are taken at insert and seen at commit: one that commits after a higher id was sent
    goes out too, with the stream's position (the higher id) as its SSE id."""
    api = make_api(settings_factory())
    tenant = api.tenant()
    task = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()
    api.wait_ready(tenant, task["id"])
    sm = api.state.sessionmaker
    with sm() as s:
        tenant_id = s.scalar(select(Task.tenant_id).where(Task.id == task["id"]))
    high = 10**12

    def add(event_id: int) -> None:
        with sm() as s:
            s.execute(insert(TaskEvent), [{"id": event_id, "task_id": task["id"], "tenant_id": tenant_id,
                                           "kind": "min_score", "data": {"min_score": event_id % 7 / 10}}])  # fmt: skip
            s.commit()

    async def follow() -> list[str]:
        gen = events_route.follow(sm, task["id"], tenant_id, 0)
        out = [await gen.__anext__() for _ in range(5)]  # retry, created, queued, started, published
        add(high)
        out.append(await gen.__anext__())
        add(high - 5)  # a lower id, committed after `high` was sent
        out.append(await gen.__anext__())
        await gen.aclose()
        return out

    chunks = asyncio.run(follow())
    assert chunks[0].startswith("retry:")
    blocks = [next(sse_blocks(iter(c.split("\n")))) for c in chunks[1:]]
    assert [b["event"] for b in blocks] == ["created", "queued", "started", "published", "min_score", "min_score"]
    assert blocks[-2]["data"]["id"] == high and blocks[-2]["id"] == str(high)
    assert blocks[-1]["data"]["id"] == high - 5 and blocks[-1]["id"] == str(high)  # resumes after both


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_event_parameters_and_other_tenants(backend: str, settings_factory: Any, make_api: Any) -> None:
    api = make_api(_settings(settings_factory, backend))
    alice, bob = api.tenant(), api.tenant()
    tid = api.create_task(alice, "zeroshot", classes=["cat", "dog"]).json()["id"]
    for headers in ({}, SSE):
        for path in (f"/v1/tasks/{tid}/events", "/v1/tasks/" + "0" * 32 + "/events"):
            r = api.client.get(path, headers={**bob, **headers})
            assert r.status_code == 404 and r.json()["detail"].endswith("not found"), r.text
            assert r.headers["content-type"].startswith("application/json")
    cases = [
        ({"after": -1}, {}, "after"),
        ({"after": 2**63}, {}, "after"),
        ({"after": "x"}, {}, "after"),
        ({"limit": 0}, {}, "limit: 0 is out of range; send 1 to 1000"),
        ({"limit": 1001}, {}, "limit: 1001 is out of range; send 1 to 1000"),
        ({}, {"Last-Event-ID": "abc"}, "Last-Event-ID: 'abc' is not an event id"),
        ({}, {"Last-Event-ID": "-3", **SSE}, "Last-Event-ID"),
    ]
    for params, headers, detail in cases:
        r = api.client.get(f"/v1/tasks/{tid}/events", params=params, headers={**alice, **headers})
        assert r.status_code == 422 and r.json()["detail"].startswith(detail), (params, r.text)
    assert listed(api, alice, tid, limit=1)["items"][0]["kind"] == "created"
