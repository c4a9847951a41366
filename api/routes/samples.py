"""Samples (tenant): a task's labelled images over time, and feedback on kept predictions.

- ``POST /v1/tasks/{id}/samples``: add images (multipart ``images`` parts with a ``label``
  field, or a ``dataset`` zip in the dataset format); new labels are allowed;
- ``GET /v1/tasks/{id}/samples``: the counts per class and a page of the samples;
- ``DELETE /v1/tasks/{id}/samples/{sample_id}``: remove one;
- ``POST /v1/tasks/{id}/feedback``: ``{"prediction_id", "label"}`` turns an image classified
  with ``keep=true`` into a sample.

A run trains on the task's samples as they are when it starts (``store.samples``), and a task
with ``retrain_after_samples`` gets a run once that many were added (one at a time). Every
image goes through the rules of dataset uploads (docs/inputs.md); an add is checked whole
before anything is stored, and its objects are stored before its rows.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from api.deps import CurrentTenant, current_tenant, get_state
from api.errors import ApiError, input_status
from api.jsonroute import CheckedJSONRoute
from api.schemas import ErrorOut
from api.state import ServiceState
from store import listing
from store import samples as sample_store
from store import textinput
from store.archive import ArchiveLimits
from store.db import session_scope
from store.images import ImageError
from store.models import Sample
from store.objects import ObjectNotFound

log = logging.getLogger("promptstore.api")

router = APIRouter(prefix="/v1/tasks", tags=["samples"], route_class=CheckedJSONRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key."},
    404: {"model": ErrorOut, "description": "Unknown task (or another tenant's), sample or prediction."},
}
_FIELDS = ("label", "images", "dataset")


# --------------------------------------------------------------------------- schemas


class SamplePublic(BaseModel):
    id: str
    label: str = Field(description="Its class name.")
    size: int = Field(description="Bytes of the image as it was sent.")
    sha256: str = Field(description="sha256 of the image as it was sent.")
    source: str = Field(description="dataset (the task's zip), upload (POST samples) or feedback (a kept prediction).")
    created_at: dt.datetime


class SampleSet(BaseModel):
    """Where a task's sample set stands."""

    counts: dict[str, int] = Field(description="Samples per class, over the whole set.")
    n_samples: int = Field(description="Samples in the set.")
    samples_sha256: str = Field(
        description="The set's hash, as a version records the one it was trained on: sha256 of the lines "
        "'label<TAB>sha256<LF>' of its samples, sorted."
    )
    retrain_after_samples: int | None = Field(description="A run is requested once this many samples were added since the last one started (null: never).")
    samples_since_run: int = Field(description="Samples added since the current (or last) run took its snapshot.")


class SampleList(SampleSet):
    items: list[SamplePublic]
    count: int = Field(description="Samples matching the filter, on every page.")
    next_cursor: str | None = Field(description="Pass it as `cursor` for the next page; null on the last page.")


class SamplesAdded(SampleSet):
    items: list[SamplePublic] = Field(description="The samples added, in the order sent.")
    warnings: list[str] = Field(
        description="What the upload counted once or ignored, as sentences: an image already a sample under the same "
        "label, sent twice, or (a zip) dropped as a copy or in a hidden folder.",
    )
    retrain_queued: bool = Field(description="This add made the task request a run (retrain_after_samples reached).")


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=64, description="An id of a classify answer's prediction_ids (keep=true).")
    label: str = Field(description="The right class name for that image (a new one is allowed).")


class FeedbackOut(SamplePublic):
    prediction_id: str
    duplicate: bool = Field(description="The image was already a sample under this label (no new sample).")
    retrain_queued: bool = Field(description="This feedback made the task request a run (retrain_after_samples reached).")


def sample_public(row: Sample) -> SamplePublic:
    return SamplePublic(
        id=row.id, label=row.label, size=int(row.size), sha256=row.sha256, source=row.source, created_at=row.created_at
    )


