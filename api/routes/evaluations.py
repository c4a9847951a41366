"""Evaluations (tenant): score a kept prompt version on a held-out labelled zip.

``POST /v1/tasks/{id}/evaluate`` stores the zip under ``evaluations/{tenant}/{task}/{eid}.zip``,
records the evaluation (queued) with its ``evaluation_queued`` event in one transaction,
commits, then submits the job (``worker.evaluate``, on the same queue as tuning). The job
writes the figures (``backbone.evaluation``) to the row, read back with
``GET /v1/tasks/{id}/evaluations/{eid}``; ``GET /v1/tasks/{id}/evaluations`` lists them slim.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError

from api.deps import CurrentTenant, DbSession, current_tenant, form_fields, get_state, job_submitter
from api.errors import ApiError
from api.schemas import ErrorOut
from api.services import enqueue_evaluation
from api.state import ServiceState
from store import evaluations as evals
from store import repo
from store.archive import ArchiveLimits, inspect_archive
from store.objects import evaluation_key, sha256_hex

log = logging.getLogger("promptstore.api")

router = APIRouter(prefix="/v1/tasks", tags=["evaluations"])

#: Default target precision of the thresholds.
DEFAULT_PRECISION = 0.9
#: Default k of the top-k accuracy (at most the version's number of classes).
DEFAULT_TOP_K = 5
#: Class names listed in one error before "and N more".
_MAX_LISTED = 20

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key."},
    404: {"model": ErrorOut, "description": "Unknown task or evaluation (or another tenant's), or no such version."},
}


# --------------------------------------------------------------------------- bodies


class EvaluationParams(BaseModel):
    top_k: int = Field(description="The k of `result.top_k_accuracy`.")
    precision: float = Field(description="The target precision of the thresholds, in (0, 1].")


class TopKAccuracy(BaseModel):
    k: int
    accuracy: float | None = Field(description="Fraction of images whose true class is among the k best scores.")


class ClassFigures(BaseModel):
    label: str
    precision: float | None = Field(description="tp / (tp + fp); null when the class is never predicted.")
    recall: float | None = Field(description="tp / (tp + fn); null when the class has no image.")
    f1: float | None = Field(description="2 tp / (2 tp + fp + fn); null when the class has no image and no prediction.")
    support: int = Field(description="Images of this class.")
    threshold: float | None = Field(
        description="The lowest score t such that, among the images predicted as this class with score >= t, the "
        "precision is at least params.precision; null when no t reaches it."
    )


class ReliabilityBin(BaseModel):
    lower: float
    upper: float
    confidence: float | None = Field(description="Mean top-1 score of the bin's images; null for an empty bin.")
    accuracy: float | None = Field(description="Fraction of the bin's images predicted right; null for an empty bin.")
    count: int


class EvaluationSummary(BaseModel):
    """The headline figures (what the list shows)."""

    n_images: int
    classes: list[str] = Field(description="The version's classes, in its order (the rows of `confusion`).")
    accuracy: float | None
    top_k_accuracy: TopKAccuracy
    macro_f1: float | None = Field(description="Mean F1 over the classes with an image or a prediction.")
    ece: float | None = Field(description="Expected calibration error over 15 equal-width confidence bins.")
    suggested_min_score: float | None = Field(
        description="The lowest top-1 score threshold giving params.precision over the images answered; null if none."
    )
    coverage_at_suggested: float | None = Field(description="Fraction of images answered at suggested_min_score.")


class EvaluationResult(BaseModel):
    """Every figure of an evaluation."""

    n_images: int
    classes: list[str] = Field(description="The version's classes, in its order (the rows of `confusion`).")
    accuracy: float | None
    top_k_accuracy: TopKAccuracy
    macro_f1: float | None = Field(description="Mean F1 over the classes with an image or a prediction.")
    per_class: list[ClassFigures]
    confusion: list[list[int]] = Field(description="Rows: true class; columns: predicted class; in `classes` order.")
    ece: float | None = Field(description="Expected calibration error over 15 equal-width confidence bins.")
    reliability: list[ReliabilityBin] = Field(description="The reliability diagram: 15 bins of top-1 confidence.")
    suggested_min_score: float | None = Field(
        description="The lowest top-1 score threshold giving params.precision over the images answered; null if none."
    )
    coverage_at_suggested: float | None = Field(description="Fraction of images answered at suggested_min_score.")


class _EvaluationBase(BaseModel):
    id: str
    task_id: str
    version: int = Field(description="The prompt version evaluated.")
    status: str = Field(description="queued | running | ready | failed")
    error: str | None = Field(None, description="Why the evaluation failed; null unless failed.")
    created_at: dt.datetime
    finished_at: dt.datetime | None = Field(None, description="Null until ready or failed.")
    params: EvaluationParams


class EvaluationPublic(_EvaluationBase):
    result: EvaluationResult | None = Field(None, description="The figures once ready; null before.")


class EvaluationSlim(_EvaluationBase):
    result: EvaluationSummary | None = Field(None, description="The headline figures once ready; null before.")


class EvaluationList(BaseModel):
    items: list[EvaluationSlim]
    count: int


def _common(ev: Any) -> dict[str, Any]:
    params = ev.params if isinstance(ev.params, dict) else {}
    return {
        "id": ev.id,
        "task_id": ev.task_id,
        "version": ev.version,
        "status": ev.status,
        "error": ev.error,
        "created_at": ev.created_at,
        "finished_at": ev.finished_at,
        "params": {"top_k": int(params.get("top_k") or 1), "precision": float(params.get("precision") or 0.0)},
    }


def evaluation_public(ev: Any) -> EvaluationPublic:
    result = ev.result if isinstance(ev.result, dict) and ev.status == "ready" else None
    return EvaluationPublic(**_common(ev), result=EvaluationResult.model_validate(result) if result else None)


def evaluation_slim(ev: Any) -> EvaluationSlim:
    result = ev.result if isinstance(ev.result, dict) and ev.status == "ready" else None
    return EvaluationSlim(**_common(ev), result=EvaluationSummary.model_validate(result) if result else None)


# --------------------------------------------------------------------------- helpers


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _version_classes(state: ServiceState, pv: Any) -> list[str]:
    """The version's classes in its order (from the prompt's header for a version recorded
    before versions kept them)."""
    if isinstance(pv.classes, list):
        return [str(c) for c in pv.classes]
    from backbone import PromptFormatError, read_prompt_metadata

    try:
        classes = json.loads(read_prompt_metadata(state.objects.get(pv.object_key))["classes"])
    except (PromptFormatError, ValueError, KeyError):
        raise ApiError(409, f"version {pv.version} does not record its classes; it cannot be evaluated") from None
    return [str(c) for c in classes]


def _check_backbone(state: ServiceState, task_id: str, pv: Any) -> None:
    """409 for a version tuned on another backbone than the one this service runs (skipped while
    the backbone loads: the job then fails with the reason)."""
    from backbone.holder import BackboneNotReady

    try:
        fingerprint = state.backbone.get().fingerprint
    except BackboneNotReady:
        return
    if pv.fingerprint != fingerprint:
        raise ApiError(
            409,
            f"version {pv.version} of task {task_id} was tuned on backbone {repo.fingerprint_label(pv.fingerprint)}, "
            f"not on the one this service runs ({repo.fingerprint_label(fingerprint)}); it cannot be evaluated here",
        )


# --------------------------------------------------------------------------- routes


@router.post(
    "/{task_id}/evaluate",
    status_code=202,
    response_model=EvaluationPublic,
    responses={
        **_ERRORS,
        409: {"model": ErrorOut, "description": "The task has no version yet, or the version was made on another backbone."},
        413: {"model": ErrorOut, "description": "The zip (or an image in it) is over a size limit."},
        415: {"model": ErrorOut, "description": "Not a multipart form."},
        422: {"model": ErrorOut, "description": "Bad zip, a class not among the version's, or a bad field."},
        429: {"model": ErrorOut, "description": "Over the tenant's rate of jobs (see Retry-After)."},
        503: {"model": ErrorOut, "description": "The job queue did not take the job (the evaluation stays queued)."},
    },
)
def evaluate(
    s: DbSession,
    task_id: str,
    dataset: UploadFile = File(..., description="Zip of class folders (the task upload format) holding labelled images."),
    version: int | None = Form(
        None, ge=0, le=2**31 - 1, description="The version to evaluate (1, 2, ...); default: the one served."
    ),
    top_k: int | None = Form(None, ge=1, description="k of the top-k accuracy; default min(5, classes)."),
    precision: float | None = Form(
        None, gt=0.0, le=1.0, description="Target precision of the thresholds, in (0, 1]; default 0.9."
    ),
    tenant: CurrentTenant = Depends(job_submitter),
    _fields: None = Depends(form_fields("evaluate", "dataset", "version", "top_k", "precision")),
    state: ServiceState = Depends(get_state),
) -> EvaluationPublic:
    """Queue an evaluation of a prompt version on a labelled zip (same format and limits as a task's
    dataset; its classes must be among the version's, a subset is fine). Answers 202 with the
    evaluation; poll ``GET /v1/tasks/{id}/evaluations/{eid}`` until ``status`` is ready or failed."""
    task = repo.get_task(s, task_id, tenant_id=tenant.id)
    if task is None:
        raise ApiError(404, f"task {task_id} not found")
    if precision is not None and not math.isfinite(precision):
        raise ApiError(422, "precision must be a number in (0, 1]")
    chosen = version if version is not None else task.version
    if chosen is None:
        raise ApiError(409, f"task {task_id} has no prompt version yet (status {task.status}); evaluate it once ready")
    pv = repo.get_version(s, task_id, chosen, tenant_id=tenant.id)
    if pv is None:
        kept = [v.version for v in repo.list_versions(s, task_id, tenant_id=tenant.id)]
        if not kept:
            raise ApiError(409, f"task {task_id} has no prompt version yet (status {task.status}); evaluate it once ready")
        raise ApiError(404, repo.no_such_version(task_id, chosen, kept))
    _check_backbone(state, task_id, pv)
    classes = _version_classes(state, pv)

    limit = state.settings.max_upload_bytes
    dataset.file.seek(0)
    data = dataset.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"dataset archive is over the upload limit of {limit} bytes")
    manifest = inspect_archive(data, ArchiveLimits.from_settings(state.settings))  # DatasetError: 413/422
    unknown = [c for c in manifest.classes if c not in set(classes)]
    if unknown:
        raise ApiError(
            422,
            f"the zip's class(es) {_listed(unknown)} are not among version {chosen}'s classes ({_listed(classes)}); "
            "an evaluation zip holds folders named after the version's classes (a subset is fine)",
        )
    params = {
        "top_k": min(int(top_k) if top_k is not None else DEFAULT_TOP_K, len(classes)),
        "precision": float(precision) if precision is not None else DEFAULT_PRECISION,
    }
    evaluation_id = evals.new_evaluation_id()
    key = evaluation_key(tenant.id, task_id, evaluation_id)
    state.objects.put(key, data)  # the object before the row that points to it
    try:
        ev = evals.create_evaluation(
            s, evaluation_id=evaluation_id, task_id=task_id, tenant_id=tenant.id, version=chosen, object_key=key,
            sha256=sha256_hex(data), size=len(data), params=params,
        )
        body = evaluation_public(ev)
        s.commit()
    except IntegrityError:  # the task was deleted meanwhile (the zip is left to the garbage collector)
        s.rollback()
        raise ApiError(404, f"task {task_id} not found") from None
    enqueue_evaluation(state, task_id, evaluation_id)
    return body


@router.get("/{task_id}/evaluations", response_model=EvaluationList, responses=_ERRORS)
def list_evaluations(task_id: str, s: DbSession, tenant: CurrentTenant = Depends(current_tenant)) -> EvaluationList:
    """The task's evaluations, newest first, with their headline figures (no per-class figures,
    confusion matrix or reliability diagram: ``GET .../evaluations/{eid}`` has them)."""
    if repo.get_task(s, task_id, tenant_id=tenant.id) is None:
        raise ApiError(404, f"task {task_id} not found")
    items = [evaluation_slim(ev) for ev in evals.list_evaluations(s, task_id, tenant_id=tenant.id)]
    return EvaluationList(items=items, count=len(items))


@router.get("/{task_id}/evaluations/{evaluation_id}", response_model=EvaluationPublic, responses=_ERRORS)
def get_evaluation(
    task_id: str, evaluation_id: str, s: DbSession, tenant: CurrentTenant = Depends(current_tenant)
) -> EvaluationPublic:
    """One evaluation: its state and, once ready, every figure."""
    ev = evals.get_evaluation(s, task_id, evaluation_id, tenant_id=tenant.id)
    if ev is None:
        if repo.get_task(s, task_id, tenant_id=tenant.id) is None:
            raise ApiError(404, f"task {task_id} not found")
        raise ApiError(404, f"task {task_id} has no evaluation {evaluation_id}")
    return evaluation_public(ev)
