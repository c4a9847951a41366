"""Fixtures for the admin dashboard tests.

- ``make_api`` / ``Api`` (tests/apiclient.py): the app in a TestClient, for the HTTP-level tests.
- ``live_server(settings)``: the app served by uvicorn in a background thread on a free
  port (lifespan on, backbone loaded, in-process jobs), for the browser.
- ``browser``: Debian's Chromium (/usr/bin/chromium) driven by Playwright, headless; never
  a downloaded browser. ``page``: a fresh context and page per test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from apiclient import ADMIN, _one_torch_thread, make_api  # noqa: F401 (fixtures re-exported)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@dataclass
class LiveServer:
    url: str
    app: Any
    http: httpx.Client

    @property
    def state(self) -> Any:
        return self.app.state.ps

    def tenant(self, name: str) -> dict[str, str]:
        r = self.http.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['api_key']}"}

    def create_task(self, headers: dict[str, str], method: str, dataset: bytes, *, name: str, config: dict | None = None) -> str:
        import json

        data = {"name": name, "method": method}
        if config is not None:
            data["config"] = json.dumps(config)
        r = self.http.post(
            "/v1/tasks", data=data, files={"dataset": ("data.zip", dataset, "application/zip")}, headers=headers
        )
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def task(self, headers: dict[str, str], task_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/tasks/{task_id}", headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, headers: dict[str, str], task_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            t = self.task(headers, task_id)
            if until(t):
                return t
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} did not reach the expected state: {t}")
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serve(settings: Any) -> Iterator[LiveServer]:
    import uvicorn

    from api.app import create_app

    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    assert app.state.ps.backbone.wait(120), "backbone did not load"
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30) as http:
        try:
            yield LiveServer(url=url, app=app, http=http)
        finally:
            server.should_exit = True
            thread.join(30)


@pytest.fixture
def live_server() -> Iterator[Callable[[Any], LiveServer]]:
    """``live_server(settings) -> LiveServer``; stopped at the end of the test."""
    stack: list[Any] = []

    def start(settings: Any) -> LiveServer:
        cm = _serve(settings)
        server = cm.__enter__()
        stack.append(cm)
        return server

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Module-scoped: while Playwright's sync API is active, the main thread has a running
    event loop, which would break later tests that call ``asyncio.run``."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (never a downloaded browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture
def shots(test_output_dir: Path, request: pytest.FixtureRequest) -> Callable[[Any, str], Path]:
    """``shots(page, label)`` saves a full-page screenshot under ``test_output_dir/dashboard``."""
    folder = test_output_dir / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)

    def save(pg: Any, label: str) -> Path:
        path = folder / f"{request.node.name}-{label}.png"
        pg.screenshot(path=str(path), full_page=True)
        return path

    return save

