"""Request and response bodies, per resource: Create / Public / List (``{"items", "count"}``, and
``next_cursor`` for the paged lists of tasks and tenants: ``store.listing``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --------------------------------------------------------------------------- tenants


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is said, not dropped

    name: str = Field(min_length=1, max_length=200, description="Unique tenant name.")


class TenantCreated(_Out):
    id: str
    name: str
    api_key: str = Field(description="Shown only here; the service stores only its hash.")


class TenantPublic(_Out):
    id: str
    name: str
    created_at: dt.datetime
    task_count: int = 0
    request_count: int = 0
    last_request_at: dt.datetime | None = None


class TenantList(BaseModel):
    items: list[TenantPublic]
    count: int = Field(description="Tenants matching the filters, on all pages.")
    next_cursor: str | None = Field(
        None, description="Pass it as `cursor` for the next page (opaque); null on the last page."
    )


# --------------------------------------------------------------------------- tasks


class TrainingState(BaseModel):
    """The state of a retrain of a task that keeps serving its current version."""

    status: str
    progress: float
    error: str | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="The run's config (validated, defaults filled).")
    dataset_id: str | None = Field(None, description="The run's dataset (null for zeroshot).")


class TaskPublic(_Out):
    id: str
    name: str
    method: str
    status: str = Field(description="queued | running | ready | failed | cancelled")
    progress: float = Field(description="Fraction of the current run done, in [0, 1].")
    classes: list[str]
    config: dict[str, Any] = Field(
        description="The served version's config (validated, defaults filled); before the first version, "
        "the pending run's. A retrain's own config is under `training`."
    )
    metrics: dict[str, Any] | None = Field(
        None, description="val_accuracy, train_seconds, n_train, n_val, ... once ready."
    )
    error: str | None = Field(None, description="Why the task failed; null unless failed.")
    version: int | None = Field(None, description="Prompt version being served; null before the first.")
    min_score: float | None = Field(
        None, description="The default classify threshold (PATCH /v1/tasks/{id}); null: none."
    )
    zero_shot_until_trained: bool = Field(
        False, description="Classify answers with zero-shot predictions (version 0) until the first version."
    )
    retrain_after_samples: int | None = Field(
        None, description="A run starts by itself once this many samples were added since the last one; null: off."
    )
    samples_since_run: int = Field(0, description="Samples added since the latest run took its snapshot.")
    training: TrainingState | None = Field(
        None, description="A retrain in progress (or its outcome) while the task keeps serving `version`."
    )
    history: list[dict[str, Any]] | None = Field(
        None, description="Per-epoch loss and validation accuracy; only with `include=history` (else null). "
        "Also GET /v1/tasks/{id}/history."
    )
    confusion: list[list[int]] | None = Field(
        None, description="Validation confusion matrix (rows = true class); only with `include=confusion` (else "
        "null; null too without a validation split). Also GET /v1/tasks/{id}/confusion."
    )
    dataset_id: str | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="What the dataset upload ignored or dropped (duplicate images, empty folders); "
        "empty when nothing was, and for zeroshot.",
    )
    created_at: dt.datetime
    updated_at: dt.datetime


class TaskSummary(_Out):
    """A task in a list: the cheap fields of ``TaskPublic`` (no training, history or confusion;
    metrics without per-class entries)."""

    id: str
    name: str
    method: str
    config: dict[str, Any] = Field(
        default_factory=dict, description="The served version's config (before the first version: the pending run's)."
    )
    warnings: list[str] = Field(
        default_factory=list, description="What the dataset upload ignored or dropped (as on the task)."
    )
    status: str = Field(description="queued | running | ready | failed | cancelled")
    progress: float = Field(description="Fraction of the current run done, in [0, 1].")
    classes: list[str]
    n_classes: int = Field(description="len(classes).")
    metrics: dict[str, Any] | None = Field(
        None, description="The scalar metrics (val_accuracy, train_seconds, n_train, n_val, ...) once ready."
    )
    error: str | None = None
    version: int | None = None
    created_at: dt.datetime
    updated_at: dt.datetime


class TaskList(BaseModel):
    items: list[TaskSummary] = Field(description="Newest first.")
    count: int = Field(description="Tasks matching the filters, on all pages.")
    next_cursor: str | None = Field(
        None, description="Pass it as `cursor` for the next page (opaque); null on the last page."
    )


#: What ``include=`` may add to a task (``task_public``).
TASK_INCLUDES = ("history", "confusion", "per_class")


def _fraction(value: Any) -> float:
    from store.textinput import as_fraction

    return as_fraction(value)


def _strings(value: Any) -> list[str]:
    return [v if isinstance(v, str) else str(v) for v in value] if isinstance(value, list) else []


def _served_config(task: Any) -> dict[str, Any]:
    """The config of the served version (a retrain's own config is under ``training``)."""
    config = task.served_config if hasattr(type(task), "served_config") else task.config
    return config if isinstance(config, dict) else {}


def _metrics(value: Any, *, per_class: bool = False, scalars_only: bool = False) -> dict[str, Any] | None:
    """Stored metrics as shown: ``per_class`` only when asked; ``scalars_only``: no list or object."""
    if not isinstance(value, dict):
        return None
    if scalars_only:
        return {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
    return value if per_class or "per_class" not in value else {k: v for k, v in value.items() if k != "per_class"}


def history_of(value: Any) -> list[dict[str, Any]] | None:
    """A stored per-epoch history as shown (None unless a list of objects)."""
    return value if isinstance(value, list) and all(isinstance(h, dict) for h in value) else None


def confusion_of(value: Any) -> list[list[int]] | None:
    """A stored confusion matrix as shown (None unless a list of lists of ints)."""
    if isinstance(value, list) and all(
        isinstance(row, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in row) for row in value
    ):
        return value
    return None


def task_summary(row: Any, served_config: dict[str, Any] | None = None, warnings: Any = None) -> TaskSummary:
    """A list item from a task or a row of ``store.listing.TASK_ROW``; read safe as ``task_public``.
    ``served_config``: the served version's config; without, the row's own (the pending run's).
    ``warnings``: its dataset's (``store.listing.page_extras``)."""
    classes = _strings(row.classes)
    config = served_config if isinstance(served_config, dict) else getattr(row, "config", None)
    return TaskSummary(
        id=row.id,
        name=row.name,
        method=row.method,
        config=config if isinstance(config, dict) else {},
        warnings=_strings(warnings),
        status=row.status,
        progress=_fraction(row.progress),
        classes=classes,
        n_classes=len(classes),
        metrics=_metrics(row.metrics, scalars_only=True),
        error=row.error,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def task_public(task: Any, include: Collection[str] = ()) -> TaskPublic:
    """The task as the API shows it. Whatever is stored fits the model: JSON columns are read
    safe (``store.textinput.loads_stored``), and a value of the wrong shape shows as empty.
    The heavy fields (``TASK_INCLUDES``) only when in ``include``: ``history`` and
    ``confusion`` are null otherwise and ``metrics`` has no ``per_class``."""
    training = None
    run = task.run  # store.models.RunView: shown under ``training`` while it is a retrain's
    if run.is_retrain and run.status is not None:
        err = run.error
        training = TrainingState(
            status=str(run.status), progress=run.progress,
            error=err if isinstance(err, str) or err is None else str(err),
            config=run.config, dataset_id=run.dataset_id,
        )
    history = history_of(task.history) if "history" in include else None
    confusion = confusion_of(task.confusion) if "confusion" in include else None
    return TaskPublic(
        id=task.id,
        name=task.name,
        method=task.method,
        status=task.status,
        progress=_fraction(task.progress),
        classes=_strings(task.classes),
        config=_served_config(task),
        metrics=_metrics(task.metrics, per_class="per_class" in include),
        error=task.error,
        version=task.version,
        min_score=getattr(task, "min_score", None),
        zero_shot_until_trained=bool(getattr(task, "zero_shot_until_trained", False)),
        retrain_after_samples=getattr(task, "retrain_after_samples", None),
        samples_since_run=int(getattr(task, "samples_since_run", 0) or 0),
        training=training,
        history=history,
        confusion=confusion,
        dataset_id=task.served_dataset_id if hasattr(type(task), "served_dataset_id") else task.dataset_id,
        warnings=_strings(getattr(task, "dataset_warnings", None)),
        created_at=task.created_at,
        updated_at=task.updated_at,
    )


# --------------------------------------------------------------------------- task parts and events


class RunHistory(BaseModel):
    """The latest run while it is not the served version's: queued, running, failed or cancelled."""

    status: str = Field(description="queued | running | failed | cancelled")
    progress: float
    error: str | None = None
    history: list[dict[str, Any]] | None = Field(None, description="Its epochs so far.")


class TaskHistory(BaseModel):
    task_id: str
    version: int | None = Field(description="The served version; null before the first.")
    history: list[dict[str, Any]] | None = Field(
        description="The served version's per-epoch history (epoch, loss, val_accuracy, ...); null before the "
        "first version."
    )
    run: RunHistory | None = Field(
        None, description="The latest run when it is not the served version's (the first run before it publishes, "
        "or a retrain), with its own history; null otherwise."
    )


class TaskConfusion(BaseModel):
    task_id: str
    version: int | None = Field(description="The served version; null before the first.")
    classes: list[str] = Field(description="Labels of the rows (true class) and columns (predicted), in order.")
    matrix: list[list[int]] | None = Field(
        description="The validation confusion matrix; null without a validation split or before the first version."
    )
    per_class: list[dict[str, Any]] | None = Field(
        None, description="Per-class precision, recall, f1 and support on the validation split, when measured."
    )


class EventOut(_Out):
    id: int = Field(description="Grows with time; resume after it with `after` or `Last-Event-ID`.")
    kind: str = Field(
        description="created | queued | started | epoch | published | served | failed | cancel_requested | "
        "cancelled | requeued | evaluation_queued | evaluated | min_score"
    )
    data: dict[str, Any]
    created_at: dt.datetime


class EventList(BaseModel):
    items: list[EventOut] = Field(description="Oldest first.")
    next_after: int = Field(
        description="Pass it as `after` for what follows (the last item's id; `after` itself when none)."
    )


def event_out(event: Any) -> EventOut:
    data = event.data if isinstance(event.data, dict) else {}
    return EventOut(id=event.id, kind=str(event.kind), data=data, created_at=event.created_at)


# --------------------------------------------------------------------------- classify


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Softmax probability over the task's classes.")


class ClassifyResponse(BaseModel):
    task_id: str
    version: int = Field(description="The prompt version that answered (0: zero-shot before the first version).")
    zero_shot: bool = Field(
        False, description="True when the task has no version yet and zero-shot predictions on its class names "
        "answered (`version` 0; only for tasks created with `zero_shot_until_trained`).",
    )
    min_score: float | None = Field(
        None, description="The threshold applied (the request's `min_score`, else the task's default; null: none)."
    )
    predictions: list[list[Prediction]] = Field(
        description="One list per image, in order; best first. With a `min_score`, only the labels scoring at "
        "least that: an empty list means none of the classes reached it."
    )


# --------------------------------------------------------------------------- errors


class ErrorOut(BaseModel):
    detail: str