# --------------------------------------------------------------------------- helpers


def own_task(state: ServiceState, task_id: str, tenant: CurrentTenant) -> sample_store.TaskSamples:
    """The tenant's task as the samples routes need it (404 otherwise)."""
    with session_scope(state.sessionmaker) as s:
        task = sample_store.task_samples(s, task_id, tenant_id=tenant.id)
    if task is None:
        raise ApiError(404, f"task {task_id} not found")
    return task


def trained_on_images(task: sample_store.TaskSamples) -> None:
    """422 for a task whose method is not tuned on images (zeroshot: class names only)."""
    from api.routes.tasks import needs_dataset

    if not needs_dataset(task.method):
        raise ApiError(
            422, f"task {task.id} uses method {task.method}, which is not tuned on images: it takes no samples "
            "(create a task of another method to train on images)"
        )


def seed(state: ServiceState, task_id: str) -> None:
    """The task's dataset as its first samples, if no run or samples call expanded it yet."""
    sample_store.ensure_seeded(
        state.sessionmaker, state.objects, task_id, limits=ArchiveLimits.from_settings(state.settings)
    )


def check_labels(state: ServiceState, task: sample_store.TaskSamples, labels: set[str]) -> None:
    """New labels must make text prompts the method can encode, with the task's other classes
    (the rules of dataset uploads: 422 naming the class); labels the task has pass."""
    from api.routes.tasks import _stored_config, check_class_texts

    with session_scope(state.sessionmaker) as s:
        have = set(sample_store.sample_labels(s, task.id, tenant_id=task.tenant_id))
    if labels <= have:
        return
    cfg = _stored_config(task.method, task.config)
    if cfg is not None:
        check_class_texts(state, task.method, sample_store.order_classes(task.dataset_classes, have | labels), cfg)


def auto_retrain(state: ServiceState, task_id: str, tenant_id: str) -> bool:
    """Request and enqueue the task's next run when its ``retrain_after_samples`` is reached and
    no run is active (``store.samples.request_auto_retrain``). A broker that does not take it
    is logged only: the run stays queued and the reconciler sends it again."""
    with session_scope(state.sessionmaker) as s:
        task = sample_store.request_auto_retrain(s, task_id, tenant_id=tenant_id)
        attempt = task.attempt if task is not None else None
    if attempt is None:
        return False
    log.info("task %s: retrain_after_samples reached; attempt %s queued (automatic retrain)", task_id, attempt)
    try:
        state.dispatcher.submit(task_id, attempt)
    except Exception as exc:
        log.error("could not enqueue the automatic retrain of task %s attempt %s (%s); the reconciler sends it again",
                  task_id, attempt, exc)
    return True


def sample_set(state: ServiceState, task_id: str, tenant_id: str) -> dict[str, Any]:
    """The ``SampleSet`` fields of the task now."""
    with session_scope(state.sessionmaker) as s:
        task = sample_store.task_samples(s, task_id, tenant_id=tenant_id)
        snap = sample_store.current_snapshot(s, task_id, tenant_id=tenant_id)
    if task is None:
        raise ApiError(404, f"task {task_id} not found")
    return dict(
        counts=dict(sorted(snap.counts.items())), n_samples=len(snap.items), samples_sha256=snap.sha256,
        retrain_after_samples=task.retrain_after_samples, samples_since_run=task.samples_since_run,
    )


def _store_error(exc: Exception) -> ApiError:
    if isinstance(exc, sample_store.SamplesChanged):
        return ApiError(409, str(exc))
    return ApiError(422, str(exc))


# --------------------------------------------------------------------------- the upload


@dataclass
class Upload:
    """The parts of a samples upload, read but not yet checked."""

    label: str | None = None
    images: list[bytes] = field(default_factory=list)
    dataset: bytes | None = None


