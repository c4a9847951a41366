"""The task page of a living model in a real headless Chromium (Debian's, driven by
Playwright) against the app served by uvicorn with in-process tuning jobs and the tiny random
backbone: the versions table, live progress from the page's Server-Sent Events feed while a
retrain runs (no reload), the reload once it publishes, and serving the older version again
through the confirmation page. Screenshots go under ``test_output_dir/dashboard``."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from apiclient import TEST_ADMIN_TOKEN
from psdata import dataset_zip

pytestmark = pytest.mark.timeout(300)

#: vpt-deep runs its images through the whole tower every step: a retrain of several seconds
#: on the tiny backbone, so that the page sees the run move.
FIRST = {"epochs": 2, "batch_size": 4}
RETRAIN = {"epochs": 150, "batch_size": 4}


def login(pg: Any, base_url: str) -> None:
    assert pg.goto(f"{base_url}/admin/login").status == 200
    pg.fill("#token", TEST_ADMIN_TOKEN)
    pg.click("button[type=submit]")
    pg.wait_for_url(f"{base_url}/admin")


@pytest.fixture
def fast_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.admin import feed

    monkeypatch.setattr(feed, "POLL_S", 0.1)


def _probe(page: Any) -> Any:
    """The marker this test put on the page's window; None once the page reloaded (or while
    it navigates)."""
    try:
        return page.evaluate("() => window.__probe === undefined ? null : window.__probe")
    except Exception:  # the execution context went away: the page is navigating
        return None


def test_watch_a_retrain_live_then_serve_the_older_version(
    settings_factory: Any, live_server: Any, page: Any, shots: Any, fast_feed: None
) -> None:
    srv = live_server(settings_factory())
    tenant = srv.tenant("acme")
    task_id = srv.create_task(tenant, "vpt-deep", dataset_zip(per_class=8), name="living", config=FIRST)
    srv.wait(tenant, task_id, lambda t: t["status"] == "ready")
    r = srv.http.post(f"/v1/tasks/{task_id}/retrain", data={"config": json.dumps(RETRAIN)}, headers=tenant)
    assert r.status_code == 202, r.text
    srv.wait(tenant, task_id, lambda t: (t["training"] or {}).get("status") == "running")

    login(page, srv.url)
    page.goto(f"{srv.url}/admin/tasks/{task_id}")
    page.wait_for_selector("#task[data-live]")
    # the versions table: version 1 served, the action to serve it again comes later
    assert "1 (serving)" in page.inner_text("#versions")
    page.wait_for_selector("#feed-status.on")  # the feed is connected
    page.evaluate("() => { window.__probe = 'no reload yet'; }")
    epochs_at_load = page.locator("#events tbody tr.ev-epoch").count()

    progress: list[float] = []
    epoch_rows: list[int] = []
    shot = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if _probe(page) != "no reload yet":
            break  # the run finished and the page reloaded itself
        try:
            value = page.eval_on_selector("#task [data-field=progress]", "p => p.value")
            rows = page.locator("#events tbody tr.ev-epoch").count()
        except Exception:
            break  # navigating
        if _probe(page) != "no reload yet":
            break  # read from the reloaded page (or while it loaded): not the live updates
        if not progress or progress[-1] != value:
            progress.append(value)
        if not epoch_rows or epoch_rows[-1] != rows:
            epoch_rows.append(rows)
        if 0.2 < value < 0.9 and not shot:
            shots(page, "1-retrain-live")
            shot = True
        time.sleep(0.05)
    moving = [v for v in progress if 0.0 < v < 1.0]
    assert len(moving) >= 2, f"the progress bar did not move from the feed: {progress}"
    assert moving == sorted(moving), progress
    assert len(epoch_rows) >= 2 and epoch_rows[-1] > epochs_at_load, f"no epoch event was appended: {epoch_rows}"

    # the run publishes version 2: the page reloads and the server draws it as served
    page.wait_for_selector("#versions tr.serving[data-version='2']", timeout=240_000)
    assert _probe(page) is None
    assert srv.task(tenant, task_id)["version"] == 2
    assert "version 2 published" in page.inner_text("#events")
    assert page.is_visible("#serve-1")
    shots(page, "2-published")

    # serving version 1 again: a confirmation page first, nothing changes before it
    page.click("#serve-1")
    page.wait_for_selector("#confirm-serve")
    assert srv.task(tenant, task_id)["version"] == 2
    shots(page, "3-confirm-serve")
    page.click("#confirm-serve")
    page.wait_for_url(f"{srv.url}/admin/tasks/{task_id}?done=served")
    assert "now served" in page.inner_text(".notice")
    page.wait_for_selector("#versions tr.serving[data-version='1']")
    assert srv.task(tenant, task_id)["version"] == 1
    assert "version 1 served instead of version 2" in page.inner_text("#events")
    shots(page, "4-served")
