"""The admin dashboard in a real headless Chromium (Debian's, driven by Playwright) against
the app served by uvicorn with in-process tuning jobs and the tiny random backbone.
Each test saves screenshots under ``test_output_dir/dashboard``."""

from __future__ import annotations

import time
from typing import Any

import pytest
from apiclient import TEST_ADMIN_TOKEN
from psdata import dataset_zip

pytestmark = pytest.mark.timeout(300)

#: vpt-deep runs its images through the whole tower every step: a few seconds on the tiny
#: backbone, so that several progress updates happen while the page watches.
SLOW = {"epochs": 80, "batch_size": 4}
ENDLESS = {"epochs": 10_000, "batch_size": 2}


def login(pg: Any, base_url: str, token: str = TEST_ADMIN_TOKEN) -> None:
    # /admin itself challenges Basic first (the browser's own dialog, which headless Chromium
    # refuses without credentials); the form is the login page's and every other page's
    response = pg.goto(f"{base_url}/admin/login")
    assert response.status == 200
    pg.fill("#token", token)
    pg.click("button[type=submit]")
    pg.wait_for_url(f"{base_url}/admin")


@pytest.fixture
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    import api.admin.views as views

    monkeypatch.setattr(views, "LIVE_POLL_MS", 200)


def test_login_watch_a_task_to_ready_then_see_its_chart_and_confusion_matrix(
    settings_factory: Any, live_server: Any, page: Any, shots: Any, fast_poll: None
) -> None:
    srv = live_server(settings_factory())
    base = srv.url

    assert page.goto(f"{base}/admin/tasks").status == 401
    assert page.query_selector("table") is None
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    assert "not the admin token" in page.inner_text("main")
    shots(page, "1-login-refused")
    login(page, base)
    assert page.is_visible("#random-weights")  # the tiny backbone has random weights
    shots(page, "2-overview")

    tenant = srv.tenant("acme")
    task_id = srv.create_task(tenant, "vpt-deep", dataset_zip(per_class=8), name="watched", config=SLOW)
    page.goto(f"{base}/admin/tasks")
    row = f"tr[data-task='{task_id}']"
    page.wait_for_selector(row)
    seen_status: list[str] = []
    seen_progress: list[float] = []
    deadline = time.monotonic() + 180
    shot_running = False
    while time.monotonic() < deadline:
        status = page.inner_text(f"{row} [data-field=status]")
        value = page.eval_on_selector(f"{row} progress", "p => p.value")  # as the script updates it
        if not seen_status or seen_status[-1] != status:
            seen_status.append(status)
        if not seen_progress or seen_progress[-1] != value:
            seen_progress.append(value)
        if status == "running" and 0.2 < value < 0.9 and not shot_running:
            shots(page, "3-tuning")
            shot_running = True
        if status == "ready":
            break
        time.sleep(0.05)
    shots(page, "4-ready")
    assert seen_status[-1] == "ready", seen_status
    assert "running" in seen_status, seen_status  # updated live, without a reload
    moving = [v for v in seen_progress if 0.0 < v < 1.0]
    assert len(moving) >= 2, f"the progress bar did not move while tuning: {seen_progress}"
    assert seen_progress == sorted(seen_progress), seen_progress
    assert seen_progress[-1] == pytest.approx(1.0)

    page.click(f"{row} a")
    page.wait_for_selector("#curve")
    full = srv.http.get(f"/v1/tasks/{task_id}", params={"include": "history,confusion"}, headers=tenant).json()
    epochs = len(full["history"])
    assert epochs == SLOW["epochs"]
    assert page.get_attribute("#loss-line", "points").count(",") == epochs
    assert page.get_attribute("#acc-line", "points").count(",") == epochs
    cells = page.eval_on_selector_all("#confusion tbody td:not(.sub)", "tds => tds.map(td => +td.textContent)")
    t = full
    assert len(cells) == 4 and sum(cells) == t["metrics"]["n_val"] > 0
    assert cells == [v for row_ in t["confusion"] for v in row_]
    assert "8" in page.inner_text("#classes")  # images per class
    assert "(serving)" in page.inner_text("#versions")
    shots(page, "5-detail")


