"""Messages tell the truth and the next step: readiness names why the backbone is not usable
(without server paths), "ready to serve" is logged only once it is, a finished task cannot be
cancelled (409 naming its state), and /admin offers the browser's Basic login."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from apiclient import ADMIN, Api, _one_torch_thread, make_api, running_app  # noqa: F401
from fastapi.testclient import TestClient

from api.app import create_app


def test_readyz_names_why_the_backbone_failed_without_server_paths(settings_factory: Any, tmp_path: Path) -> None:
    missing = tmp_path / "secret-folder" / "weights.safetensors"
    settings = settings_factory(backbone=f"open_clip:tiny:{missing}")
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert app.state.ps.backbone.wait(60)
        r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert "backbone failed to load:" in body["detail"] and "weights.safetensors" in body["detail"]
    assert str(tmp_path) not in r.text and "secret-folder" not in r.text
    assert body["checks"]["backbone"].startswith("backbone failed to load: ")

    settings = settings_factory(backbone="open_clip:no-such-arch:random")
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert app.state.ps.backbone.wait(60)
        detail = client.get("/readyz").json()["detail"]
    assert "no-such-arch" in detail and "BackboneError" not in detail


def test_ready_to_serve_is_logged_when_the_backbone_is_loaded(settings_factory: Any, caplog: Any) -> None:
    with caplog.at_level(logging.INFO, logger="promptstore.api"):
        with running_app(settings_factory()) as client:
            assert client.get("/readyz").status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "promptstore.api"]
    accepting = next(i for i, m in enumerate(messages) if m.startswith("starting (jobs: threads)"))
    ready = next(i for i, m in enumerate(messages) if m.startswith("ready to serve: backbone open_clip:tiny:random"))
    assert "/readyz answers 503 until backbone" in messages[accepting]
    assert ready > accepting

    bad = settings_factory(backbone="open_clip:no-such-arch:random")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="promptstore.api"):
        app = create_app(bad)
        with TestClient(app, raise_server_exceptions=False):
            app.state.ps.backbone.wait(60)
    assert not any(r.getMessage().startswith("ready to serve") for r in caplog.records)


def test_cancel_with_nothing_to_cancel_is_409_naming_the_state(settings_factory: Any, make_api: Any) -> None:
    api: Api = make_api(settings_factory())
    tenant = api.tenant()
    tid = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()["id"]
    api.wait_ready(tenant, tid)
    r = api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant)
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == f"task {tid} has no queued or running run to cancel (status ready)"
    assert api.task(tenant, tid)["status"] == "ready"
    assert api.client.post("/v1/tasks/nope/cancel", headers=tenant).status_code == 404


def test_admin_login_offers_basic_auth(settings_factory: Any, make_api: Any) -> None:
    api: Api = make_api(settings_factory())
    r = api.client.get("/admin")
    assert r.status_code == 401
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith('Basic realm="promptstore admin"') and "Bearer" in challenge
    assert 'id="token"' in r.text  # the login form is still the body
    r = api.client.get("/admin/tasks")  # a link into the dashboard lands on the form
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="promptstore admin"'
    assert api.client.get("/admin", auth=("admin", ADMIN["Authorization"].split()[1])).status_code == 200


def test_routine_requests_log_at_debug_and_failures_at_info(settings_factory: Any, make_api: Any, caplog: Any) -> None:
    api: Api = make_api(settings_factory())
    with caplog.at_level(logging.DEBUG, logger="promptstore.access"):
        api.client.get("/healthz")
        api.client.get("/metrics")
        api.client.get("/v1/tasks")  # 401: not routine
        api.client.get("/v1/tasks", headers={"Authorization": "Bearer nope"})
    levels = {(r.getMessage().split()[1], r.levelno) for r in caplog.records if r.name == "promptstore.access"}
    assert ("/healthz", logging.DEBUG) in levels and ("/metrics", logging.DEBUG) in levels
    assert ("/v1/tasks", logging.INFO) in levels


def test_library_lines_through_the_root_logger_carry_their_own_name() -> None:
    from api.cli import _OwnNames

    def record(level: int, path: str) -> logging.LogRecord:
        return logging.LogRecord("root", level, path, 1, "msg", None, None)

    lib = "/venv/lib/python3.11/site-packages/open_clip/factory.py"
    f = _OwnNames(logging.INFO)
    assert f.filter(record(logging.INFO, lib)) is False  # routine: dropped at INFO
    warn = record(logging.WARNING, lib)
    assert f.filter(warn) is True and warn.name == "open_clip.factory"
    debug = record(logging.INFO, lib)
    assert _OwnNames(logging.DEBUG).filter(debug) is True and debug.name == "open_clip.factory"
    own = logging.LogRecord("promptstore.api", logging.INFO, "/x/api/app.py", 1, "m", None, None)
    assert f.filter(own) is True and own.name == "promptstore.api"


def test_create_and_retrain_say_what_they_do_not_take(settings_factory: Any, make_api: Any) -> None:
    from psdata import dataset_zip

    api: Api = make_api(settings_factory())
    tenant = api.tenant()
    # JSON instead of a form: said, with the fields the route takes
    r = api.client.post("/v1/tasks", json={"name": "x", "method": "zeroshot", "classes": ["a", "b"]}, headers=tenant)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"] and "name" in r.json()["detail"]
    # a text field where the dataset file goes
    r = api.client.post("/v1/tasks", data={"name": "x", "method": "coop", "dataset": "notafile"}, headers=tenant)
    assert r.status_code == 422 and r.json()["detail"].startswith("dataset must be a file part"), r.text
    r = api.client.post("/v1/tasks", data={"name": "x", "method": "zeroshot", "classes": '["a", "b"]', "colour": "red"},
                        headers=tenant)
    assert r.status_code == 422 and "'colour'" in r.json()["detail"], r.text
    tid = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()["id"]
    api.wait_ready(tenant, tid)
    # a retrain cannot change the method or the classes, and zeroshot takes no dataset
    for data, needle in (({"method": "vpt-deep"}, "'method'"), ({"classes": '["x", "y"]'}, "'classes'")):
        r = api.client.post(f"/v1/tasks/{tid}/retrain", data=data, headers=tenant)
        assert r.status_code == 422 and needle in r.json()["detail"] and "dataset, config" in r.json()["detail"], r.text
    r = api.client.post(f"/v1/tasks/{tid}/retrain", files={"dataset": ("d.zip", dataset_zip(), "application/zip")},
                        headers=tenant)
    assert r.status_code == 422 and "not tuned on a dataset" in r.json()["detail"], r.text
    assert api.task(tenant, tid)["version"] == 1 and api.client.post(f"/v1/tasks/{tid}/retrain", headers=tenant).status_code == 202
    # the tenant body refuses a misspelt key
    r = api.client.post("/v1/admin/tenants", json={"name": "t2", "admin": True}, headers=ADMIN)
    assert r.status_code == 422 and "admin" in r.json()["detail"], r.text


def test_config_values_of_the_wrong_type_are_refused_over_http(settings_factory: Any, make_api: Any) -> None:
    api: Api = make_api(settings_factory())
    tenant = api.tenant()
    for config, key in (('{"class_specific": "yes"}', "class_specific"), ('{"epochs": "3"}', "epochs"),
                        ('{"epochs": 2.0}', "epochs"), ('{"seed": 99999999999999999999999}', "seed")):
        r = api.client.post("/v1/tasks", data={"name": "x", "method": "coop", "config": config},
                            files={"dataset": ("d.zip", __import__("psdata").dataset_zip(), "application/zip")},
                            headers=tenant)
        assert r.status_code == 422 and f"config key '{key}'" in r.json()["detail"], (config, r.text)
    assert api.client.get("/v1/tasks", headers=tenant).json()["count"] == 0


def test_configs_that_cannot_fit_the_backbone_are_refused_at_upload(settings_factory: Any, make_api: Any) -> None:
    """What the job would fail on (an init phrase and n_ctx that disagree, a frame as wide as the
    image) is a 422 at create, with nothing stored, once the backbone is loaded."""
    from psdata import dataset_zip

    api: Api = make_api(settings_factory())
    tenant = api.tenant()
    zipped = dataset_zip()
    for method, config, needle in (
        ("coop", '{"n_ctx": 3, "init": "a photo of a"}', "n_ctx=3 does not match init 'a photo of a', which is 4 tokens"),
        ("cocoop", '{"n_ctx": 64}', "n_ctx=64 does not match init 'a photo of a'"),
        ("padding", '{"pad": 16}', "pad=16 leaves no image"),
        ("padding", '{"pad": 512}', "pad=512 leaves no image"),
    ):
        r = api.client.post("/v1/tasks", data={"name": "x", "method": method, "config": config},
                            files={"dataset": ("d.zip", zipped, "application/zip")}, headers=tenant)
        assert r.status_code == 422 and needle in r.json()["detail"], (method, config, r.text)
    assert api.client.get("/v1/tasks", headers=tenant).json()["count"] == 0
