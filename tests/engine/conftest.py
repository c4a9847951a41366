"""Fixtures of the engine tests: apps served by a real uvicorn in this process (so that
concurrent requests really are concurrent), tasks published straight through the store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from apiclient import ADMIN, TEST_ADMIN_TOKEN, _one_torch_thread, make_api

from api.app import create_app
from api.bench.harness import ServerThread
from api.bench.seeding import SeededTask, seed_tasks
from backbone.holder import get_backbone
from store.db import get_sessionmaker
from store.objects import get_object_store

__all__ = ["ADMIN", "TEST_ADMIN_TOKEN", "_one_torch_thread", "make_api", "serve", "seed"]


class Served:
    def __init__(self, server: ServerThread, app: Any) -> None:
        self.url = server.url
        self.app = app
        self.state = app.state.ps
        self.engine = self.state.inference


@contextmanager
def _served(settings: Any) -> Iterator[Served]:
    app = create_app(settings)
    with ServerThread(app) as server:
        assert app.state.ps.backbone.wait(120), "backbone did not load"
        yield Served(server, app)


@pytest.fixture
def serve() -> Iterator[Callable[[Any], Served]]:
    """``serve(settings) -> Served`` (``.url``, ``.state``, ``.engine``); stopped at the end."""
    with ExitStack() as stack:
        yield lambda settings: stack.enter_context(_served(settings))


@pytest.fixture
def seed() -> Callable[..., list[SeededTask]]:
    """``seed(settings, n, methods, tenants=2, classes=3) -> [SeededTask]``: ready tasks, version 1."""

    def make(settings: Any, n: int, methods: list[str], tenants: int = 2, classes: int = 3) -> list[SeededTask]:
        bb = get_backbone(settings.backbone, settings.device)
        return seed_tasks(settings, bb, n_tasks=n, n_tenants=tenants, methods=methods, n_classes=classes)

    return make
