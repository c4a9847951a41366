"""A property-based run of the OpenAPI document (schemathesis) against a real uvicorn serving
the app: every operation, with a tenant's key or the admin token, bounded and derandomized.

Checks: no 5xx (``not_a_server_error``), every answer's status is declared
(``status_code_conformance``), its body matches the declared schema
(``response_schema_conformance``; errors are ``ErrorOut`` ``{"detail": str}``) and so does
its content type (``content_type_conformance``). Half of the generated task ids are replaced
by a real, ready zeroshot task's, so that classify, retrain, cancel and prompt get past 404.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from apiclient import ADMIN, _one_torch_thread, embedded_settings  # noqa: F401
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

#: Examples per operation: enough to reach every declared status, bounded for a 2-core CI run.
MAX_EXAMPLES = 25
#: Valid inputs, and inputs that break the schema (which must be 4xx answers, as documented).
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.response_schema_conformance,
    checks.content_type_conformance,
]


SEEN: dict[str, set[int]] = {}


class Live:
    def __init__(self, url: str, app: Any, tenant: dict[str, str], task_id: str) -> None:
        self.url, self.app, self.tenant, self.task_id = url, app, tenant, task_id


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    import uvicorn

    from api.app import create_app

    settings_ = embedded_settings(
        tmp_path_factory.mktemp("schema"), jobs_per_minute=0, classify_rate=0, admin_auth_failures_per_minute=0,
    )
    app = create_app(settings_)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="schema-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    assert app.state.ps.backbone.wait(120), "backbone did not load"
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/v1/admin/tenants", json={"name": "schemathesis"}, headers=ADMIN)
            assert r.status_code == 201, r.text
            tenant = {"Authorization": f"Bearer {r.json()['api_key']}"}
            r = http.post("/v1/tasks", data={"name": "pets", "method": "zeroshot", "classes": '["cat", "dog"]'},
                          headers=tenant)
            assert r.status_code == 202, r.text
            task_id = r.json()["id"]
            deadline = time.monotonic() + 120
            while http.get(f"/v1/tasks/{task_id}", headers=tenant).json()["status"] != "ready":
                assert time.monotonic() < deadline, "the zeroshot task did not become ready"
                time.sleep(0.05)
        yield Live(url, app, tenant, task_id)
    finally:
        server.should_exit = True
        thread.join(30)


def _call(case: Any, live: Live) -> None:
    headers = ADMIN if case.path.startswith("/v1/admin") else live.tenant
    params = case.path_parameters or {}
    # A deterministic half of the ids are the real task's (never for DELETE: it must stay).
    if "task_id" in params and case.method.upper() != "DELETE" and len(str(params["task_id"])) % 2 == 0:
        params["task_id"] = live.task_id
    response = case.call_and_validate(base_url=live.url, headers=headers, checks=CHECKS, timeout=60)
    SEEN.setdefault(f"{case.operation.label}", set()).add(response.status_code)


def test_every_operation_answers_as_documented(live: Live) -> None:
    schema = schemathesis.openapi.from_dict(live.app.openapi())
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13, [op.label for op in operations]
    for operation, mode in itertools.product(operations, MODES):

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
        )
        def run(case: Any) -> None:
            _call(case, live)

        try:
            run()
        except Unsatisfiable:  # an operation without parameters has no invalid input
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # one operation's failure must not hide the others'
            failures.append(f"{operation.label} ({mode.value}): {exc}")
    print({k: sorted(v) for k, v in SEEN.items()})
    assert not failures, "\n\n".join(failures)
