"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import get_state
from api.state import ServiceState
from worker.runtime import BackboneNotReady, public_text
from store.db import session_scope

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


@router.get("/readyz")
def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    """200 when the database, the object store and the backbone are usable; else 503 whose
    ``detail`` names the failing parts. Shows the backbone's id and whether its weights are
    real or random, and the inference engine's queue and prompt cache."""
    checks: dict[str, Any] = {}
    failures: list[str] = []
    for part, check in (("database", _check_database), ("object_store", _check_objects)):
        err = check(state)
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
        "jobs": getattr(state.dispatcher, "kind", "unknown"),
        "engine": state.inference.stats(),
    }
    if failures:
        body["detail"] = "not ready: " + "; ".join(failures)
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)


@router.get("/metrics", response_class=Response)
def metrics(state: ServiceState = Depends(get_state)) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
