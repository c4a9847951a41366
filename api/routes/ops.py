"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import get_state
from api.schemas import ErrorOut
from api.state import ServiceState
from backbone.errors import public_text
from backbone.holder import BackboneNotReady
from store.db import session_scope
from store.timeouts import DATABASE, OBJECT_STORE, RETRY_AFTER_S, format_seconds

log = logging.getLogger("promptstore.api")

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 while the process is up."""
    return {"status": "ok"}


def _check_database(state: ServiceState) -> str | None:
    try:
        with session_scope(state.sessionmaker) as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("readyz: database check failed: %s", exc)
        return f"database unreachable ({type(exc).__name__})"
    return None


def _check_objects(state: ServiceState) -> str | None:
    try:
        state.objects.ping()
    except Exception as exc:
        log.warning("readyz: object store check failed: %s", exc)
        return f"object store unreachable ({type(exc).__name__})"
    return None


_checks_lock = threading.Lock()
_checks_inflight: dict[tuple[int, str], "_Check"] = {}


class _Check:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: str | None = None


def _start_check(state: ServiceState, part: str, check: Callable[[ServiceState], str | None]) -> _Check:
    """Run ``check`` on a daemon thread, or join the one still running for ``part``: a frozen
    dependency holds at most one thread per part, until its own timeouts end the call."""
    key = (id(state), part)
    with _checks_lock:
        running = _checks_inflight.get(key)
        if running is not None:
            return running
        chk = _checks_inflight[key] = _Check()

    def run() -> None:
        try:
            chk.result = check(state)
        except Exception as exc:  # the checks catch their own; this is a last resort
            chk.result = f"{part} check failed ({type(exc).__name__})"
        finally:
            with _checks_lock:
                _checks_inflight.pop(key, None)
            chk.done.set()

    threading.Thread(target=run, name=f"promptstore-readyz-{part}", daemon=True).start()
    return chk


@router.get("/readyz", responses={503: {"model": ErrorOut, "description": "Not ready: `detail` names the failing parts; the body lists each check."}})
def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    """200 when the database, the object store and the backbone are usable; else 503 whose
    ``detail`` names the failing parts. Shows the backbone's id and whether its weights are
    real or random, and the inference engine's queue and prompt cache."""
    checks: dict[str, Any] = {}
    failures: list[str] = []
    limit = state.settings.readyz_timeout  # every check within it, in parallel: under the probe's timeout
    deadline = time.monotonic() + limit
    running = [
        (part, name, _start_check(state, part, check))
        for part, name, check in (("database", DATABASE, _check_database), ("object_store", OBJECT_STORE, _check_objects))
    ]
    for part, name, chk in running:
        if chk.done.wait(max(0.0, deadline - time.monotonic())):
            err = chk.result
        else:
            log.warning("readyz: %s did not answer within %s s", name, format_seconds(limit))
            err = f"{name} did not answer within {format_seconds(limit)} s"
        checks[part] = "ok" if err is None else err
        if err:
            failures.append(err)
    # /readyz is unauthenticated: a checkpoint path in the spec shows as its file name only
    backbone: dict[str, Any] = {"id": public_text(state.settings.backbone), "weights": None, "status": "loading"}
    try:
        bb = state.backbone.get()
        backbone = {"id": public_text(bb.spec), "weights": bb.weights, "status": "ok", "device": str(bb.device)}
    except BackboneNotReady as exc:
        backbone["status"] = str(exc)
        failures.append(str(exc))
    checks["backbone"] = backbone["status"]
    body: dict[str, Any] = {
        "status": "ready" if not failures else "not ready",
        "checks": checks,
        "backbone": backbone,
        "jobs": state.dispatcher.kind,
        "engine": state.inference.stats(),
    }
    if failures:
        body["detail"] = "not ready: " + "; ".join(failures)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse(body)


@router.get(
    "/metrics", response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format."}},
)
def metrics(state: ServiceState = Depends(get_state)) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
