"""Fixtures for the HTTP tests: a running app (TestClient, lifespan started, in-process
ThreadDispatcher) on the real databases and object stores from tests/conftest.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app

TEST_ADMIN_TOKEN = "test-admin-token-" + "x" * 24
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


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
        import json

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


@pytest.fixture
def make_api() -> Iterator[Callable[..., Api]]:
    """``make_api(settings, **create_app_kwargs) -> Api``; apps are stopped at the end."""
    stack: list[Any] = []

    def make(settings: Any, **kwargs: Any) -> Api:
        cm = running_app(settings, **kwargs)
        client = cm.__enter__()
        stack.append(cm)
        return Api(client)

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
