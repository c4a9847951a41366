"""Tasks (tenant): create, list, get, retrain, cancel, delete, download the prompt.

Handlers are thin: parsing and validation here; what the admin dashboard does too (store a
dataset, start, cancel or delete a run, enqueue it) in ``api.services``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Header, Query, Response, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, DbSession, current_tenant, form_fields, get_state, job_submitter
from api.errors import ApiError
from api.schemas import ErrorOut, TaskList, TaskPublic, task_public
from api.state import ServiceState
from api.services import cancel_run, delete_task_and_objects, enqueue, request_run, store_dataset
from store import idempotency, repo, textinput
from store.models import ACTIVE_STATUSES
from store.objects import sha256_hex
from backbone.methods import task_method_names

log = logging.getLogger("promptstore.api")

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

MAX_ZEROSHOT_CLASSES = 10_000
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key."},
    404: {"model": ErrorOut, "description": "Unknown task (or another tenant's)."},
}
_LIMITED = {429: {"model": ErrorOut, "description": "Over the tenant's rate of tuning jobs (see Retry-After)."}}


# --------------------------------------------------------------------------- helpers


def parse_config(method: str, raw: str | None) -> dict[str, Any]:
    """The validated full config (defaults filled; all defaults when ``raw`` is None).
    422 for bad JSON, a non-object, an unknown method, an unknown/invalid key or a
    non-finite number (NaN, Infinity, 1e309), naming the key and its bounds."""
    import math

    from backbone import ConfigError, validate_config

    cfg: Any = None
    if raw is not None and raw.strip():
        try:  # size, depth and Unicode bounds first (store.textinput, docs/inputs.md "Text and JSON")
            cfg = textinput.loads_checked("config", raw, max_bytes=textinput.MAX_CONFIG_BYTES)
        except json.JSONDecodeError as exc:
            raise ApiError(422, f"config is not valid JSON ({exc.msg}); send a JSON object such as {{\"epochs\": 5}}") from None
        if not isinstance(cfg, dict):
            raise ApiError(422, "config must be a JSON object of method hyperparameters, e.g. {\"epochs\": 5}")
    try:
        validated = validate_config(method, cfg)  # refuses NaN/inf in every float field, naming its bounds
    except ConfigError as exc:
        raise ApiError(422, str(exc)) from None

    def non_finite_key(value: Any, path: str = "") -> str | None:  # dotted path of the first one, or None
        if isinstance(value, float) and not math.isfinite(value):
            return path or "config"
        if isinstance(value, dict):
            items: Any = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            items = ((f"{path}.{i}", v) for i, v in enumerate(value))
        else:
            return None
        return next((p for p in (non_finite_key(v, k) for k, v in items) if p is not None), None)

    # json.loads reads NaN, Infinity, -Infinity and overflowing numbers (1e309) as non-finite
    # floats; a key that validation let through with one (a free-form field) is refused too.
    bad = non_finite_key(cfg)
    if bad is not None:
        raise ApiError(
            422,
            f"config key {bad!r}: numbers must be finite JSON numbers (no NaN, Infinity or values beyond "
            "about 1.8e308); see the method's bounds for this key",
        )
    try:
        return json.loads(json.dumps(dict(validated), allow_nan=False))
    except (TypeError, ValueError):  # pragma: no cover - validate_config returns finite JSON types
        raise ApiError(422, "config holds a value that is not a finite JSON number") from None


def needs_dataset(method: str) -> bool:
    """Whether tasks of ``method`` (already validated) are tuned on a dataset (the registry's word)."""
    from backbone.methods import get_method

    return get_method(method).needs_dataset


def parse_classes(raw: str | None) -> list[str]:
    if raw is None or not raw.strip():
        raise ApiError(422, 'classes is required for method zeroshot: a JSON list of class names, e.g. ["cat", "dog"]')
    try:
        value = textinput.loads_checked("classes", raw, max_bytes=textinput.MAX_CLASSES_BYTES)
    except json.JSONDecodeError:
        raise ApiError(422, 'classes is not valid JSON; send a JSON list of class names, e.g. ["cat", "dog"]') from None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ApiError(422, 'classes must be a JSON list of strings, e.g. ["cat", "dog"]')
    if any(not c.strip() for c in value):
        raise ApiError(422, "classes: every class name must be a non-empty string")
    names = [textinput.check_name(f"classes[{i}]", c, max_chars=textinput.MAX_CLASS_NAME_CHARS) for i, c in enumerate(value)]
    if len(set(names)) != len(names):
        dup = next(c for c in names if names.count(c) > 1)
        raise ApiError(422, f"classes: '{dup}' appears twice; class names must be unique")
    if len(names) < 2:
        raise ApiError(422, "classes: a task needs at least 2 classes")
    if len(names) > MAX_ZEROSHOT_CLASSES:
        raise ApiError(413, f"classes: {len(names)} classes, over the limit of {MAX_ZEROSHOT_CLASSES}")
    return names


def text_tokens(state: ServiceState) -> Any:
    """The backbone's tokenizer (``backbone.loading.TextTokens``, None without a text tower): the
    loaded backbone's, else one built from the spec alone (no weights). 503 when neither can be had."""
    from backbone.loading import text_tokens_for_spec
    from backbone.holder import BackboneNotReady

    try:
        return state.backbone.get().text_tokens
    except BackboneNotReady:
        pass
    try:
        return text_tokens_for_spec(state.backbone.spec)
    except Exception as exc:
        log.warning("no tokenizer for backbone %s to check class prompts: %s", state.backbone.spec, exc)
        raise ApiError(
            503, "the backbone's text tokenizer is not available yet to check the class names; retry shortly",
            {"Retry-After": "5"},
        ) from None


def check_class_texts(state: ServiceState, method: str, classes: list[str], cfg: dict[str, Any]) -> None:
    """422 when a class's text prompt would not fit the text encoder's context (it would be cut)
    or two classes' prompts make the same tokens; methods that build no text prompt pass."""
    from backbone import ConfigError
    from backbone.methods import check_class_texts as check

    try:
        check(method, classes, cfg, text_tokens(state))
        fits_backbone(state, method, cfg)
    except ConfigError as exc:
        raise ApiError(422, str(exc)) from None


def fits_backbone(state: ServiceState, method: str, cfg: dict[str, Any]) -> None:
    """The method's own check against the loaded backbone (a pixel frame wider than the image, a
    text method on a backbone without a text tower): ConfigError. Skipped while the backbone is
    still loading: the job runs the same check and fails with the reason."""
    from backbone.holder import BackboneNotReady
    from backbone.methods import get_method, parse_config

    try:
        bb = state.backbone.get()
    except BackboneNotReady:
        return
    get_method(method).module_cls.check_backbone(bb, parse_config(method, cfg))


def _stored_config(method: str, config: Any) -> dict[str, Any] | None:
    """A task's stored config if it still validates (else None: the run itself will say why)."""
    from backbone import ConfigError, validate_config

    try:
        return validate_config(method, config)
    except ConfigError:
        return None


# --------------------------------------------------------------------------- idempotency keys

_KEY_DOC = (
    "Optional: a key of yours (1-255 visible ASCII characters, a UUID say). The same key again "
    "within 24 h answers the first request's answer and creates nothing; with another request, 422."
)


def idempotency_fingerprint(
    state: ServiceState, key: str | None, method: str, path: str, fields: dict[str, Any], upload: UploadFile | None
) -> str | None:
    """The request's fingerprint when it carries an ``Idempotency-Key`` (422 for a malformed
    key); the dataset counts as its sha256."""
    if key is None:
        return None
    try:
        idempotency.check_key(key)
    except idempotency.InvalidIdempotencyKey as exc:
        raise ApiError(422, str(exc)) from None
    if upload is not None:
        upload.file.seek(0)
        fields = {**fields, "dataset": sha256_hex(upload.file.read(state.settings.max_upload_bytes + 1))}
        upload.file.seek(0)
    return idempotency.fingerprint(method, path, fields)


def replay(row: Any) -> JSONResponse:
    return JSONResponse(row.response, status_code=row.status_code, headers={"Idempotent-Replayed": "true"})


def remembered(state: ServiceState, s: Session, tenant_id: str, key: str | None, fp: str | None) -> JSONResponse | None:
    """The first answer to this key, replayed; None when the key is new (or absent)."""
    if key is None or fp is None:
        return None
    try:
        row = idempotency.lookup(s, tenant_id, key, fp, ttl_s=state.settings.idempotency_key_ttl)
    except idempotency.KeyReused as exc:
        raise ApiError(422, str(exc)) from None
    return replay(row) if row is not None else None


def remember_and_commit(
    state: ServiceState, s: Session, tenant_id: str, key: str | None, fp: str | None, task: Any
) -> JSONResponse | None:
    """Commit the task (or run) with the key's answer in the same transaction. When a
    concurrent request with the same key committed first, roll ours back (no second task)
    and return its answer instead."""
    if key is not None and fp is not None:
        body = task_public(task).model_dump(mode="json")
        try:
            idempotency.record(
                s, tenant_id, key, fp, status_code=202, response=body, task_id=task.id,
                ttl_s=state.settings.idempotency_key_ttl,
            )
        except IntegrityError:
            s.rollback()
            log.info("request with %s %r lost to a concurrent one; answering its result", idempotency.HEADER, key)
            answer = remembered(state, s, tenant_id, key, fp)
            if answer is None:  # pragma: no cover - the winner's row exists once it committed
                raise ApiError(503, "a concurrent request with the same Idempotency-Key is in progress; retry",
                               {"Retry-After": "1"}) from None
            return answer
    s.commit()
    return None


def get_own_task(s: Session, task_id: str, tenant: CurrentTenant) -> Any:
    task = repo.get_task(s, task_id, tenant_id=tenant.id)
    if task is None:
        raise ApiError(404, f"task {task_id} not found")
    return task


# --------------------------------------------------------------------------- routes


@router.post("", status_code=202, response_model=TaskPublic, responses={**_ERRORS, **_LIMITED, 413: {"model": ErrorOut}, 422: {"model": ErrorOut}})
def create_task(
    s: DbSession,
    name: str = Form(..., min_length=1, max_length=200, description="Task name."),
    method: str = Form(..., description="One of the registered methods: " + ", ".join(task_method_names()) + "."),
    dataset: UploadFile | None = File(None, description="Zip of class folders (required but for zeroshot)."),
    classes: str | None = Form(None, description='JSON list of class names (zeroshot only), e.g. ["cat", "dog"].'),
    config: str | None = Form(None, description="JSON object of method hyperparameters."),
    zero_shot_until_trained: bool = Form(
        False, description="Until the first version is published, classify answers with zero-shot predictions on "
        "the class names (`version` 0) instead of 409. Needs a backbone with a text tower.",
    ),
    retrain_after_samples: int | None = Form(
        None, ge=1, le=1_000_000, description="Request a run automatically once this many samples were added "
        "(POST /v1/tasks/{id}/samples, feedback) since the last run started; at most one run at a time. Omitted: never.",
    ),
    tenant: CurrentTenant = Depends(job_submitter),
    _fields: None = Depends(form_fields(
        "POST /v1/tasks", "name", "method", "dataset", "classes", "config", "zero_shot_until_trained",
        "retrain_after_samples",
    )),
    state: ServiceState = Depends(get_state),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description=_KEY_DOC),
) -> Any:
    """Create a task from a labelled dataset (or class names for zeroshot) and queue its tuning."""
    fp = idempotency_fingerprint(
        state, idempotency_key, "POST", "/v1/tasks",
        {"name": name, "method": method, "classes": classes, "config": config,
         "zero_shot_until_trained": zero_shot_until_trained,
         **({"retrain_after_samples": retrain_after_samples} if retrain_after_samples is not None else {})}, dataset,
    )
    if (answer := remembered(state, s, tenant.id, idempotency_key, fp)) is not None:
        return answer
    task_name = textinput.check_name("name", name)  # before anything is stored
    method = method.strip()
    cfg = parse_config(method, config)
    if retrain_after_samples is not None and not needs_dataset(method):
        raise ApiError(422, f"retrain_after_samples: method {method} is not tuned on images, so it takes no samples")
    if not needs_dataset(method):
        class_names = parse_classes(classes)
        check_class_texts(state, method, class_names, cfg)
        dataset_id = None
    else:
        if dataset is None:
            raise ApiError(422, f"dataset is required for method {method}: upload a zip of class folders")
        dataset_id, class_names = store_dataset(
            state, s, tenant.id, dataset, check=lambda names: check_class_texts(state, method, names, cfg)
        )
    task = repo.create_task(
        s, tenant_id=tenant.id, name=task_name, method=method, config=cfg, classes=class_names, dataset_id=dataset_id,
        zero_shot_until_trained=zero_shot_until_trained,
    )
    if retrain_after_samples is not None:
        from store.samples import set_retrain_after_samples

        set_retrain_after_samples(s, task.id, retrain_after_samples, tenant_id=tenant.id)
        s.refresh(task)
    if (answer := remember_and_commit(state, s, tenant.id, idempotency_key, fp, task)) is not None:
        return answer
    enqueue(state, task.id, task.attempt)
    return task_public(task)