def test_cancel_a_running_task_then_delete_it(
    settings_factory: Any, live_server: Any, page: Any, shots: Any, fast_poll: None
) -> None:
    srv = live_server(settings_factory())
    tenant = srv.tenant("acme")
    task_id = srv.create_task(tenant, "vpt-deep", dataset_zip(per_class=4), name="endless", config=ENDLESS)
    srv.wait(tenant, task_id, lambda t: t["status"] == "running" and t["progress"] > 0)
    login(page, srv.url)
    page.goto(f"{srv.url}/admin/tasks/{task_id}")
    page.wait_for_selector("#cancel")
    shots(page, "1-running")
    page.click("#cancel")
    page.wait_for_selector("#task[data-run-status=cancelled]")  # the page reloads when the run stops
    assert "Cancel requested" in page.inner_text("main")
    assert page.inner_text("#task [data-field=status]") == "cancelled"
    assert page.is_visible("#retry")
    shots(page, "2-cancelled")
    assert srv.task(tenant, task_id)["status"] == "cancelled"

    page.click("#delete")
    page.wait_for_selector("#confirm-delete")
    assert srv.task(tenant, task_id)["status"] == "cancelled"  # nothing happens before the confirmation
    shots(page, "3-confirm-delete")
    page.click("#confirm-delete")
    page.wait_for_url(f"{srv.url}/admin/tasks?done=deleted")
    assert "deleted" in page.inner_text(".notice")
    assert page.query_selector(f"tr[data-task='{task_id}']") is None
    assert srv.http.get(f"/v1/tasks/{task_id}", headers=tenant).status_code == 404
    shots(page, "4-deleted")


def test_find_why_a_task_failed(settings_factory: Any, live_server: Any, page: Any, shots: Any) -> None:
    srv = live_server(settings_factory())
    tenant = srv.tenant("acme")
    # a learning rate at its bound that makes this run diverge passes every upload check: the
    # tuning job itself fails, with a reason
    config = {"epochs": 2, "lr": 1e4, "weight_decay": 1.0, "pad": 4, "batch_size": 1}
    task_id = srv.create_task(tenant, "padding", dataset_zip(per_class=4), name="framed", config=config)
    srv.wait(tenant, task_id, lambda t: t["status"] == "failed")
    login(page, srv.url)
    assert "training diverged" in page.inner_text("ul.failures")
    shots(page, "1-overview")
    page.goto(f"{srv.url}/admin/tasks")
    page.select_option("select[name=status]", "failed")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**status=failed**")
    page.click(f"tr[data-task='{task_id}'] a")
    page.wait_for_selector("#error")
    reason = page.inner_text("#error")
    assert reason == srv.task(tenant, task_id)["error"]
    assert reason.startswith("training diverged:") and "lr=10000" in reason
    shots(page, "2-reason")


def test_create_a_tenant_and_see_its_key_once(settings_factory: Any, live_server: Any, page: Any, shots: Any) -> None:
    srv = live_server(settings_factory())
    login(page, srv.url)
    page.goto(f"{srv.url}/admin/tenants")
    page.fill("#tenant-name", "<b>globex</b>")
    page.click("#create-tenant")
    key = page.inner_text("#api-key")
    shots(page, "1-created")
    assert srv.http.get("/v1/tasks", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert "<b>globex</b>" in page.inner_text("#tenants")  # shown as text, not markup
    page.goto(f"{srv.url}/admin/tenants")  # the key is never shown again
    assert page.query_selector("#api-key") is None
    assert key not in page.content()
    shots(page, "2-listed")
    assert TEST_ADMIN_TOKEN not in page.content()


def test_the_browser_logs_in_to_admin_with_basic_auth(
    settings_factory: Any, live_server: Any, browser: Any, shots: Any
) -> None:
    base = live_server(settings_factory()).url
    ctx = browser.new_context(http_credentials={"username": "admin", "password": TEST_ADMIN_TOKEN})
    try:
        pg = ctx.new_page()
        assert pg.goto(f"{base}/admin").status == 200
        assert pg.is_visible("#random-weights")  # the overview, not the login form
        shots(pg, "basic-auth")
    finally:
        ctx.close()
