"""The tuning job: one body, run by Celery (``worker.tasks``) and by the in-process
runner of ``promptstore serve`` (``worker.dispatch.ThreadDispatcher``).

``run_tune_job(task_id, attempt, settings=...)`` receives ids only. It

1. claims run ``attempt`` of the task as a unique owner with a lease (a stale, finished or
   deleted run, or one running under another owner's live lease, is a no-op, so a duplicate
   delivery does nothing and one attempt never runs twice at once); a heartbeat thread renews
   the lease every quarter of ``settings.run_lease_s`` (so a long epoch or a slow backbone load
   does not lose it) and every progress write renews it too. When the lease is lost (the
   reconciler re-queued the run after the lease expired and another execution took it over)
   the job stops at its next step without publishing: every write it makes is conditional on
   its owner. The lease is released when the job stops without finishing (shutdown,
   transient error), so a retry can claim the run at once;
2. takes the snapshot of the task's samples (``store.samples``; the task's dataset zip is
   expanded into its first samples here if no samples call did it first: the same checks as at
   upload), then reads each sample's image, decodes it and preprocesses it with the backbone;
3. tunes through ``backbone.tune`` on the process's one backbone, writing progress to the
   database at most every ``PROGRESS_INTERVAL_S`` and at every epoch, and stopping when a
   cancel is requested (read from the database, throttled the same way);
4. publishes the prompt: the object under its content-addressed key first, then the
   version row (with the snapshot it trained on: its hash and counts) and the task switch in
   one transaction (``store.publish``);
5. after a publish, requests the task's next run when it asks for one automatically
   (``retrain_after_samples``: enough samples were added meanwhile) and runs it at once, in this
   same execution (so the in-process runner and Celery alike need nothing more); should that
   stop, the run is queued or running in the database and the reconciler sends it again.

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
from sqlalchemy import select

from backbone.holder import get_backbone
from store import logcontext, repo
from store import samples as sample_store
from store.announce import announce_version
from store.archive import ArchiveLimits, DatasetError
from store.db import get_sessionmaker, session_scope
from store.models import Task
from store.objects import InvalidKey, ObjectNotFound, ObjectStoreError, get_object_store, transient_errors
from store.publish import publish_prompt
from worker.lease import JobLease

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
    *transient_errors(),  # each object-store backend's transport errors (store.objects.BACKENDS)
    ConnectionError,
    TimeoutError,
)


#: Logged when a job finds its run taken over (its lease expired, the reconciler re-queued it).
LOST_LEASE = "task %s attempt %s: lost its lease (the run was re-queued and taken over); stopping without publishing"


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
    method: str
    config: dict[str, Any]
    classes: list[str]
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

    ``on_published(task_id, generation)`` is called after a version is published (the
    in-process runner tells its own inference engine). Raises ``TransientJobError`` for
    errors worth a retry, ``JobInterrupted`` when
    ``stop_event`` is set (process shutting down).
    """
    try:
        with logcontext.bind(task_id=task_id):  # every log line of the job carries its ids
            outcome = _run(task_id, attempt, settings, stop_event, on_published)
            while outcome == "published" and (stop_event is None or not stop_event.is_set()):
                follow = _next_automatic_run(settings, task_id)
                if follow is None:
                    break
                log.info("task %s: enough samples were added meanwhile; running attempt %s (automatic retrain)",
                         task_id, follow)
                attempt = follow
                outcome = _run(task_id, attempt, settings, stop_event, on_published)
            return outcome
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
    sm = get_sessionmaker(settings.database_url)
    owner = repo.new_lease_owner()
    with session_scope(sm) as s:
        task = repo.claim_run(s, task_id, attempt, owner=owner, lease_s=settings.run_lease_s)
        if task is None:
            log.info(
                "task %s attempt %s: nothing to do (finished, stale, deleted or running under another "
                "worker's live lease)", task_id, attempt,
            )
            return "skipped"
        logcontext.set_ids(tenant_id=task.tenant_id)
        run = _RunInput(
            method=task.method,
            config=dict(task.config or {}),
            classes=list(task.classes or []),
            next_version=repo.next_version_number(s, task.id),
        )
    log.info("task %s attempt %s: tuning %s", task_id, attempt, run.method)

    lease = JobLease(
        sm, owner=owner, lease_s=settings.run_lease_s, label=f"task {task_id} attempt {attempt}",
        renew=lambda s: repo.renew_lease(s, task_id, attempt, owner=owner, lease_s=settings.run_lease_s),
        release=lambda s: repo.release_lease(s, task_id, attempt, owner=owner),
    )
    lease.start()
    try:
        return _tune_and_publish(task_id, attempt, run, settings, sm, stop_event, on_published, lease)
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
            repo.fail_run(s, task_id, attempt, error=reason, owner=owner)
        return "failed"
    finally:
        lease.stop()
        lease.release()  # a no-op once the run finished; else a retry may claim it at once