@router.get("", response_model=TaskList, responses={401: _ERRORS[401], 422: {"model": ErrorOut}})
def list_tasks(
    s: DbSession,
    tenant: CurrentTenant = Depends(current_tenant),
    limit: int | None = Query(None, description="Tasks per page, 1 to 1000 (default 100)."),
    cursor: str | None = Query(None, description="The `next_cursor` of the previous page; omitted: the first page."),
    status: str | None = Query(
        None, description="Only tasks in this status (queued, running, ready, failed, cancelled; several: comma-separated)."
    ),
    method: str | None = Query(None, description="Only tasks of this method: " + ", ".join(task_method_names()) + "."),
    name_prefix: str | None = Query(None, description="Only tasks whose name starts with this (case-sensitive)."),
) -> TaskList:
    """The tenant's tasks, newest first, a page at a time (keyset: stable while tasks are
    added); each item is a summary (GET /v1/tasks/{id} has the rest). ``count``: all matching."""
    from api.schemas import task_summary
    from store import listing

    if method is not None and method.strip() and method.strip() not in task_method_names():
        raise ApiError(422, f"method: {method[:40]!r} is not a method; accepted: {', '.join(task_method_names())}")
    try:
        page = listing.task_page(
            s, tenant_id=tenant.id, limit=limit, cursor=cursor, status=status,
            method=method.strip() if method else None, name_prefix=name_prefix,
        )
    except listing.InvalidListing as exc:
        raise ApiError(422, str(exc)) from None
    extras = listing.page_extras(s, page.items)
    items = [
        task_summary(r, extras.configs.get(r.id), extras.warnings.get(r.dataset_id) if r.dataset_id else None)
        for r in page.items
    ]
    return TaskList(items=items, count=page.count, next_cursor=page.next_cursor)


