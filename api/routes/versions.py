"""Serving a task (tenant): its prompt versions, which one is served, its default threshold.

- ``GET /v1/tasks/{id}/versions``: every kept version, newest first, with which one is served;
- ``GET /v1/tasks/{id}/versions/{n}``: one version's whole record (per-class validation
  metrics, confusion matrix, per-epoch history);
- ``POST /v1/tasks/{id}/versions/{n}/serve``: serve version n (a rollback or a roll-forward),
  effective at once in every API replica (``api.services.serve_version``);
- ``PATCH /v1/tasks/{id}``: the task's name and default classify threshold ``min_score``.

Downloading a version's prompt is ``GET /v1/tasks/{id}/prompt?version=n`` (``api.routes.tasks``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CurrentTenant, DbSession, current_tenant, get_state
from api.errors import ApiError
from api.jsonroute import CheckedJSONRoute
from api.schemas import ErrorOut, TaskPublic, task_public
from api.services import serve_version
from api.state import ServiceState
from store import repo, textinput
from store.models import PromptVersion

router = APIRouter(prefix="/v1/tasks", tags=["versions"], route_class=CheckedJSONRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key."},
    404: {"model": ErrorOut, "description": "Unknown task (or another tenant's), or no such version."},
}

#: Keys of a version's metrics that are lists or objects (shown only in the full record).
HEAVY_METRICS = ("per_class",)


class VersionSummary(BaseModel):
    """A prompt version as listed: what it is, how it did on validation, where it came from."""

    version: int
    served: bool = Field(description="This version is the one classify answers with.")
    created_at: dt.datetime
    method: str
    config: dict[str, Any] = Field(description="The validated config of the run that published it.")
    classes: list[str] | None = Field(description="Class names in label order (null for versions older than 2026-12-05: the prompt's header has them).")
    size: int = Field(description="Bytes of the prompt (safetensors).")
    sha256: str
    fingerprint: str = Field(description="The backbone it was tuned on: spec and weights hash; served only on that one.")
    servable: bool = Field(description="Made on the backbone this service runs (else serving it is refused with 409).")
    dataset_id: str | None = None
    metrics: dict[str, Any] | None = Field(None, description="Validation metrics (scalars: val_accuracy, macro_f1, train_seconds, n_train, n_val, ...).")
    samples_sha256: str | None = Field(None, description="The snapshot of samples its run trained on: sha256 of the lines 'label<TAB>sha256<LF>' of those samples, sorted (GET /v1/tasks/{id}/samples gives the current set's); null for zeroshot and versions older than samples.")
    n_samples: int | None = Field(None, description="How many samples its run trained on.")
    sample_counts: dict[str, int] | None = Field(None, description="Samples per class its run trained on.")


class VersionPublic(VersionSummary):
    """A version's whole record."""

    per_class: list[dict[str, Any]] | None = Field(None, description="Validation precision, recall, F1 and support per class; null without a validation split.")
    confusion: list[list[int]] | None = Field(None, description="Validation confusion matrix (rows: true class, columns: predicted, in `classes` order); null without a validation split.")
    history: list[dict[str, Any]] | None = Field(None, description="Per-epoch loss and validation accuracy of its run.")


class VersionList(BaseModel):
    items: list[VersionSummary]
    count: int
    served_version: int | None = Field(description="The version classify answers with (null before the first).")
    max_versions: int = Field(description="Versions kept per task (PROMPTSTORE_MAX_VERSIONS_PER_TASK; 0: all); older ones beyond it are pruned, never the served one.")


