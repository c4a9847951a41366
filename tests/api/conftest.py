"""Fixtures for the HTTP tests: a running app (TestClient, lifespan started, in-process
ThreadDispatcher) on the real databases and object stores from tests/conftest.py.
The client helpers live in tests/apiclient.py (shared with tests/worker and tests/cli)."""

from __future__ import annotations

from apiclient import ADMIN, TEST_ADMIN_TOKEN, Api, _one_torch_thread, make_api, running_app

__all__ = ["ADMIN", "TEST_ADMIN_TOKEN", "Api", "_one_torch_thread", "make_api", "running_app"]
