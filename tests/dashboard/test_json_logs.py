"""Structured logs (PROMPTSTORE_LOG_FORMAT=json): one JSON object per line, carrying the
request id (X-Request-ID), the tenant id and the task id of the request or job."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from apiclient import ADMIN

from api.cli import _JsonFormatter
from store import logcontext


@pytest.fixture
def json_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """``read()``: every record of the ``promptstore`` loggers so far, formatted by the JSON
    formatter and parsed back, one dict per line."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(_JsonFormatter())
    logger = logging.getLogger("promptstore")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_formatter_adds_the_bound_ids_and_nothing_outside() -> None:
    fmt = _JsonFormatter()
    rec = logging.LogRecord("promptstore.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    assert set(json.loads(fmt.format(rec))) == {"ts", "level", "logger", "msg"}
    with logcontext.bind(request_id="r1"):
        logcontext.set_ids(tenant_id="t1", task_id=None)
        out = json.loads(fmt.format(rec))
        with logcontext.bind(task_id="k2"):  # a nested binding (a job) replaces the ids
            inner = json.loads(fmt.format(rec))
    assert out == {**out, "msg": "hello world", "request_id": "r1", "tenant_id": "t1"} and "task_id" not in out
    assert inner["task_id"] == "k2" and "request_id" not in inner
    assert "request_id" not in json.loads(fmt.format(rec))
    logcontext.set_ids(tenant_id="ignored")  # outside a request or job: no effect
    assert logcontext.current() == {}


def test_request_id_header_is_kept_when_safe_and_made_otherwise() -> None:
    assert logcontext.new_request_id("abc-123_X.y:z") == "abc-123_X.y:z"
    for bad in (None, "", "a b", "x" * 65, '"><script>', "é"):
        made = logcontext.new_request_id(bad)
        assert made != bad and len(made) == 32 and int(made, 16) >= 0


def test_request_and_job_logs_carry_request_tenant_and_task_ids(
    settings_factory: Any, make_api: Any, json_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    api = make_api(settings_factory())
    tenant = api.tenant("acme")
    tenant_id = api.client.get("/v1/admin/tenants", headers=ADMIN).json()["items"][0]["id"]
    r = api.client.post("/v1/tasks", data={"name": "t", "method": "zeroshot", "classes": '["a", "b"]'},
                        headers={**tenant, "X-Request-ID": "create-req-1"})
    assert r.status_code == 202 and r.headers["x-request-id"] == "create-req-1"
    task_id = r.json()["id"]
    api.wait_ready(tenant, task_id)
    r = api.client.get(f"/v1/tasks/{task_id}", headers={**tenant, "X-Request-ID": "bad id!"})
    generated = r.headers["x-request-id"]
    assert generated != "bad id!" and len(generated) == 32
    r = api.client.post(f"/admin/tasks/{task_id}/cancel", headers={**ADMIN, "X-Request-ID": "admin-req-7"},
                        follow_redirects=False)
    assert r.status_code == 303

    lines = json_lines()
    access = {(ln.get("request_id"), ln["http"]["route"]): ln for ln in lines if ln["logger"] == "promptstore.access"}
    create = access[("create-req-1", "/v1/tasks")]
    assert create["tenant_id"] == tenant_id and create["http"]["status"] == 202 and create["http"]["method"] == "POST"
    get = access[(generated, "/v1/tasks/{task_id}")]
    assert get["tenant_id"] == tenant_id and get["task_id"] == task_id and get["http"]["path"] == f"/v1/tasks/{task_id}"
    # the task is ready: nothing to cancel, which the admin's log line says
    admin = [ln for ln in lines if ln["msg"].startswith(f"admin cancel of task {task_id}: ")]
    assert admin and admin[0]["request_id"] == "admin-req-7"
    assert admin[0]["tenant_id"] == tenant_id and admin[0]["task_id"] == task_id
    job = [ln for ln in lines if ln["logger"] == "promptstore.worker" and "published version" in ln["msg"]]
    assert job, [ln["msg"] for ln in lines]
    assert job[0]["task_id"] == task_id and job[0]["tenant_id"] == tenant_id and "request_id" not in job[0]
    for ln in lines:
        assert set(ln) <= {"ts", "level", "logger", "msg", "request_id", "tenant_id", "task_id", "http", "exc"}
