"""Classify (tenant): images in, softmax predictions over the task's classes out.

The handler reads the served version from the database, decodes the images off the event
loop and hands them to the cross-tenant engine (``api.engine``), which batches them with
other tenants' requests. A tenant over its classify rate gets 429, and a full engine queue
503, both with Retry-After."""

from __future__ import annotations

import logging
import time

import datetime as dt

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import CurrentTenant, authenticate, bearer, get_state, take_classify
from api.errors import ApiError
from api.images import decode_images, read_image_payloads
from api.engine import PromptUnavailable, QueueFull, ServingRef, StaleVersion
from api.schemas import ClassifyResponse, ErrorOut
from api.state import ServiceState
from backbone.holder import BackboneNotReady
from store import repo
from store import samples as sample_store
from store.db import session_scope, utcnow
from store.models import READY

log = logging.getLogger("promptstore.api")

router = APIRouter(prefix="/v1/tasks", tags=["classify"])

#: Times a request re-reads the served prompt after the engine found a newer one (a publish, a
#: serve); past that (the served version changing faster than a request is answered) 503.
STALE_RETRIES = 5

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


class ClassifyAnswer(ClassifyResponse):
    """The classify answer, and with ``keep=true`` the ids of the images kept for feedback."""

    prediction_ids: list[str] | None = Field(
        None, description="With keep=true: one id per image, in order, for POST /v1/tasks/{id}/feedback; null "
        "without keep (nothing is stored then).",
    )
    kept_until: dt.datetime | None = Field(
        None, description="With keep=true: when the kept images are deleted (PROMPTSTORE_PREDICTION_RETENTION_S).",
    )


def _serving_ref(state: ServiceState, task_id: str, tenant: CurrentTenant) -> ServingRef:
    with session_scope(state.sessionmaker) as s:
        return _ref_of(repo.serving_info(s, task_id, tenant_id=tenant.id), task_id)


def classify_target(
    task_id: str,
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(bearer),
    state: ServiceState = Depends(get_state),
) -> tuple[CurrentTenant, ServingRef]:
    """The caller's tenant and the task's served version, read in one short session (the
    hot path: one thread hop and one connection checkout per request); 401, 429, 404 or 409."""
    with session_scope(state.sessionmaker) as s:
        tenant = authenticate(s, request, creds)
        take_classify(state, tenant)
        info = repo.serving_info(s, task_id, tenant_id=tenant.id)
    return tenant, _ref_of(info, task_id)


def _ref_of(info: repo.ServingInfo | None, task_id: str) -> ServingRef:
    if info is None:
        raise ApiError(404, f"task {task_id} not found")
    if info.version is None and info.zero_shot and info.classes:
        # Before its first version: zero-shot predictions on the class names (version 0), built
        # by the engine; the first publish raises the generation, so none answers after it.
        return ServingRef(
            task_id=task_id, version=0, object_key="", fingerprint="", classes=tuple(info.classes),
            method="zeroshot", generation=info.generation, min_score=info.min_score, task_method=info.method,
        )
    if info.status != READY or info.version is None or info.object_key is None:
        why = f"; it failed: {info.error}" if info.status == "failed" and info.error else ""
        raise ApiError(409, f"task {task_id} is {info.status}, not ready: it has no prompt to serve yet{why}")
    return ServingRef(
        task_id=task_id,
        version=info.version,
        object_key=info.object_key,
        fingerprint=str(info.fingerprint),
        classes=tuple(info.classes or ()),
        method=info.version_method or info.method,
        generation=info.generation,
        min_score=info.min_score,
        task_method=info.method,
    )


