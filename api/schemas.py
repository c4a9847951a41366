"""Request and response bodies, per resource: Create / Public / List (``{"items", "count"}``)."""

from __future__ import annotations

import datetime as dt
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
    count: int


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
    training: TrainingState | None = Field(
        None, description="A retrain in progress (or its outcome) while the task keeps serving `version`."
    )
    history: list[dict[str, Any]] | None = Field(None, description="Per-epoch loss and validation accuracy.")
    confusion: list[list[int]] | None = Field(None, description="Validation confusion matrix (rows = true class).")
    dataset_id: str | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="What the dataset upload ignored or dropped (duplicate images, empty folders); "
        "empty when nothing was, and for zeroshot.",
    )
    created_at: dt.datetime
    updated_at: dt.datetime


class TaskList(BaseModel):
    items: list[TaskPublic]
    count: int


def _fraction(value: Any) -> float:
    from store.textinput import as_fraction

    return as_fraction(value)


def _strings(value: Any) -> list[str]:
    return [v if isinstance(v, str) else str(v) for v in value] if isinstance(value, list) else []


def _served_config(task: Any) -> dict[str, Any]:
    """The config of the served version (a retrain's own config is under ``training``)."""
    config = task.served_config if hasattr(type(task), "served_config") else task.config
    return config if isinstance(config, dict) else {}


def task_public(task: Any) -> TaskPublic:
    """The task as the API shows it. Whatever is stored fits the model: JSON columns are read
    safe (``store.textinput.loads_stored``), and a value of the wrong shape shows as empty."""
    training = None
    run = task.run  # store.models.RunView: shown under ``training`` while it is a retrain's
    if run.is_retrain and run.status is not None:
        err = run.error
        training = TrainingState(
            status=str(run.status), progress=run.progress,
            error=err if isinstance(err, str) or err is None else str(err),
            config=run.config, dataset_id=run.dataset_id,
        )
    history = task.history if isinstance(task.history, list) and all(isinstance(h, dict) for h in task.history) else None
    confusion = task.confusion
    if not (isinstance(confusion, list) and all(
        isinstance(row, list) and all(isinstance(n, int) for n in row) for row in confusion
    )):
        confusion = None
    return TaskPublic(
        id=task.id,
        name=task.name,
        method=task.method,
        status=task.status,
        progress=_fraction(task.progress),
        classes=_strings(task.classes),
        config=_served_config(task),
        metrics=task.metrics if isinstance(task.metrics, dict) else None,
        error=task.error,
        version=task.version,
        training=training,
        history=history,
        confusion=confusion,
        dataset_id=task.served_dataset_id if hasattr(type(task), "served_dataset_id") else task.dataset_id,
        warnings=_strings(getattr(task, "dataset_warnings", None)),
        created_at=task.created_at,
        updated_at=task.updated_at,
    )


# --------------------------------------------------------------------------- classify


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Softmax probability over the task's classes.")


class ClassifyResponse(BaseModel):
    task_id: str
    version: int = Field(description="The prompt version that answered.")
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
