"""`/docs` works without internet (assets from the installed package, no CDN),
and `/` points a newcomer at them; checked in headless Chromium with every request that does
not go to the server itself blocked."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.timeout(180)


def _block_the_network(pg: Any, base: str) -> list[str]:
    """Abort every request that is not for the test server; returns the aborted URLs."""
    own = urlsplit(base).netloc
    blocked: list[str] = []

    def route(r: Any) -> None:
        if urlsplit(r.request.url).netloc == own:
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    pg.route("**/*", route)
    return blocked


def test_swagger_ui_lists_the_operations_with_the_network_blocked(
    settings_factory: Any, live_server: Any, page: Any, shots: Any
) -> None:
    base = live_server(settings_factory()).url
    blocked = _block_the_network(page, base)
    assert page.goto(f"{base}/docs").status == 200
    page.wait_for_selector(".opblock", timeout=30_000)
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
    shots(page, "docs-offline")
    flat = {p.replace("\u200b", "") for p in paths}
    assert {"/v1/tasks", "/v1/tasks/{task_id}/classify", "/v1/admin/tenants", "/readyz"} <= flat, flat
    assert blocked == [], f"the docs page asked the internet for {blocked}"


def test_the_root_links_the_docs_dashboard_and_readiness(settings_factory: Any, live_server: Any) -> None:
    base = live_server(settings_factory()).url
    r = httpx.get(f"{base}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for link in ('href="/docs"', 'href="/admin"', 'href="/readyz"', 'href="/openapi.json"'):
        assert link in r.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert httpx.get(f"{base}/docs-assets/{asset}").status_code == 200
    assert httpx.get(f"{base}/redoc").status_code == 404  # not offered: it needs a CDN