def failure_reason(exc: BaseException) -> str | None:
    """A tenant-facing reason for an expected failure, or None for an unexpected one."""
    from backbone import BackboneError, ConfigError, PromptFormatError, PromptMismatch
    from backbone.errors import DivergedError, NonFinitePrompt

    if isinstance(exc, DatasetError):
        return f"invalid dataset: {exc}"
    if isinstance(exc, sample_store.SampleError):
        return f"invalid samples: {exc}"
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
    on_published: Callable[[str, int], None] | None,
    lease: JobLease,
) -> str:
    import torch

    from backbone import Cancelled, tune, validate_config
    from backbone.methods import get_method

    objects = get_object_store(settings)
    backbone = get_backbone(settings.backbone, settings.device)
    config = validate_config(run.method, run.config)
    monitor = _Monitor(sm, task_id, attempt, stop_event, lease)

    images = labels = None
    classes = run.classes
    snapshot: sample_store.Snapshot | None = None
    if get_method(run.method).needs_dataset:  # trained on the task's samples (zeroshot: on class names)
        if not sample_store.ensure_seeded(sm, objects, task_id, limits=ArchiveLimits.from_settings(settings)):
            log.info("task %s attempt %s: the task was deleted; stopping", task_id, attempt)
            return "skipped"
        with session_scope(sm) as s:
            snapshot = sample_store.take_snapshot(s, task_id, attempt, owner=lease.owner)
        if snapshot is None:  # the run is not this execution's any more
            if _taken_over(sm, task_id, attempt, lease.owner):
                log.warning(LOST_LEASE, task_id, attempt)
                return "lost"
            log.info("task %s attempt %s: run no longer current; nothing to train", task_id, attempt)
            return "skipped"
        classes = _trainable_classes(task_id, snapshot)
        log.info("task %s attempt %s: %d samples, %d classes (snapshot %s)", task_id, attempt, len(snapshot.items),
                 len(classes), snapshot.sha256[:12])

    try:
        if snapshot is not None:
            index = {c: i for i, c in enumerate(classes)}
            tensors: list[Any] = []
            label_list: list[int] = []

            def add(img: Any, label: str) -> None:
                tensors.append(backbone.preprocess(img))  # (3, S, S)
                img.close()
                label_list.append(index[label])

            done = sample_store.load_images(
                objects, snapshot, max_pixels=settings.max_image_pixels, on_image=add, should_stop=monitor.should_cancel,
            )
            if not done:
                raise Cancelled()
            images = torch.stack(tensors)  # (N, 3, S, S)
            labels = torch.tensor(label_list, dtype=torch.long)  # (N,)
            del tensors
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
            done = repo.mark_cancelled(s, task_id, attempt, owner=lease.owner)
        if not done and (lease.lost.is_set() or _taken_over(sm, task_id, attempt, lease.owner)):
            log.warning(LOST_LEASE, task_id, attempt)
            return "lost"
        log.info("task %s attempt %s: cancelled%s", task_id, attempt, "" if done else " (run no longer current)")
        return "cancelled"
    del images, labels

    metrics = _jsonable(dict(result.metrics))
    history = _jsonable(list(result.history))
    confusion = [[int(v) for v in row] for row in result.confusion] or None  # None: no validation split
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
        owner=lease.owner,
        keep_versions=settings.max_versions_per_task,
        method=result.prompt.method,
        # a search (auto, config.search) publishes a prompt of the config it chose: the version
        # records that one; the run's own request stays the task's config
        config=dict(result.prompt.config) if result.prompt.method != run.method or run.config.get("search") else None,
        samples=snapshot.record() if snapshot is not None else None,
    )
    if pv is None:
        with session_scope(sm) as s:  # refused because a cancel won the race with the publish?
            cancelled = repo.mark_cancelled(s, task_id, attempt, owner=lease.owner)
        if cancelled:
            log.info("task %s attempt %s: cancelled", task_id, attempt)
            return "cancelled"
        if _taken_over(sm, task_id, attempt, lease.owner):
            log.warning(LOST_LEASE, task_id, attempt)
            return "lost"
        log.info("task %s attempt %s: run no longer current; nothing published", task_id, attempt)
        return "skipped"
    log.info("task %s attempt %s: published version %s (%d bytes)", task_id, attempt, pv.version, pv.size)
    with session_scope(sm) as s:  # the generation the publish made (or a later one: as good)
        generation = repo.serving_generation(s, task_id)
    if generation is not None:
        if settings.redis_url:  # API replicas drop the old prompt from their caches at once
            announce_version(settings.redis_url, task_id, generation)
        if on_published is not None:
            on_published(task_id, generation)
    return "published"


