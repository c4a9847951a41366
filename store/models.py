"""SQLAlchemy 2 models: tenants, API keys, datasets, tasks, prompt versions.

Ids are uuid4 hex strings; timestamps are timezone-aware UTC.

Task status machine (docs/api.md): queued -> running -> ready | failed | cancelled.
A retrain of a task that already serves a version keeps ``status == "ready"`` and
tracks the new run in ``training`` = {"status", "progress", "error", "history"}; on success
``version`` += 1 and the served version switches in the same transaction. Readers see the
latest run in one shape whichever applies: ``Task.run`` (a ``RunView``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column, object_session, relationship

from store.db import Base, utcnow
from store.textinput import as_fraction

QUEUED = "queued"
RUNNING = "running"
READY = "ready"
FAILED = "failed"
CANCELLED = "cancelled"
TASK_STATUSES = (QUEUED, RUNNING, READY, FAILED, CANCELLED)
ACTIVE_STATUSES = (QUEUED, RUNNING)


@dataclasses.dataclass(frozen=True)
class RunView:
    """The task's latest run, in one shape whether it is the task's first run (state in the
    task's own ``status``/``progress``/``error``/``history``) or a retrain of a task that
    serves a version (state in ``training``). ``is_retrain``: a version is served, so the run
    (if any) is a retrain; ``status`` None then means no run since the version was published
    (its progress reads 1.0, done). ``config``/``dataset_id``: the inputs of that run."""

    status: str | None
    progress: float
    error: str | None
    history: list[Any] | None
    config: dict[str, Any]
    dataset_id: str | None
    is_retrain: bool

    @property
    def active(self) -> bool:
        """The run is queued or running."""
        return self.status in ACTIVE_STATUSES

    @classmethod
    def of(
        cls, *, status: str | None, progress: Any, error: str | None, history: Any, version: int | None,
        training: Any, config: Any = None, dataset_id: str | None = None,
    ) -> RunView:
        """The view of a task's columns (a ``Task`` or a row that selected them)."""
        cfg = dict(config) if isinstance(config, dict) else {}
        if version is None:
            return cls(status, as_fraction(progress), error, history if isinstance(history, list) else None,
                       cfg, dataset_id, False)
        t = training if isinstance(training, dict) else {}
        curve = t.get("history")
        return cls(
            t.get("status"), as_fraction(t.get("progress")) if t else 1.0, t.get("error"),
            curve if isinstance(curve, list) else None, cfg, dataset_id, True,
        )


def new_id() -> str:
    return uuid.uuid4().hex


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: Requests served for this tenant (dashboard counter; bumped by ``repo.count_request``).
    request_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_request_at: Mapped[dt.datetime | None]

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", cascade="all, delete-orphan")


class ApiKey(Base):
    """A tenant API key ``ps_<prefix>_<secret>``; only the sha256 hex of the full key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class Dataset(Base):
    """An uploaded dataset zip (content-addressed object ``datasets/{tenant_id}/{sha256}.zip``)."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    object_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    #: Class names in label order.
    classes: Mapped[list[Any]]
    #: Images per class name.
    counts: Mapped[dict[str, Any]]
    #: What the upload ignored or dropped (empty folders, duplicate images), for the task's
    #: ``warnings``; None for datasets recorded before warnings existed.
    warnings: Mapped[list[Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Task(Base):
    """A tuning task; ``dataset_id``/``config`` are the inputs of the latest requested run."""

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'ready', 'failed', 'cancelled')", name="status_valid"
        ),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        Index("ix_tasks_tenant_id_created_at", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Classes of the served version (or of the pending run before the first version).
    classes: Mapped[list[Any]] = mapped_column(default=list)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    progress: Mapped[float] = mapped_column(default=0.0)
    metrics: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    history: Mapped[list[Any] | None]
    confusion: Mapped[list[Any] | None]
    #: Prompt version being served; None before the first publish. Not always the newest: a
    #: tenant may serve any kept version (``repo.serve_version``).
    version: Mapped[int | None]
    #: Grows by one whenever the served prompt changes (a publish, a serve of another version),
    #: also when the version number goes back: the engine never answers with a prompt of a
    #: lower generation than one it has seen (``api.engine.cache``).
    serving_generation: Mapped[int] = mapped_column(default=0, server_default="0")
    #: The task's default classify threshold (labels scoring below it are left out); None: none.
    min_score: Mapped[float | None]
    #: Until its first version is published, classify answers with zero-shot predictions on the
    #: class names (``version`` 0) instead of 409 (opt-in: the contract's default is 409).
    zero_shot_until_trained: Mapped[bool] = mapped_column(default=False, server_default=false())
    #: State of a retrain run while a version is served: {"status", "progress", "error",
    #: "history"}; read it through ``run``.
    training: Mapped[dict[str, Any] | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    #: Run counter; a job carries the attempt it was queued for and is a no-op when stale.
    attempt: Mapped[int] = mapped_column(default=1)
    #: State of the latest run as a plain column, the one every conditional transition tests:
    #: ``status`` before the first version, ``training["status"]`` once one is served (None:
    #: a served task without a retrain run). Kept in step with those by ``store.repo`` alone.
    run_status: Mapped[str | None] = mapped_column(String(16), index=True)
    #: When the current run was (last) sent to a runner; the reconciler re-sends a run still
    #: queued ``requeue_queued_after_s`` later (``worker.reconcile``).
    queued_at: Mapped[dt.datetime | None]
    #: The job execution running the current run (``host:pid:random``) and until when its lease
    #: holds; the job renews it (heartbeat) and a claim by another owner waits until it expired.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None]
    #: How many times the reconciler re-queued the current run after its lease expired.
    requeues: Mapped[int] = mapped_column(default=0, server_default="0")
    #: The task's sample set (``Sample`` rows, ``store.samples``) holds its dataset's images:
    #: expanded from the zip lazily, by the first tuning job or the first samples call. False
    #: for tasks created before samples existed, and again after a retrain with a new dataset.
    samples_seeded: Mapped[bool] = mapped_column(default=False, server_default=false())
    #: Request a run automatically once this many samples were added since the last run took
    #: its snapshot (None: never); at most one run at a time (``store.samples``).
    retrain_after_samples: Mapped[int | None]
    #: Samples added since the current (or last) run took its snapshot of the sample set.
    samples_since_run: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    #: The dataset of the latest requested run (read-only; loaded on first access).
    dataset: Mapped[Dataset | None] = relationship(viewonly=True)
    #: The version being served (read-only; loaded on first access, or with selectinload).
    served_version: Mapped["PromptVersion | None"] = relationship(
        viewonly=True,
        primaryjoin="and_(PromptVersion.task_id == Task.id, PromptVersion.version == Task.version)",
        uselist=False,
    )

    @property
    def served_config(self) -> dict[str, Any]:
        """The config of the version being served; while no version is, for a version published
        before versions recorded it, or for a version of another method than the task's (a task
        of method ``auto``: its config is the search's; the chosen candidate's is the version's
        and in ``metrics.search``), the config of the latest requested run."""
        pv = self.served_version if self.version is not None else None
        if pv is None or not isinstance(pv.config, dict) or (pv.method is not None and pv.method != self.method):
            return dict(self.config or {})
        return dict(pv.config)

    @property
    def served_dataset_id(self) -> str | None:
        """The dataset of the version being served; as ``served_config``, the latest requested
        run's while no version is or the version predates the record."""
        pv = self.served_version if self.version is not None else None
        return pv.dataset_id if pv is not None and pv.config is not None else self.dataset_id

    @property
    def run(self) -> RunView:
        """The latest run, whichever column holds its state (``RunView``)."""
        return RunView.of(
            status=self.status, progress=self.progress, error=self.error, history=self.history,
            version=self.version, training=self.training, config=self.config, dataset_id=self.dataset_id,
        )

    @property
    def dataset_warnings(self) -> list[str]:
        """What the upload of this task's dataset ignored or dropped; [] without a dataset."""
        if self.dataset_id is None:
            return []
        ds = self.dataset
        if ds is not None and ds.id != self.dataset_id:  # dataset_id changed after it loaded
            session = object_session(self)
            ds = session.get(Dataset, self.dataset_id) if session is not None else None
        return [str(w) for w in (ds.warnings or [])] if ds is not None else []



class PromptVersion(Base):
    """A published prompt (object ``prompts/{tenant_id}/{task_id}/{sha256}.safetensors``)."""

    __tablename__ = "prompt_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    version: Mapped[int]
    object_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    fingerprint: Mapped[str] = mapped_column(String(256))
    #: The validated config of the run that published this version (None before 2026-12).
    config: Mapped[dict[str, Any] | None]
    #: The dataset that run trained on (None for zeroshot and before 2026-12; no foreign key:
    #: the dataset row may go once no task uses it, the id stays a record).
    dataset_id: Mapped[str | None] = mapped_column(String(32))
    #: The method of the prompt (a task's method may differ between versions with ``auto``).
    method: Mapped[str | None] = mapped_column(String(32))
    #: Class names in label order (None only for versions published before 2026-12-05: the
    #: prompt's safetensors header has them).
    classes: Mapped[list[Any] | None]
    #: Validation metrics of the run (val_accuracy, train_seconds, n_train, n_val, and with a
    #: validation split macro_f1 and per_class); None before 2026-12-05.
    metrics: Mapped[dict[str, Any] | None]
    #: Validation confusion matrix (rows: true class); None without a validation split.
    confusion: Mapped[list[Any] | None]
    #: Per-epoch loss and validation accuracy of the run.
    history: Mapped[list[Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: The snapshot of samples the run trained on (``store.samples.Snapshot``): sha256 over its
    #: sorted (label, image sha256) pairs, how many, and how many per class. None for zeroshot
    #: and for versions published before samples existed.
    samples_sha256: Mapped[str | None] = mapped_column(String(64))
    n_samples: Mapped[int | None]
    sample_counts: Mapped[dict[str, Any] | None]


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` a tenant sent with a job-creating request (``POST /v1/tasks``,
    ``retrain``) and the answer it got, so that a retry with the same key, on any replica, gets
    that answer instead of a second task (``store.idempotency``). Written in the transaction
    that creates the task or run; forgotten after ``idempotency_key_ttl``."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    #: sha256 hex of the request (method, path and the fields that decide what it creates).
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int]
    response: Mapped[dict[str, Any]]
    #: The task the request created or retrained (no foreign key: the answer outlives a delete).
    task_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class TaskEvent(Base):
    """One thing that happened to a task (``store.events``): created, queued, started, epoch,
    published, served, failed, cancelled, evaluation_queued, evaluated, ... ``id`` grows with
    time, so it orders the events and is the Server-Sent Events id a client resumes from."""

    __tablename__ = "task_events"
    __table_args__ = (Index("ix_task_events_task_id_id", "task_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


EVALUATION_STATUSES = (QUEUED, RUNNING, READY, FAILED)


class Evaluation(Base):
    """An evaluation of one prompt version on a labelled zip (``POST /v1/tasks/{id}/evaluate``):
    the zip is stored under ``evaluations/{tenant}/{task}/{id}.zip`` until the job ran; the
    result (``store.evaluation`` metrics) stays with the version it evaluated."""

    __tablename__ = "evaluations"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'ready', 'failed')", name="status_valid"),
        Index("ix_evaluations_task_id_created_at", "task_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    #: The prompt version evaluated.
    version: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    #: The uploaded zip (None once the job is done with it and deleted it).
    object_key: Mapped[str | None] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    #: What was asked: {"top_k", "precision"} (the target precision of the thresholds).
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    #: As a task's run: the job execution holding it and until when (``worker.evaluate``).
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]


SAMPLE_SOURCES = ("dataset", "upload", "feedback")


class Sample(Base):
    """One labelled image of a task's sample set (``store.samples``): its original bytes are the
    object ``object_key`` (``samples/{tenant_id}/{sha256}``, content-addressed and shared by the
    tenant's tasks) or, for a sample of the task's dataset, the zip member ``entry`` of the
    dataset's own object; ``pixels`` identifies the decoded picture (one label per picture and
    task: a copy is counted once). ``source``: ``dataset`` (expanded from the task's zip),
    ``upload`` (POST samples) or ``feedback`` (a kept prediction labelled by the tenant). A run
    trains on the snapshot of its task's samples, in the order (created_at, ordinal, id)."""

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("task_id", "pixels"),
        CheckConstraint("source IN ('dataset', 'upload', 'feedback')", name="source_valid"),
        Index("ix_samples_task_id_created_at", "task_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    #: The class name (the rules of class names, ``store.textinput.check_name``).
    label: Mapped[str] = mapped_column(String(1000))
    object_key: Mapped[str] = mapped_column(String(512))
    #: The member of the zip ``object_key`` holding the image (a ``dataset`` sample: the task's
    #: dataset zip, kept as long as its dataset row); None: the object is the image.
    entry: Mapped[str | None] = mapped_column(String(1024))
    #: sha256 hex of the original bytes (the object's name for an uploaded image).
    sha256: Mapped[str] = mapped_column(String(64))
    #: sha256 hex of the decoded pixels (``store.archive.pixel_digest``): what makes two files
    #: the same picture.
    pixels: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))
    #: Position within the request (or the dataset) that added it: orders samples of one instant.
    ordinal: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Prediction(Base):
    """An image classified with ``keep=true``, kept until ``expires_at`` under
    ``predictions/{tenant_id}/{task_id}/{id}`` so that feedback can turn it into a sample. The
    row outlives its image (``object_key`` None once swept) so that a late feedback is told it
    expired; ``sample_id``: the sample a feedback made of it."""

    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_task_id_created_at", "task_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    object_key: Mapped[str | None] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    #: The prompt version that answered (0: zero-shot before the first version).
    version: Mapped[int]
    #: The best label and its score (None when the task had no class).
    label: Mapped[str | None] = mapped_column(String(1000))
    score: Mapped[float | None]
    sample_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)