@router.get("/{task_id}", response_model=TaskPublic, responses={**_ERRORS, 422: {"model": ErrorOut}})
def get_task(
    task_id: str,
    s: DbSession,
    tenant: CurrentTenant = Depends(current_tenant),
    include: str | None = Query(
        None, description="Heavy fields to add, comma-separated: history, confusion, per_class (in metrics). "
        "Without: history and confusion are null and metrics has no per_class."
    ),
) -> TaskPublic:
    from api.schemas import TASK_INCLUDES

    wanted = {p.strip() for p in (include or "").split(",") if p.strip()}
    unknown = sorted(wanted - set(TASK_INCLUDES))
    if unknown:
        raise ApiError(
            422, f"include: unknown field {unknown[0][:40]!r}; accepted: {', '.join(TASK_INCLUDES)} (comma-separated)"
        )
    return task_public(get_own_task(s, task_id, tenant), include=wanted)


@router.post(
    "/{task_id}/retrain", status_code=202, response_model=TaskPublic,
    responses={**_ERRORS, **_LIMITED, 409: {"model": ErrorOut}},
)
def retrain_task(
    s: DbSession,
    task_id: str,
    dataset: UploadFile | None = File(None, description="A new dataset zip; omitted: keep the current one."),
    config: str | None = Form(None, description="A new config JSON object; omitted: keep the current one."),
    tenant: CurrentTenant = Depends(job_submitter),
    _fields: None = Depends(form_fields("retrain", "dataset", "config", required=False)),
    state: ServiceState = Depends(get_state),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description=_KEY_DOC),
) -> Any:
    """Start a new tuning run; it becomes the next prompt version. A task that serves a
    version keeps serving it meanwhile. Also the way to retry a failed task."""
    fp = idempotency_fingerprint(
        state, idempotency_key, "POST", f"/v1/tasks/{task_id}/retrain", {"config": config}, dataset
    )
    if (answer := remembered(state, s, tenant.id, idempotency_key, fp)) is not None:
        return answer
    task = get_own_task(s, task_id, tenant)
    if task.run_status in ACTIVE_STATUSES:
        raise ApiError(409, f"task {task_id} already has a {task.run_status} run; cancel it or wait until it finishes")
    cfg = parse_config(task.method, config) if config is not None else None
    run_cfg = cfg if cfg is not None else _stored_config(task.method, task.config)

    def check(names: list[str]) -> None:
        if run_cfg is not None:
            check_class_texts(state, task.method, names, run_cfg)

    dataset_id = None
    if dataset is not None and not needs_dataset(task.method):
        raise ApiError(422, f"method {task.method} is not tuned on a dataset: retrain takes only config for it")
    if dataset is not None:
        dataset_id, _ = store_dataset(state, s, tenant.id, dataset, check=check)
    else:
        check(list(task.classes or []))
    updated = request_run(s, task_id, tenant_id=tenant.id, dataset_id=dataset_id, config=cfg)
    if (answer := remember_and_commit(state, s, tenant.id, idempotency_key, fp, updated)) is not None:
        return answer
    enqueue(state, updated.id, updated.attempt)
    return task_public(updated)