async def read_upload(request: Request, state: ServiceState = Depends(get_state)) -> Upload:
    """The multipart body of ``POST /v1/tasks/{id}/samples``: 415 for another body, 413 past
    ``max_archive_entries`` images, 422 for an unknown field or a text part where a file goes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(
            415, f"POST samples takes multipart/form-data (fields: label and images, or dataset), not "
            f"{ctype or 'an empty body'}; e.g. curl -F label=cat -F images=@a.jpg -F images=@b.png",
        )
    most = int(state.settings.max_archive_entries)
    try:
        form = await request.form(max_files=most + 1, max_fields=16)
    except (MultiPartException, HTTPException) as exc:
        if str(getattr(exc, "detail", exc)).startswith("Too many files"):
            raise ApiError(413, f"more than {most} images in one request, over the limit of {most}") from None
        raise
    try:
        unknown = sorted({k for k in form.keys() if k not in _FIELDS})
        if unknown:
            raise ApiError(422, f"POST samples does not take the field(s) {', '.join(map(repr, unknown))}; it takes: "
                                "label and images (files), or dataset (a zip)")
        up = Upload()
        labels = form.getlist("label")
        if len(labels) > 1:
            raise ApiError(422, "label: send one label per request (all images get it); for several classes send a "
                                "dataset zip of class folders")
        if labels:
            if not isinstance(labels[0], str):
                raise ApiError(422, "label must be a text field (a class name), not a file")
            up.label = labels[0]
        for i, part in enumerate(form.getlist("images")):
            if not isinstance(part, UploadFile):
                raise ApiError(422, f"images[{i}] is a text field; send each image as a file part, e.g. -F images=@a.jpg")
            up.images.append(await part.read())
        if len(up.images) > most:
            raise ApiError(413, f"{len(up.images)} images in one request, over the limit of {most}")
        datasets = form.getlist("dataset")
        if len(datasets) > 1:
            raise ApiError(422, "dataset: send one zip per request")
        if datasets:
            if not isinstance(datasets[0], UploadFile):
                raise ApiError(422, "dataset must be a file part (a zip of class folders), e.g. -F dataset=@more.zip")
            up.dataset = await datasets[0].read(state.settings.max_upload_bytes + 1)
        return up
    finally:
        await form.close()


def _images_of(state: ServiceState, up: Upload) -> tuple[list[sample_store.NewImage], list[str]]:
    """The upload's images, each checked and identified (nothing stored); and what the zip
    dropped or ignored (its ``warnings``), as sentences. 422/413 naming the image or the label."""
    settings = state.settings
    if up.dataset is not None and (up.images or up.label is not None):
        raise ApiError(422, "send either images with a label, or a dataset zip, not both")
    if up.dataset is not None:
        limit = settings.max_upload_bytes
        if len(up.dataset) > limit:
            raise ApiError(413, f"dataset archive is over the upload limit of {limit} bytes")
        manifest, images = sample_store.archive_images(up.dataset, ArchiveLimits.from_settings(settings))
        return images, list(manifest.warnings)
    if up.label is None:
        raise ApiError(422, "label is required with images: the class name of the images (a new one is allowed), "
                            "e.g. -F label=cat; or send a dataset zip of class folders")
    try:
        label = textinput.check_name("label", up.label, max_chars=textinput.MAX_CLASS_NAME_CHARS)
    except textinput.InputError as exc:
        raise ApiError(input_status(exc), exc.message) from None
    if not up.images:
        raise ApiError(422, "no images: send one or more file parts named 'images' with the label, "
                            "e.g. -F label=cat -F images=@a.jpg")
    out = []
    for i, data in enumerate(up.images):
        try:
            out.append(sample_store.decoded_image(label, data, name=f"images[{i}]", max_pixels=settings.max_image_pixels))
        except ImageError as exc:
            raise ApiError(input_status(exc), str(exc)) from None
    return out, []


# --------------------------------------------------------------------------- routes


@router.post(
    "/{task_id}/samples",
    status_code=201,
    response_model=SamplesAdded,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "description": "The class name of the images (new ones allowed)."},
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "dataset": {"type": "string", "format": "binary", "description": "Or a zip in the dataset format."},
                },
            }}},
        }
    },
    responses={
        **_ERRORS, 409: {"model": ErrorOut, "description": "The samples changed meanwhile (send again)."},
        413: {"model": ErrorOut}, 415: {"model": ErrorOut}, 422: {"model": ErrorOut},
    },
)
def add_samples(
    task_id: str,
    tenant: CurrentTenant = Depends(current_tenant),
    up: Upload = Depends(read_upload),
    state: ServiceState = Depends(get_state),
) -> JSONResponse:
    """Add labelled images to the task's samples: ``images`` file parts with one ``label``, or a
    ``dataset`` zip of class folders. New labels are allowed (the next run trains on them); an
    image already a sample under the same label is counted once, under another label refused.
    The next run trains on the samples as they are then; with ``retrain_after_samples`` set,
    reaching it requests that run."""
    task = own_task(state, task_id, tenant)
    trained_on_images(task)
    images, notes = _images_of(state, up)  # checked whole before anything is stored
    seed(state, task.id)
    check_labels(state, task, {img.label for img in images})
    try:
        with session_scope(state.sessionmaker) as s:
            plan = sample_store.plan_additions(s, task.id, images)
        sample_store.put_images(state.objects, tenant.id, plan.new)  # the objects before the rows
        with session_scope(state.sessionmaker) as s:
            rows = sample_store.insert_samples(s, task.id, plan.new, tenant_id=tenant.id, source=sample_store.UPLOAD)
            added = [sample_public(r) for r in rows]
    except (sample_store.SampleError, sample_store.SamplesChanged) as exc:
        raise _store_error(exc) from None
    queued = auto_retrain(state, task.id, tenant.id) if added else False
    body = SamplesAdded(
        items=added, warnings=notes + plan.duplicate_notes(), retrain_queued=queued,
        **sample_set(state, task.id, tenant.id),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=201)


@router.get("/{task_id}/samples", response_model=SampleList, responses={**_ERRORS, 422: {"model": ErrorOut}})
def list_samples(
    task_id: str,
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
    limit: int | None = Query(None, description="Samples per page, 1 to 1000 (default 100)."),
    cursor: str | None = Query(None, description="The `next_cursor` of the previous page; omitted: the first page."),
    label: str | None = Query(None, description="Only the samples of this class."),
) -> SampleList:
    """The task's samples, oldest first, a page at a time, with the count per class and where
    the set stands (its hash, the auto-retrain threshold and the samples added since the last run)."""
    task = own_task(state, task_id, tenant)
    wanted = None
    if label is not None:
        try:
            wanted = textinput.check_name("label", label, max_chars=textinput.MAX_CLASS_NAME_CHARS)
        except textinput.InputError as exc:
            raise ApiError(422, exc.message) from None
    seed(state, task.id)
    try:
        with session_scope(state.sessionmaker) as s:
            page = sample_store.sample_page(s, task.id, tenant_id=tenant.id, limit=limit, cursor=cursor, label=wanted)
            items = [sample_public(r) for r in page.items]
    except listing.InvalidListing as exc:
        raise ApiError(422, str(exc)) from None
    return SampleList(items=items, count=page.count, next_cursor=page.next_cursor, **sample_set(state, task.id, tenant.id))


@router.delete("/{task_id}/samples/{sample_id}", status_code=204, response_class=Response, responses=_ERRORS)
def delete_sample(
    task_id: str,
    sample_id: str,
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
) -> Response:
    """Remove one sample from the task's set; the next run trains without it (a version trained
    on it keeps its record). Its image is deleted by the garbage collector once no sample refers to it."""
    task = own_task(state, task_id, tenant)
    with session_scope(state.sessionmaker) as s:
        gone = sample_store.delete_sample(s, task.id, sample_id, tenant_id=tenant.id)
    if not gone:
        raise ApiError(404, f"task {task_id} has no sample {sample_id[:64]} (GET /v1/tasks/{task_id}/samples lists them)")
    return Response(status_code=204)


@router.post(
    "/{task_id}/feedback",
    status_code=201,
    response_model=FeedbackOut,
    responses={
        **_ERRORS,
        200: {"model": FeedbackOut, "description": "The same feedback again: the sample it made."},
        409: {"model": ErrorOut, "description": "The prediction was already labelled otherwise, or the samples changed meanwhile."},
        422: {"model": ErrorOut},
    },
)
def feedback(
    task_id: str,
    body: FeedbackIn,
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
) -> JSONResponse:
    """Turn an image classified with ``keep=true`` into a sample of class ``label`` (201 with the
    sample). 404 for an unknown prediction, or one that expired (the detail says when); the same
    feedback again answers 200 with the same sample, another label for it 409."""
    task = own_task(state, task_id, tenant)
    try:
        label = textinput.check_name("label", body.label, max_chars=textinput.MAX_CLASS_NAME_CHARS)
    except textinput.InputError as exc:
        raise ApiError(input_status(exc), exc.message) from None
    try:
        with session_scope(state.sessionmaker) as s:
            pred = sample_store.live_prediction(s, task.id, body.prediction_id, tenant_id=tenant.id)
            earlier = sample_store.get_sample(s, task.id, pred.sample_id, tenant_id=tenant.id) if pred.sample_id else None
    except sample_store.PredictionGone as exc:
        raise ApiError(404, str(exc)) from None
    if earlier is not None:
        if earlier.label != label:
            raise ApiError(409, f"prediction {pred.id} was already labelled '{earlier.label}' (sample {earlier.id}); "
                                f"to label it again, DELETE /v1/tasks/{task_id}/samples/{earlier.id} first")
        return _feedback_answer(earlier, pred.id, duplicate=True, queued=False, status=200)  # no new sample
    trained_on_images(task)
    seed(state, task.id)
    check_labels(state, task, {label})
    try:
        data = state.objects.get(pred.object_key)
    except ObjectNotFound:  # swept as it expired, just now
        raise ApiError(404, f"prediction {pred.id} expired at {pred.expires_at.isoformat(timespec='seconds')}: its "
                            "image is no longer kept; classify it again with keep=true") from None
    try:
        image = sample_store.decoded_image(label, data, name=f"prediction {pred.id}", max_pixels=state.settings.max_image_pixels)
    except ImageError as exc:
        raise ApiError(input_status(exc), str(exc)) from None
    try:
        with session_scope(state.sessionmaker) as s:
            plan = sample_store.plan_additions(s, task.id, [image])
        sample_store.put_images(state.objects, tenant.id, plan.new)
        with session_scope(state.sessionmaker) as s:
            rows = sample_store.insert_samples(s, task.id, plan.new, tenant_id=tenant.id, source=sample_store.FEEDBACK)
            row = rows[0] if rows else plan.duplicates[0][1]
            assert row is not None
            if not sample_store.link_prediction(s, pred, row.id):
                s.rollback()
                raise sample_store.SamplesChanged(
                    f"prediction {pred.id} was labelled by a concurrent feedback meanwhile; read the task's samples"
                )
    except (sample_store.SampleError, sample_store.SamplesChanged) as exc:
        raise _store_error(exc) from None
    queued = auto_retrain(state, task.id, tenant.id) if rows else False
    return _feedback_answer(row, pred.id, duplicate=not rows, queued=queued, status=201 if rows else 200)


def _feedback_answer(row: Sample, prediction_id: str, *, duplicate: bool, queued: bool, status: int) -> JSONResponse:
    out = FeedbackOut(**sample_public(row).model_dump(), prediction_id=prediction_id, duplicate=duplicate,
                      retrain_queued=queued)
    return JSONResponse(out.model_dump(mode="json"), status_code=status)