def _trainable_classes(task_id: str, snapshot: sample_store.Snapshot) -> list[str]:
    """The classes of the snapshot (``Snapshot.classes``); SampleError when fewer than 2 classes
    have samples (a run needs at least 2)."""
    classes = snapshot.classes
    if len(classes) >= 2:
        return classes
    have = f"samples of one class only ('{classes[0]}')" if classes else "no samples"
    raise sample_store.SampleError(
        f"task {task_id} has {have}; a run needs samples of at least 2 classes: add some (POST "
        f"/v1/tasks/{task_id}/samples) or retrain with a dataset"
    )


def _next_automatic_run(settings: "Settings", task_id: str) -> int | None:
    """After a publish: request the task's next run if enough samples were added meanwhile
    (``store.samples.request_auto_retrain``); its attempt, or None. A failure here is logged
    only (the publish stands; the next sample added checks again)."""
    try:
        sm = get_sessionmaker(settings.database_url)
        with session_scope(sm) as s:
            tenant_id = s.scalar(select(Task.tenant_id).where(Task.id == task_id))
            if tenant_id is None:
                return None
            task = sample_store.request_auto_retrain(s, task_id, tenant_id=tenant_id)
            attempt = task.attempt if task is not None else None
        return attempt
    except Exception as exc:
        log.warning("task %s: could not check for an automatic retrain: %s", task_id, _brief(exc))
        return None


def _taken_over(sm: Any, task_id: str, attempt: int, owner: str) -> bool:
    """True when run ``attempt`` is still current but no longer held by ``owner``."""
    with session_scope(sm) as s:
        task = repo.get_task_for_job(s, task_id)
        return task is not None and task.attempt == attempt and task.lease_owner != owner and task.run_status in (
            "queued", "running"
        )


class _Monitor:
    """Progress writes and cancel checks, both throttled to one DB round trip per interval."""

    def __init__(
        self, sm: Any, task_id: str, attempt: int, stop_event: threading.Event | None, lease: JobLease
    ) -> None:
        self.lease = lease
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
            go_on = repo.record_progress(
                s, self.task_id, self.attempt, progress=fraction, history=history,
                owner=self.lease.owner, lease_s=self.lease.lease_s,
            )
        if not go_on:
            self.stop = True

    def should_cancel(self) -> bool:
        if self.stop_event is not None and self.stop_event.is_set():
            return True
        if self.stop or self.lease.lost.is_set():
            return True
        now = time.monotonic()
        if now - self.last_check >= PROGRESS_INTERVAL_S:
            self.last_check = now
            with session_scope(self.sm) as s:
                self.stop = repo.should_stop(s, self.task_id, self.attempt, owner=self.lease.owner)
        return self.stop


def mark_failed_after_retries(task_id: str, attempt: int, *, settings: "Settings", exc: BaseException | None) -> None:
    """Best effort: the job gave up after its retries; say so on the task."""
    what = type(exc).__name__ if exc is not None else "a transient error"
    try:
        sm = get_sessionmaker(settings.database_url)
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