class TaskPatch(BaseModel):
    """``PATCH /v1/tasks/{id}``: the fields to change; absent ones are kept. Strict JSON types:
    ``true`` is no number and ``"0.6"`` no threshold (a 422 names the field)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(None, min_length=1, max_length=200, description="A new task name.")
    min_score: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="The default classify threshold in [0, 1] (labels scoring below it are left out); null clears it.",
    )
    zero_shot_until_trained: bool | None = Field(
        None, description="Answer classify with zero-shot predictions (version 0) until the first version is published.",
    )
    retrain_after_samples: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Request a run automatically once this many samples were added since the last run started "
        "(at most one run at a time); null turns it off.",
    )


def _backbone_fingerprint(state: ServiceState) -> str | None:
    from backbone.holder import BackboneNotReady

    try:
        return state.backbone.get().fingerprint
    except BackboneNotReady:
        return None


def _summary(pv: PromptVersion, task: Any, fingerprint: str | None, cls: type[VersionSummary] = VersionSummary) -> Any:
    metrics = pv.metrics if isinstance(pv.metrics, dict) else None
    values: dict[str, Any] = dict(
        version=pv.version,
        served=pv.version == task.version,
        created_at=pv.created_at,
        method=pv.method or task.method,
        config=pv.config if isinstance(pv.config, dict) else {},
        classes=[str(c) for c in pv.classes] if isinstance(pv.classes, list) else None,
        size=pv.size,
        sha256=pv.sha256,
        fingerprint=pv.fingerprint,
        servable=fingerprint is None or pv.fingerprint == fingerprint,
        dataset_id=pv.dataset_id,
        metrics={k: v for k, v in metrics.items() if k not in HEAVY_METRICS} if metrics is not None else None,
        samples_sha256=pv.samples_sha256,
        n_samples=pv.n_samples,
        sample_counts={str(k): int(v) for k, v in pv.sample_counts.items() if isinstance(v, int)}
        if isinstance(pv.sample_counts, dict) else None,
    )
    if cls is VersionPublic:
        per_class = metrics.get("per_class") if metrics is not None else None
        confusion = pv.confusion
        ok_matrix = isinstance(confusion, list) and all(
            isinstance(r, list) and all(isinstance(n, int) for n in r) for r in confusion
        )
        values.update(
            per_class=per_class if isinstance(per_class, list) else None,
            confusion=confusion if ok_matrix else None,
            history=pv.history if isinstance(pv.history, list) and all(isinstance(h, dict) for h in pv.history) else None,
        )
    return cls(**values)


def _own_task(s: DbSession, task_id: str, tenant: CurrentTenant) -> Any:
    task = repo.get_task(s, task_id, tenant_id=tenant.id)
    if task is None:
        raise ApiError(404, f"task {task_id} not found")
    return task


_VERSION = Path(..., ge=0, le=2**31 - 1, description="A version number (1, 2, ...).")


@router.get("/{task_id}/versions", response_model=VersionList, responses=_ERRORS)
def list_versions(
    task_id: str, s: DbSession, tenant: CurrentTenant = Depends(current_tenant), state: ServiceState = Depends(get_state)
) -> VersionList:
    """Every kept prompt version of the task, newest first, and which one is served."""
    task = _own_task(s, task_id, tenant)
    fingerprint = _backbone_fingerprint(state)
    items = [_summary(pv, task, fingerprint) for pv in reversed(repo.list_versions(s, task_id, tenant_id=tenant.id))]
    return VersionList(
        items=items, count=len(items), served_version=task.version, max_versions=state.settings.max_versions_per_task
    )


@router.get("/{task_id}/versions/{version}", response_model=VersionPublic, responses=_ERRORS)
def get_version(
    task_id: str,
    s: DbSession,
    version: int = _VERSION,
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
) -> VersionPublic:
    """One version's whole record: validation metrics per class, confusion matrix, history."""
    task = _own_task(s, task_id, tenant)
    pv = repo.get_version(s, task_id, version, tenant_id=tenant.id)
    if pv is None:
        raise ApiError(404, no_such_version(s, task_id, version, tenant.id))
    return _summary(pv, task, _backbone_fingerprint(state), VersionPublic)


def no_such_version(s: DbSession, task_id: str, version: int, tenant_id: str) -> str:
    """The 404 detail for a version the task does not have, naming the ones it keeps."""
    return repo.no_such_version(task_id, version, [pv.version for pv in repo.list_versions(s, task_id, tenant_id=tenant_id)])


@router.post(
    "/{task_id}/versions/{version}/serve",
    response_model=TaskPublic,
    responses={
        **_ERRORS,
        409: {"model": ErrorOut, "description": "Made on another backbone, or the served version changed meanwhile."},
        503: {"model": ErrorOut, "description": "The backbone is still loading (see Retry-After)."},
    },
)
def serve(
    task_id: str,
    s: DbSession,
    version: int = _VERSION,
    tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
) -> TaskPublic:
    """Serve version ``version`` from now on (a rollback or a roll-forward): every classify
    answered after this returns, in every API replica, comes from it; none from the version
    served before. A retrain in progress goes on, and its version is served when it publishes."""
    task = serve_version(state, s, task_id, version, tenant_id=tenant.id)
    return task_public(task)


@router.patch(
    "/{task_id}",
    response_model=TaskPublic,
    responses={**_ERRORS, 422: {"model": ErrorOut, "description": "An unknown field, a name breaking the name rules, or min_score outside [0, 1]."}},
)
def patch_task(
    task_id: str, body: TaskPatch, s: DbSession, tenant: CurrentTenant = Depends(current_tenant),
    state: ServiceState = Depends(get_state),
) -> TaskPublic:
    """Change the task's name, its default classify threshold ``min_score`` (null clears it),
    whether it answers with zero-shot predictions until its first version, or its automatic
    retrain threshold ``retrain_after_samples`` (null: off). Fields left out are kept."""
    task = _own_task(s, task_id, tenant)
    sent = body.model_fields_set
    if "name" in sent:
        if body.name is None:
            raise ApiError(422, "name: a task needs a name; send a non-empty string")
        try:
            task.name = textinput.check_name("name", body.name)
        except textinput.InputError as exc:
            raise ApiError(422, exc.message) from None
        s.flush()
    if "zero_shot_until_trained" in sent:
        if body.zero_shot_until_trained is None:
            raise ApiError(422, "zero_shot_until_trained: send true or false")
        task.zero_shot_until_trained = body.zero_shot_until_trained
        s.flush()
    if "min_score" in sent:
        task = repo.set_min_score(s, task_id, body.min_score, tenant_id=tenant.id)
        if task is None:
            raise ApiError(404, f"task {task_id} not found")
    if "retrain_after_samples" in sent:
        from store.samples import set_retrain_after_samples
        from backbone.methods import get_method

        if body.retrain_after_samples is not None and not get_method(task.method).needs_dataset:
            raise ApiError(422, f"retrain_after_samples: method {task.method} is not tuned on images and takes no samples")
        set_retrain_after_samples(s, task_id, body.retrain_after_samples, tenant_id=tenant.id)
    s.commit()
    if "retrain_after_samples" in sent and body.retrain_after_samples is not None:
        from api.routes.samples import auto_retrain

        auto_retrain(state, task_id, tenant.id)  # already that many samples added: the run starts now
    task = repo.get_task(s, task_id, tenant_id=tenant.id)
    if task is None:  # deleted meanwhile
        raise ApiError(404, f"task {task_id} not found")
    s.refresh(task)  # as committed now (an automatic run may have started), not as this session last read it
    return task_public(task)
