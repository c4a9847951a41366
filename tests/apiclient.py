"""A thin HTTP client for tests that drive a running app (tests/api, tests/worker, tests/cli):
``running_app(settings)`` starts an app in a TestClient (lifespan on, backbone loaded) and
``Api`` wraps the calls every test makes (create a tenant, a task, poll it)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app

TEST_ADMIN_TOKEN = "test-admin-token-" + "x" * 24
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


def embedded_settings(root: Path, **overrides: Any) -> Any:
    """Settings on a fresh SQLite file and ``file://`` store under ``root`` (migrated), with
    the test backbone on the CPU and no broker; for module-scoped apps (``settings_factory``
    is per test)."""
    from store.migrate import upgrade
    from store.settings import Settings

    values: dict[str, Any] = {
        "database_url": f"sqlite:///{root / 'promptstore.db'}",
        "object_store_url": f"file://{root / 'objects'}",
        "broker_url": None,
        "backbone": "open_clip:tiny:random",
        "device": "cpu",
        "admin_token": TEST_ADMIN_TOKEN,
    }
    values.update(overrides)
    settings = Settings(**values)
    upgrade(settings.database_url)
    return settings


@contextmanager
def running_app(settings: Any, **kwargs: Any) -> Iterator[TestClient]:
    app = create_app(settings, **kwargs)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert app.state.ps.backbone.wait(120), "backbone did not load"
        yield client


class Api:
    """A thin client for one running app."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    @property
    def state(self) -> Any:
        return self.client.app.state.ps  # type: ignore[attr-defined]

    def tenant(self, name: str | None = None) -> dict[str, str]:
        name = name or f"tenant-{time.monotonic_ns()}"
        r = self.client.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['api_key']}"}

    def create_task(
        self,
        headers: dict[str, str],
        method: str,
        *,
        dataset: bytes | None = None,
        classes: list[str] | None = None,
        config: dict[str, Any] | str | None = None,
        name: str = "t",
        expect: int | None = 202,
    ) -> Any:
        data: dict[str, str] = {"name": name, "method": method}
        if classes is not None:
            data["classes"] = json.dumps(classes)
        if config is not None:
            data["config"] = config if isinstance(config, str) else json.dumps(config)
        files = {"dataset": ("data.zip", dataset, "application/zip")} if dataset is not None else None
        r = self.client.post("/v1/tasks", data=data, files=files, headers=headers)
        if expect is not None:
            assert r.status_code == expect, r.text
        return r

    def classify_files(
        self, headers: dict[str, str], task_id: str, images: list[bytes], *, top_k: int | None = None
    ) -> Any:
        """POST classify with one multipart ``images`` part per image (PNG or JPEG bytes)."""
        files = []
        for i, data in enumerate(images):
            jpeg = data[:2] == b"\xff\xd8"
            files.append(("images", (f"{i}.{'jpg' if jpeg else 'png'}", data, "image/jpeg" if jpeg else "image/png")))
        query = f"?top_k={top_k}" if top_k is not None else ""
        return self.client.post(f"/v1/tasks/{task_id}/classify{query}", files=files, headers=headers)

    def task(self, headers: dict[str, str], task_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/tasks/{task_id}", headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(
        self,
        headers: dict[str, str],
        task_id: str,
        until: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 120,
        seen: list[dict[str, Any]] | None = None,
        interval: float = 0.02,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            t = self.task(headers, task_id)
            if seen is not None:
                seen.append(t)
            if until(t):
                return t
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} did not reach the expected state: {t}")
            time.sleep(interval)

    def wait_ready(self, headers: dict[str, str], task_id: str, **kw: Any) -> dict[str, Any]:
        t = self.wait(headers, task_id, lambda t: t["status"] in ("ready", "failed", "cancelled"), **kw)
        assert t["status"] == "ready", f"{t['status']}: {t['error']}"
        return t


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tests share 2 cores with other runs: one torch thread in this process."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def make_api() -> Iterator[Callable[..., Api]]:
    """``make_api(settings, **create_app_kwargs) -> Api``; apps are stopped at the end.
    Import it (and ``_one_torch_thread``) into a conftest or test module to use it."""
    stack: list[Any] = []

    def make(settings: Any, **kwargs: Any) -> Api:
        cm = running_app(settings, **kwargs)
        client = cm.__enter__()
        stack.append(cm)
        return Api(client)

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
