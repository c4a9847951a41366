"""The tuning job: one body, run by Celery (``worker.tasks``) and by the in-process
runner of ``promptstore serve`` (``worker.dispatch.ThreadDispatcher``).

``run_tune_job(task_id, attempt, settings=...)`` receives ids only. It

1. claims run ``attempt`` of the task (a stale, finished or deleted run is a no-op, so a
   duplicate delivery does nothing);
2. reads the dataset zip from the object store and decodes it with ``store.archive``
   (the same checks as at upload), preprocessing each image with the backbone;
3. tunes through ``backbone.tune`` on the process's one backbone, writing progress to the
   database at most every ``PROGRESS_INTERVAL_S`` and at every epoch, and stopping when a
   cancel is requested (read from the database, throttled the same way);
4. publishes the prompt: the object under its content-addressed key first, then the
   version row and the task switch in one transaction (``store.publish``).

Errors: a transient infrastructure error (database or object store unreachable, ...) is
re-raised as ``TransientJobError`` so the caller retries the job; anything else fails the
run with a readable reason (never a traceback) on the task.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.exceptions
import sqlalchemy.exc
import urllib3.exceptions

from store import logcontext, repo
from store.announce import announce_version
from store.archive import ArchiveLimits, DatasetError, iter_archive_images
from store.db import session_scope
from store.objects import InvalidKey, ObjectNotFound, ObjectStoreError
from store.publish import publish_prompt
from worker import runtime

if TYPE_CHECKING:
    from store.settings import Settings

log = logging.getLogger("promptstore.worker")

#: Seconds between two progress writes (and two cancel checks) to the database.
PROGRESS_INTERVAL_S = 0.5

#: Errors worth retrying the whole job for: the infrastructure was briefly unreachable.
#: Everything else is a fault of the input or of the code and fails the run at once.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    urllib3.exceptions.MaxRetryError,
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)


class TransientJobError(Exception):
    """The job hit a transient error (see ``TRANSIENT_ERRORS``); retry it later."""


class JobInterrupted(Exception):
    """The process is shutting down; the run stays ``running`` and is picked up again."""


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from or during) is transient.

    The object store wraps client errors (``raise ... from None``) but the original stays
    in ``__context__``, so an unreachable S3 endpoint counts while AccessDenied does not.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ObjectNotFound, InvalidKey)):
            return False
        if isinstance(cur, TRANSIENT_ERRORS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@dataclass
class _RunInput:
    tenant_id: str
    method: str
    config: dict[str, Any]
    classes: list[str]
    dataset_key: str | None
    next_version: int


def run_tune_job(
    task_id: str,
    attempt: int,
    *,
    settings: "Settings",
    stop_event: threading.Event | None = None,
    on_published: Callable[[str, int], None] | None = None,
) -> str:
    """Run tuning attempt ``attempt`` of task ``task_id``; returns what happened
    (``"published"``, ``"skipped"``, ``"cancelled"``, ``"failed"``).

    ``on_published(task_id, version)`` is called after a version is published (the
    in-process runner tells its own inference engine). Raises ``TransientJobError`` for
    errors worth a retry, ``JobInterrupted`` when
    ``stop_event`` is set (process shutting down).
    """
    try:
        with logcontext.bind(task_id=task_id):  # every log line of the job carries its ids
            return _run(task_id, attempt, settings, stop_event, on_published)
    except (TransientJobError, JobInterrupted):
        raise
    except Exception as exc:
        if is_transient(exc):
            log.warning("task %s attempt %s: transient error, will retry: %s", task_id, attempt, _brief(exc))
            raise TransientJobError(f"{type(exc).__name__}: {_brief(exc)}") from exc
        raise


def _run(
    task_id: str,
    attempt: int,
    settings: "Settings",
    stop_event: threading.Event | None,
    on_published: Callable[[str, int], None] | None = None,
) -> str:
    sm = runtime.get_sessionmaker(settings.database_url)
    with session_scope(sm) as s:
        task = repo.claim_run(s, task_id, attempt)
        if task is None:
            log.info("task %s attempt %s: nothing to do (finished, stale or deleted)", task_id, attempt)
            return "skipped"
        logcontext.set_ids(tenant_id=task.tenant_id)
        dataset_key = None
        if task.dataset_id is not None:
            ds = repo.get_dataset(s, task.dataset_id, tenant_id=task.tenant_id)
            dataset_key = ds.object_key if ds is not None else None
        run = _RunInput(
            tenant_id=task.tenant_id,
            method=task.method,
            config=dict(task.config or {}),
            classes=list(task.classes or []),
            dataset_key=dataset_key,
            next_version=(task.version or 0) + 1,
        )
    log.info("task %s attempt %s: tuning %s", task_id, attempt, run.method)

    try:
        return _tune_and_publish(task_id, attempt, run, settings, sm, stop_event, on_published)
    except (TransientJobError, JobInterrupted):
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        reason = failure_reason(exc)
        if reason is None:
            log.exception("task %s attempt %s: tuning failed", task_id, attempt)
            reason = f"tuning failed: internal error ({type(exc).__name__}); the service log has the details"
        else:
            log.info("task %s attempt %s: failed: %s", task_id, attempt, reason)
        with session_scope(sm) as s:
            repo.fail_run(s, task_id, attempt, error=reason)
        return "failed"


def failure_reason(exc: BaseException) -> str | None:
    """A tenant-facing reason for an expected failure, or None for an unexpected one."""
    from backbone import BackboneError, ConfigError, PromptFormatError, PromptMismatch
    from backbone.errors import DivergedError, NonFinitePrompt

    if isinstance(exc, DatasetError):
        return f"invalid dataset: {exc}"
    if isinstance(exc, (DivergedError, NonFinitePrompt)):  # the message says what diverged and why
        return str(exc)
    if isinstance(exc, ConfigError):
        return f"invalid config: {exc}"
    if isinstance(exc, ObjectNotFound):
        return "the task's dataset is missing from the object store; upload it again with retrain"
    if isinstance(exc, BackboneError):
        return "the backbone could not be loaded; the service operator must fix PROMPTSTORE_BACKBONE"
    if isinstance(exc, (PromptFormatError, PromptMismatch)):
        return f"prompt error: {exc}"
    if isinstance(exc, ObjectStoreError):
        return "the object store refused the request; the service log has the details"
    return None


def _tune_and_publish(
    task_id: str,
    attempt: int,
    run: _RunInput,
    settings: "Settings",
    sm: Any,
    stop_event: threading.Event | None,
    on_published: Callable[[str, int], None] | None = None,
) -> str:
    import torch

    from backbone import Cancelled, tune, validate_config

    objects = runtime.get_object_store(settings)
    backbone = runtime.get_backbone(settings.backbone, settings.device)
    config = validate_config(run.method, run.config)
    monitor = _Monitor(sm, task_id, attempt, stop_event)

    images = labels = None
    classes = run.classes
    if run.dataset_key is not None:
        data = objects.get(run.dataset_key)
        manifest, decoded = iter_archive_images(data, ArchiveLimits.from_settings(settings))
        del data
        tensors = []
        label_list = []
        for img, label in decoded:
            tensors.append(backbone.preprocess(img))  # (3, S, S)
            img.close()
            label_list.append(label)
            if len(tensors) % 32 == 0 and monitor.should_cancel():
                decoded.close()  # type: ignore[attr-defined]
                raise Cancelled()
        images = torch.stack(tensors)  # (N, 3, S, S)
        labels = torch.tensor(label_list, dtype=torch.long)  # (N,)
        classes = list(manifest.classes)

    try:
        result = tune(
            backbone,
            run.method,
            classes,
            images,
            labels,
            config,
            on_progress=monitor.on_progress,
            should_cancel=monitor.should_cancel,
        )
    except Cancelled:
        if stop_event is not None and stop_event.is_set():
            raise JobInterrupted() from None
        with session_scope(sm) as s:
            done = repo.mark_cancelled(s, task_id, attempt)
        log.info("task %s attempt %s: cancelled%s", task_id, attempt, "" if done else " (run no longer current)")
        return "cancelled"
    del images, labels

    metrics = _jsonable(dict(result.metrics))
    history = _jsonable(list(result.history))
    confusion = [[int(v) for v in row] for row in result.confusion]
    data = result.prompt.to_bytes(
        extra={"version": str(run.next_version), "task_id": task_id, "attempt": str(attempt)}
    )
    pv = publish_prompt(
        sm,
        objects,
        task_id=task_id,
        attempt=attempt,
        data=data,
        fingerprint=result.prompt.fingerprint or backbone.fingerprint,
        classes=list(result.prompt.classes or classes),
        metrics=metrics,
        history=history,
        confusion=confusion,
    )
    if pv is None:
        log.info("task %s attempt %s: run no longer current; nothing published", task_id, attempt)
        return "skipped"
    log.info("task %s attempt %s: published version %s (%d bytes)", task_id, attempt, pv.version, pv.size)
    if settings.redis_url:  # API replicas drop the old version from their caches at once
        announce_version(settings.redis_url, task_id, pv.version)
    if on_published is not None:
        on_published(task_id, pv.version)
    return "published"


class _Monitor:
    """Progress writes and cancel checks, both throttled to one DB round trip per interval."""

    def __init__(self, sm: Any, task_id: str, attempt: int, stop_event: threading.Event | None) -> None:
        self.sm = sm
        self.task_id = task_id
        self.attempt = attempt
        self.stop_event = stop_event
        self.stop = False
        self.last_write = 0.0
        self.last_check = 0.0
        self.last_epoch = -1
        self.history: dict[int, dict[str, Any]] = {}

    def on_progress(self, p: Any) -> None:
        now = time.monotonic()
        epoch = int(getattr(p, "epoch", 0) or 0)
        fraction = float(getattr(p, "fraction", 0.0) or 0.0)
        loss, acc = getattr(p, "loss", None), getattr(p, "val_accuracy", None)
        if loss is not None or acc is not None:
            self.history[epoch] = _jsonable({"epoch": epoch, "loss": loss, "val_accuracy": acc})
        new_epoch = epoch != self.last_epoch
        if not (new_epoch or fraction >= 1.0 or now - self.last_write >= PROGRESS_INTERVAL_S):
            return
        self.last_epoch = epoch
        self.last_write = now
        self.last_check = now
        history = [self.history[k] for k in sorted(self.history)] or None
        with session_scope(self.sm) as s:
            go_on = repo.record_progress(s, self.task_id, self.attempt, progress=fraction, history=history)
        if not go_on:
            self.stop = True

    def should_cancel(self) -> bool:
        if self.stop_event is not None and self.stop_event.is_set():
            return True
        if self.stop:
            return True
        now = time.monotonic()
        if now - self.last_check >= PROGRESS_INTERVAL_S:
            self.last_check = now
            with session_scope(self.sm) as s:
                self.stop = repo.should_stop(s, self.task_id, self.attempt)
        return self.stop


def mark_failed_after_retries(task_id: str, attempt: int, *, settings: "Settings", exc: BaseException | None) -> None:
    """Best effort: the job gave up after its retries; say so on the task."""
    what = type(exc).__name__ if exc is not None else "a transient error"
    try:
        sm = runtime.get_sessionmaker(settings.database_url)
        with session_scope(sm) as s:
            repo.fail_run(
                s, task_id, attempt,
                error=f"tuning failed: the service's storage stayed unreachable ({what}); retrain to try again",
            )
    except Exception:  # the database itself may be what is down
        log.exception("task %s attempt %s: could not record the failure", task_id, attempt)


def _jsonable(value: Any) -> Any:
    """Plain JSON types (tensors and numpy scalars to floats, NaN/inf to None)."""

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int):
            return v
        if hasattr(v, "item") and callable(v.item):
            try:
                v = v.item()
            except (ValueError, RuntimeError):
                return str(v)
            return conv(v)
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        try:
            return json.loads(json.dumps(v))
        except (TypeError, ValueError):
            return str(v)

    return conv(value)


def _brief(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).replace("\n", " ")[:300]

