"""The task page's living-model parts over HTTP: the versions table and serving another version
(a confirmation page, then a POST with the CSRF token), evaluations (per-class table,
reliability diagram, confusion matrix with right and wrong cells shaded apart), and the admin's
Server-Sent Events feed of the task's events (served by uvicorn, read by httpx)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from apiclient import ADMIN, TEST_ADMIN_TOKEN
from sqlalchemy import update

from store.db import session_scope, utcnow
from store.models import Evaluation, PromptVersion, Task

EVIL = '<script>alert("x")</script>'


def _name(prefix: str) -> str:
    """A tenant name of its own (the Postgres database is shared by the session's tests)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]*)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def _section(html: str, marker: str) -> str:
    """The table that follows ``marker`` (an id attribute), up to its end."""
    return html.split(marker, 1)[1].split("</table>", 1)[0]


def _versions(html: str) -> list[tuple[str, str]]:
    return re.findall(r'<td class="num">(\d+)( \(serving\))?</td>', _section(html, 'id="versions"'))


@pytest.fixture(params=["sqlite", "postgres"])
def api(settings_factory: Any, make_api: Any, request: pytest.FixtureRequest) -> Any:
    return make_api(settings_factory(db=request.param))


def _two_versions(api: Any) -> tuple[dict[str, str], str]:
    """A zeroshot task retrained once by the admin: versions 1 and 2, 2 served."""
    tenant = api.tenant(_name("acme"))
    task_id = api.create_task(tenant, "zeroshot", classes=["cat", "dog"], name="pets").json()["id"]
    api.wait_ready(tenant, task_id)
    page = api.client.get(f"/admin/tasks/{task_id}", headers=ADMIN).text
    r = api.client.post(f"/admin/tasks/{task_id}/retry", data={"csrf": _csrf(page)}, headers=ADMIN, follow_redirects=False)
    assert r.status_code == 303, r.text
    api.wait(tenant, task_id, lambda t: t["version"] == 2 and (t["training"] or {}).get("status") == "ready")
    return tenant, task_id


def test_serve_an_older_version_after_a_confirmation(api: Any) -> None:
    tenant, task_id = _two_versions(api)
    c = api.client
    # a browser session (cookie): its forms need the session's CSRF token
    assert c.post("/admin/login", data={"token": TEST_ADMIN_TOKEN}, follow_redirects=False).status_code == 303
    html = c.get(f"/admin/tasks/{task_id}").text
    assert _versions(html) == [("1", ""), ("2", " (serving)")]
    table = _section(html, 'id="versions"')
    assert "<th scope=\"col\">version</th>" in table and "<th scope=\"col\">backbone</th>" in table
    assert f'href="/admin/tasks/{task_id}/versions/1/serve"' in table  # the older one has the action
    assert f"/versions/2/serve" not in table  # the served one has not

    # the link is a confirmation page: nothing changes by following it
    confirm = c.get(f"/admin/tasks/{task_id}/versions/1/serve")
    assert confirm.status_code == 200 and confirm.headers["cache-control"] == "no-store"
    assert f'action="/admin/tasks/{task_id}/versions/1/serve"' in confirm.text and 'id="confirm-serve"' in confirm.text
    assert "serves version 2" in confirm.text and 'id="compare"' in confirm.text
    assert api.task(tenant, task_id)["version"] == 2

    # the POST needs the session's CSRF token
    for bad in ({}, {"csrf": "x" * 20}):
        r = c.post(f"/admin/tasks/{task_id}/versions/1/serve", data=bad, follow_redirects=False)
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    assert api.task(tenant, task_id)["version"] == 2

    r = c.post(f"/admin/tasks/{task_id}/versions/1/serve", data={"csrf": _csrf(confirm.text)},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/admin/tasks/{task_id}?done=served"
    t = api.task(tenant, task_id)
    assert t["version"] == 1  # the task serves the older version now
    back = c.get(f"/admin/tasks/{task_id}?done=served").text
    assert 'class="notice"' in back and "now served" in back
    assert _versions(back) == [("1", " (serving)"), ("2", "")]
    assert f'href="/admin/tasks/{task_id}/versions/2/serve"' in back  # and can roll forward again
    events = _section(back, 'id="events"')
    assert "<code>served</code>" in events and "version 1 served instead of version 2" in events

    # the served version's confirmation page says so and offers no form
    same = c.get(f"/admin/tasks/{task_id}/versions/1/serve").text
    assert "served already" in same and 'id="confirm-serve"' not in same
    # unknown versions: 404; not a number: 422
    r = c.get(f"/admin/tasks/{task_id}/versions/9/serve")
    assert r.status_code == 404 and "has no version 9" in r.json()["detail"]
    r = c.post(f"/admin/tasks/{task_id}/versions/9/serve", data={"csrf": _csrf(back)})
    assert r.status_code == 404
    assert c.get(f"/admin/tasks/{task_id}/versions/x/serve").status_code == 422
    assert c.get(f"/admin/tasks/0123456789abcdef/versions/1/serve").status_code == 404


def test_a_version_of_another_backbone_cannot_be_served(api: Any) -> None:
    tenant, task_id = _two_versions(api)
    with session_scope(api.state.sessionmaker) as s:  # version 1 as if tuned on another backbone
        s.execute(update(PromptVersion).where(PromptVersion.task_id == task_id, PromptVersion.version == 1)
                  .values(fingerprint="open_clip:ViT-B-32:openai#" + "ab" * 32))
    c = api.client
    html = c.get(f"/admin/tasks/{task_id}", headers=ADMIN).text
    table = _section(html, 'id="versions"')
    assert "another backbone" in table and "cannot be served" in table and "/versions/1/serve" not in table
    assert "open_clip:ViT-B-32:openai (weights abababababab)" in table
    confirm = c.get(f"/admin/tasks/{task_id}/versions/1/serve", headers=ADMIN).text
    assert 'id="serve-incompatible"' in confirm and 'id="confirm-serve"' not in confirm
    # a POST all the same is refused by the service and comes back as the page's problem
    r = c.post(f"/admin/tasks/{task_id}/versions/1/serve", data={"csrf": _csrf(html)}, headers=ADMIN, follow_redirects=False)
    assert r.status_code == 303 and "problem=" in r.headers["location"]
    page = c.get(r.headers["location"], headers=ADMIN).text
    assert 'class="problem"' in page and "not on the one this service runs" in page.split('class="problem"', 1)[1].split("</p>", 1)[0]
    assert api.task(tenant, task_id)["version"] == 2


def test_the_new_routes_need_the_admin(api: Any) -> None:
    name = _name("acme")
    tenant = api.tenant(name)
    task_id = api.create_task(tenant, "zeroshot", classes=["a", "b"]).json()["id"]
    api.wait_ready(tenant, task_id)
    c = api.client
    for creds in ({}, {"Authorization": "Bearer wrong"}, tenant):
        r = c.get(f"/admin/tasks/{task_id}/versions/1/serve", headers=creds)
        assert r.status_code == 401 and 'name="token"' in r.text and name not in r.text
        r = c.post(f"/admin/tasks/{task_id}/versions/1/serve", data={"csrf": "x"}, headers=creds)
        assert r.status_code == 401 and set(r.json()) == {"detail"}
        r = c.get(f"/admin/tasks/{task_id}/events", headers=creds)
        assert r.status_code == 401 and set(r.json()) == {"detail"}
    r = c.get("/admin/tasks/0123456789abcdef/events", headers=ADMIN)
    assert r.status_code == 404 and r.json() == {"detail": "task 0123456789abcdef not found"}


# --------------------------------------------------------------------------- evaluations


def _result(classes: list[str], confusion: list[list[int]]) -> dict[str, Any]:
    n = sum(map(sum, confusion))
    right = sum(confusion[i][i] for i in range(len(classes)))
    per_class = []
    for i, label in enumerate(classes):
        support = sum(confusion[i])
        predicted = sum(row[i] for row in confusion)
        p = confusion[i][i] / predicted if predicted else None
        r = confusion[i][i] / support if support else 0.0
        f1 = 2 * p * r / (p + r) if p and r else 0.0
        per_class.append({"label": label, "precision": p, "recall": r, "f1": f1, "support": support,
                          "threshold": 0.25 + 0.125 * i})
    counts = [0] * 9 + [1, 1, 2, 3, 5, 8]  # 15 bins, the first 9 empty
    bins = []
    for b, k in enumerate(counts):
        lo, hi = b / 15, (b + 1) / 15
        bins.append({"lower": lo, "upper": hi, "count": k,
                     "confidence": (lo + hi) / 2 if k else None, "accuracy": max(0.0, (lo + hi) / 2 - 0.05) if k else None})
    return {
        "n_images": n, "classes": classes, "accuracy": right / n, "top_k_accuracy": {"k": 2, "accuracy": 0.95},
        "macro_f1": 0.6543, "per_class": per_class, "confusion": confusion, "ece": 0.0512, "reliability": bins,
        "suggested_min_score": 0.4375, "coverage_at_suggested": 0.8,
    }


def _evaluation(s: Any, task: Task, *, status: str, result: dict | None = None, error: str | None = None) -> str:
    ev = Evaluation(task_id=task.id, tenant_id=task.tenant_id, version=task.version or 1, status=status,
                    sha256="0" * 64, size=123, params={"top_k": 2, "precision": 0.9}, result=result, error=error,
                    finished_at=utcnow() if status in ("ready", "failed") else None)
    s.add(ev)
    s.flush()
    return ev.id


def test_evaluations_show_their_tables_reliability_diagram_and_confusion(api: Any) -> None:
    tenant = api.tenant(_name("acme"))
    task_id = api.create_task(tenant, "zeroshot", classes=["cat", EVIL], name="pets").json()["id"]
    api.wait_ready(tenant, task_id)
    classes = ["cat", EVIL]
    with session_scope(api.state.sessionmaker) as s:
        task = s.get(Task, task_id)
        ready = _evaluation(s, task, status="ready", result=_result(classes, [[7, 3], [1, 9]]))
        failed = _evaluation(s, task, status="failed", error="the zip has no image of class <dog>")
        queued = _evaluation(s, task, status="queued")
    html = api.client.get(f"/admin/tasks/{task_id}", headers=ADMIN).text
    assert "<script>alert" not in html and "&lt;script&gt;alert(" in html

    table = _section(html, 'id="evaluations-table"')
    rows = re.findall(r'<tr data-evaluation="([0-9a-f]+)">', table)
    assert set(rows) == {ready, failed, queued}
    assert f'href="#eval-{ready}"' in table and "80.0 %" in table and "0.654" in table and "0.051" in table
    assert "0.438" in table and "95.0 %" in table and "(top 2)" in table
    assert "the zip has no image of class &lt;dog&gt;" in table  # the failure, escaped
    assert 'class="badge s-queued"' in table
    assert f'id="eval-{failed}"' not in html and f'id="eval-{queued}"' not in html  # details only when ready

    # the per-class table: a header row, one row per class with its numbers and threshold
    per_class = _section(html, f'id="eval-{ready}-per-class"')
    assert re.findall(r'<th scope="col"[^>]*>([^<]+)</th>', per_class) == [
        "class", "precision", "recall", "F1", "support", "threshold"
    ]
    labels = re.findall(r'<th scope="row">(.*?)</th>', per_class)
    assert labels == ["cat", "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"]
    assert "0.875" in per_class and "0.700" in per_class and "0.250" in per_class and "0.375" in per_class

    # the reliability diagram: an accessible SVG, 15 bins, the diagonal, the counts
    svg = html.split(f'id="eval-{ready}-reliability"', 1)[1].split("</svg>", 1)[0]
    head = html.split(f'<svg id="eval-{ready}-reliability"', 1)[1].split(">", 1)[0]
    assert 'role="img"' in head and 'aria-label="reliability diagram of 20 images' in head and "0.051" in head
    assert svg.count('<g class="bin"') == 15
    assert len(re.findall(r'<line [^>]*class="diagonal"', svg)) == 1
    assert re.findall(r'data-count="(\d+)"', svg) == ["0"] * 9 + ["1", "1", "2", "3", "5", "8"]
    assert re.findall(r'class="count-label">(\d+)<', svg) == ["1", "1", "2", "3", "5", "8"]
    assert svg.count('class="bar acc"') == 6 and svg.count('class="gap"') == 6
    assert "<title>confidence 0.93–1.00: 8 image(s)" in svg

    # the evaluation's confusion matrix: right cells (diagonal) and wrong ones shaded apart
    cm = _section(html, f'id="eval-{ready}-confusion"')
    cells = re.findall(r'<td class="(right|wrong) lvl-(\d)" title="[^"]*">(\d+)</td>', cm)
    assert cells == [("right", "6", "7"), ("wrong", "3", "3"), ("wrong", "1", "1"), ("right", "8", "9")]


def test_the_served_confusion_matrix_shades_right_and_wrong_cells_apart(api: Any) -> None:
    tenant = api.tenant(_name("acme"))
    task_id = api.create_task(tenant, "zeroshot", classes=["a", "b", "c"]).json()["id"]
    api.wait_ready(tenant, task_id)
    with session_scope(api.state.sessionmaker) as s:
        s.execute(update(Task).where(Task.id == task_id).values(
            confusion=[[4, 0, 0], [2, 2, 0], [0, 1, 3]],
            metrics={"val_accuracy": 0.75, "macro_f1": 0.7, "per_class": [
                {"label": "a", "precision": 0.667, "recall": 1.0, "f1": 0.8, "support": 4}]},
        ))
    html = api.client.get(f"/admin/tasks/{task_id}", headers=ADMIN).text
    cm = _section(html, 'id="confusion"')
    kinds = re.findall(r'<td class="(right|wrong) lvl-\d"', cm)
    assert kinds == ["right", "wrong", "wrong", "wrong", "right", "wrong", "wrong", "wrong", "right"]
    assert '<td class="wrong lvl-0" title="wrong: 0 image(s) of a predicted as b' in cm
    assert re.search(r'<td class="right lvl-9" title="right: 4 image\(s\) of a predicted as a', cm)
    assert "9 of 12 right" in html and "3 wrong" in html
    per_class = _section(html, 'id="per-class"')  # the served version's own per-class numbers
    assert '<th scope="row">a</th>' in per_class and "0.667" in per_class
    assert "per_class" not in _section(html, 'id="metrics"')  # not dumped as JSON in the metrics


# --------------------------------------------------------------------------- the events feed


def _frames(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events frames of a stream: {"id", "event", "data"} (comments skipped)."""
    frame: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if "event" in frame or "data" in frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            frame[name] = json.loads(value) if name == "data" else value


def _read_until(frames: Iterator[dict[str, Any]], stop: Any) -> list[dict[str, Any]]:
    got = []
    for f in frames:
        got.append(f)
        if stop(f, got):
            return got
    return got  # the stream ended


@pytest.fixture
def fast_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.admin import feed

    monkeypatch.setattr(feed, "POLL_S", 0.1)


def test_the_feed_cursor_and_event_lines() -> None:
    from api.admin import feed

    assert feed.cursor(None, 0) == 0 and feed.cursor("12", 3) == 12 and feed.cursor("2", 7) == 7
    assert feed.cursor("junk", 5) == 5 and feed.cursor(" 9 ", 0) == 9 and feed.cursor("-4", 0) == 0
    assert feed.describe("failed", {"attempt": 2, "reason": "training diverged"}) == "run 2 failed: training diverged"
    assert feed.describe("served", {"version": 1, "previous": 3}) == "version 1 served instead of version 3"
    assert feed.describe("min_score", {"min_score": None}) == "default min_score cleared"
    assert feed.describe("evaluated", {"evaluation_id": "abcdef0123", "version": 2, "accuracy": 0.5}) == (
        "evaluation abcdef01 of version 2: accuracy 50.0 %"
    )
    assert feed.describe("something-new", {"b": 1}) == 'something-new: {"b": 1}'
    assert set(feed.EVENT_KINDS) >= {"created", "epoch", "published", "served", "evaluated"}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_the_admin_events_feed_streams_the_tasks_events_in_order(
    settings_factory: Any, live_server: Any, fast_feed: None, db: str
) -> None:
    srv = live_server(settings_factory(db=db))
    tenant = srv.tenant(_name("acme"))
    r = srv.http.post("/v1/tasks", data={"name": "feed", "method": "zeroshot", "classes": '["cat", "dog"]'}, headers=tenant)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    srv.wait(tenant, task_id, lambda t: t["status"] == "ready")
    url = f"/admin/tasks/{task_id}/events"
    timeout = httpx.Timeout(60.0)  # a guard against a hang, far above the heartbeat

    with srv.http.stream("GET", url, headers=ADMIN, timeout=timeout) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-store"
        frames = _frames(resp.iter_lines())
        got = _read_until(frames, lambda f, got: any(g["event"] == "state" for g in got))
    events = [f for f in got if "id" in f]
    assert [f["event"] for f in events] == ["created", "queued", "started", "published"]
    ids = [int(f["id"]) for f in events]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [f["data"]["id"] for f in events] == ids and all(f["data"]["kind"] == f["event"] for f in events)
    assert events[0]["data"]["data"] == {"method": "zeroshot", "classes": 2}
    assert events[3]["data"]["text"] == "version 1 published" and events[3]["data"]["data"]["version"] == 1
    state = next(f for f in got if f["event"] == "state")
    assert "id" not in state  # the live state does not move the cursor
    assert state["data"]["id"] == task_id and state["data"]["status"] == "ready" and state["data"]["live"] is False

    # resuming: Last-Event-ID (what EventSource sends when it reconnects) wins over ?after
    with srv.http.stream("GET", f"{url}?after=0", headers={**ADMIN, "Last-Event-ID": str(ids[1])}, timeout=timeout) as resp:
        frames = _frames(resp.iter_lines())
        first = _read_until(frames, lambda f, got: f["event"] == "state")
        assert [f["event"] for f in first if "id" in f] == ["started", "published"]
        # new events arrive on the open stream: the admin retrains, the run publishes version 2
        page = srv.http.get(f"/admin/tasks/{task_id}", headers=ADMIN).text
        r = srv.http.post(f"/admin/tasks/{task_id}/retry", data={"csrf": _csrf(page)}, headers=ADMIN)
        assert r.status_code in (200, 303), r.text
        later = _read_until(frames, lambda f, got: f["event"] == "state" and f["data"]["version"] == 2)
        events = [f for f in later if "id" in f]
        assert [f["event"] for f in events] == ["queued", "started", "published"], later
        assert events[0]["data"]["text"] == "run 2 queued (a retrain)" and events[-1]["data"]["data"]["version"] == 2
        later_ids = [int(f["id"]) for f in events]
        assert later_ids == sorted(later_ids) and later_ids[0] > ids[-1]
        assert later[-1]["data"]["live"] is False and later[-1]["data"]["run_status"] == "ready"
        # the task is deleted: the stream says so and ends
        assert srv.http.delete(f"/v1/tasks/{task_id}", headers=tenant).status_code == 204
        rest = list(frames)
    assert rest and rest[-1]["event"] == "deleted" and rest[-1]["data"] == {"task_id": task_id}
    assert srv.http.get(url, headers=ADMIN).status_code == 404
