"""Classify (tenant): images in, softmax predictions over the task's classes out."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTenant, current_tenant, get_state
from api.errors import ApiError
from api.images import decode_images, read_image_payloads
from api.inference import PromptUnavailable, ServingRef
from api.schemas import ClassifyResponse, ErrorOut
from api.state import BackboneNotReady, ServiceState
from store import repo
from store.db import session_scope
from store.models import READY

log = logging.getLogger("promptstore.api")

router = APIRouter(prefix="/v1/tasks", tags=["classify"])

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["images"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
                    "required": ["images"],
                }
            },
        },
    }
}


def _serving_ref(state: ServiceState, task_id: str, tenant: CurrentTenant) -> ServingRef:
    with session_scope(state.sessionmaker) as s:
        task = repo.get_task(s, task_id, tenant_id=tenant.id)
        if task is None:
            raise ApiError(404, f"task {task_id} not found")
        pv = repo.get_served_version(s, task_id, tenant_id=tenant.id) if task.status == READY else None
        if pv is None:
            why = f"; it failed: {task.error}" if task.status == "failed" and task.error else ""
            raise ApiError(409, f"task {task_id} is {task.status}, not ready: it has no prompt to serve yet{why}")
        repo.count_request(s, tenant_id=tenant.id)
        return ServingRef(
            task_id=task.id,
            version=pv.version,
            object_key=pv.object_key,
            fingerprint=pv.fingerprint,
            classes=tuple(task.classes or ()),
        )


@router.post(
    "/{task_id}/classify",
    response_model=ClassifyResponse,
    openapi_extra=_BODY,
    responses={
        401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut},
        413: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut},
    },
)
async def classify(
    task_id: str,
    request: Request,
    top_k: int | None = Query(None, ge=1, description="Predictions per image (default: all classes)."),
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
) -> ClassifyResponse:
    """Classify one or more images (multipart ``images`` parts, or JSON ``{"images": [base64, ...]}``)
    with the task's served prompt. Scores are softmax probabilities over the task's classes,
    best first. 409 while the task has no ready version."""
    settings = state.settings
    ref = await run_in_threadpool(_serving_ref, state, task_id, tenant)
    payloads = await read_image_payloads(request, settings.max_classify_images)
    images = await run_in_threadpool(decode_images, payloads, settings.max_image_pixels)
    try:
        predictions = await state.inference.classify(ref, images, top_k)
    except BackboneNotReady as exc:
        raise ApiError(503, f"{exc}; retry shortly", {"Retry-After": "5"}) from None
    except PromptUnavailable as exc:
        raise ApiError(409, str(exc)) from None
    finally:
        for img in images:
            img.close()
    return ClassifyResponse(task_id=ref.task_id, version=ref.version, predictions=predictions)