@router.post(
    "/{task_id}/cancel", status_code=202, response_model=TaskPublic, responses={**_ERRORS, 409: {"model": ErrorOut}}
)
def cancel_task(task_id: str, s: DbSession, tenant: CurrentTenant = Depends(current_tenant)) -> TaskPublic:
    """Cancel the task's current run: a queued run at once, a running one at its next step.
    409 when no run is queued or running (the detail names the task's state)."""
    return task_public(cancel_run(s, task_id, tenant_id=tenant.id))


@router.delete("/{task_id}", status_code=204, response_class=Response, responses=_ERRORS)
def delete_task(
    s: DbSession,
    task_id: str,
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
) -> Response:
    """Delete the task and its prompt objects; its dataset goes once no task uses it (garbage collector)."""
    delete_task_and_objects(state, s, task_id, tenant_id=tenant.id)
    return Response(status_code=204)


@router.get(
    "/{task_id}/prompt",
    response_class=Response,
    responses={**_ERRORS, 409: {"model": ErrorOut}, 200: {"content": {"application/octet-stream": {}}, "description": "safetensors"}},
)
def download_prompt(
    s: DbSession,
    task_id: str,
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
    version: int | None = Query(
        None, ge=0, le=2**31 - 1, description="A kept version (GET /v1/tasks/{id}/versions); default: the served one."
    ),
) -> Response:
    """The served prompt (or version ``version``) as safetensors; its header metadata holds
    method, backbone, classes, config and version. 404 for a version the task does not keep."""
    if version is not None:
        from api.routes.versions import no_such_version

        get_own_task(s, task_id, tenant)
        pv = repo.get_version(s, task_id, version, tenant_id=tenant.id)
        if pv is None:
            raise ApiError(404, no_such_version(s, task_id, version, tenant.id))
    else:
        pv = repo.get_served_version(s, task_id, tenant_id=tenant.id)
    if pv is None:
        task = get_own_task(s, task_id, tenant)
        raise ApiError(409, f"task {task_id} has no prompt yet (status {task.status})")
    data = state.objects.get(pv.object_key)
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{task_id}-v{pv.version}.safetensors"',
            "X-Prompt-Version": str(pv.version),
            "ETag": f'"{pv.sha256}"',
        },
    )