@router.post(
    "/{task_id}/classify",
    response_model=ClassifyAnswer,
    openapi_extra=_BODY,
    responses={
        401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut},
        413: {"model": ErrorOut}, 415: {"model": ErrorOut, "description": "Neither multipart nor JSON."},
        422: {"model": ErrorOut}, 503: {"model": ErrorOut},
        429: {"model": ErrorOut, "description": "Over the tenant's classify rate (see Retry-After)."},
    },
)
async def classify(
    task_id: str,
    request: Request,
    top_k: int | None = Query(None, ge=1, description="Predictions per image (default: all classes)."),
    min_score: float | None = Query(
        None, ge=0.0, le=1.0,
        description="Leave out labels scoring below this (0..1); an image with none left gets an empty "
        "list (\"none of these\"). Default: the task's `min_score` (PATCH /v1/tasks/{id}), else none.",
    ),
    keep: bool = Query(
        False, description="Keep the images (for PROMPTSTORE_PREDICTION_RETENTION_S) so that a feedback can turn "
        "one into a sample; the answer then has `prediction_ids`. Default false: nothing is stored.",
    ),
    target: tuple[CurrentTenant, ServingRef] = Depends(classify_target),
    state: ServiceState = Depends(get_state),
) -> ClassifyAnswer:
    """Classify one or more images (multipart ``images`` parts, or JSON ``{"images": [base64, ...]}``)
    with the task's served prompt. Scores are softmax probabilities over the task's classes,
    best first; with ``min_score`` (or the task's default) only the labels scoring at least that
    are listed. 409 while the task has no ready version. With ``keep=true`` the images are kept
    for feedback (``prediction_ids``); without it no image is stored."""
    settings = state.settings
    started = time.perf_counter()
    tenant, ref = target
    if state.requests is not None:
        state.requests.add(tenant.id)
    try:
        if keep and not ref.takes_samples:
            raise ApiError(
                422, f"keep: task {task_id} is of method {ref.task_method}, which is not tuned on images and takes "
                "no samples, so a kept image could never become one; classify without keep",
            )
        payloads = await read_image_payloads(request, settings.max_classify_images)
    except ClientDisconnect:  # nobody to answer; not a fault of the service
        raise ApiError(400, "the client disconnected before sending the whole request") from None
    images = await run_in_threadpool(decode_images, payloads, settings.max_image_pixels)
    engine = state.inference
    outcome = "error"
    try:
        for attempt in range(STALE_RETRIES):
            try:
                predictions = await engine.classify(ref, images, top_k)
                break
            except StaleVersion:
                if attempt == STALE_RETRIES - 1:
                    raise ApiError(503, "the task's prompt changed while answering; retry", {"Retry-After": "1"}) from None
                # A newer version was published meanwhile: answer with it (or 404 if deleted).
                ref = await run_in_threadpool(_serving_ref, state, task_id, tenant)
        outcome = "ok"
    except QueueFull as exc:
        outcome = "rejected"
        raise ApiError(503, f"{exc}; retry in {exc.retry_after}s", {"Retry-After": str(exc.retry_after)}) from None
    except BackboneNotReady as exc:
        raise ApiError(503, f"{exc}; retry shortly", {"Retry-After": "5"}) from None
    except PromptUnavailable as exc:
        outcome = "unavailable"
        if ref.version == 0:  # zero-shot before the first version: the task's state says why not
            raise ApiError(409, f"task {task_id} has no prompt to serve yet and {exc}") from None
        raise ApiError(409, str(exc)) from None
    finally:
        for img in images:
            img.close()
        engine.observe(ref.method, outcome, time.perf_counter() - started if outcome == "ok" else None)
    kept: list[str] | None = None
    kept_until = None
    if keep:  # the images as sent, each under its own key, then the rows (store.samples)
        retention = settings.prediction_retention_s
        tops = [(str(image[0]["label"]), float(image[0]["score"])) if image else (None, None) for image in predictions]
        now = utcnow()
        kept_until = now + dt.timedelta(seconds=retention)
        kept = await run_in_threadpool(
            lambda: sample_store.keep_predictions(
                state.sessionmaker, state.objects, tenant_id=tenant.id, task_id=ref.task_id, version=ref.version,
                images=payloads, tops=tops, retention_s=retention, now=now,
            )
        )
        if kept is None:
            raise ApiError(404, f"task {task_id} not found (it was deleted while answering); nothing was kept")
    threshold = min_score if min_score is not None else ref.min_score
    if threshold is not None:
        predictions = [[p for p in image if p["score"] >= threshold] for image in predictions]
    return ClassifyAnswer(
        task_id=ref.task_id, version=ref.version, zero_shot=ref.version == 0, min_score=threshold,
        predictions=predictions, prediction_ids=kept, kept_until=kept_until,
    )
