"""Celery tasks. ``promptstore.tune`` receives a task id and an attempt number,
``promptstore.evaluate`` an evaluation id, never an object or a tensor; both are safe to run
twice (acks_late + reject_on_worker_lost: a worker that dies mid-job gets the message
re-delivered, and the job's claim makes a finished, stale or held job a no-op)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from store.settings import get_settings
from worker.celery_app import celery_app
from worker.evaluate import mark_evaluation_failed_after_retries, run_evaluation_job
from worker.jobs import TransientJobError, mark_failed_after_retries, run_tune_job

log = logging.getLogger("promptstore.worker")

MAX_RETRIES = 5

#: Both jobs: acknowledged after they ran (a worker lost mid-run gets its message re-delivered;
#: the claim makes a duplicate a no-op), transient errors retried with a jittered back-off.
JOB_OPTIONS: dict = dict(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(TransientJobError,),
    max_retries=MAX_RETRIES,
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
)


class TuneTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        # Reached when the retries for a transient error are used up (every other error is
        # recorded on the task by the job itself and does not raise).
        if isinstance(exc, TransientJobError) and len(args) >= 2:
            mark_failed_after_retries(str(args[0]), int(args[1]), settings=get_settings(), exc=exc)


class EvaluateTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        # As TuneTask: only a transient error whose retries are used up gets here.
        if isinstance(exc, TransientJobError) and len(args) >= 1:
            mark_evaluation_failed_after_retries(str(args[0]), settings=get_settings(), exc=exc)


@celery_app.task(
    name="promptstore.tune",
    base=TuneTask,
    **JOB_OPTIONS,
)
def tune(self: Task, task_id: str, attempt: int) -> str:
    """Tune run ``attempt`` of task ``task_id`` (see ``worker.jobs.run_tune_job``)."""
    return run_tune_job(str(task_id), int(attempt), settings=get_settings())


@celery_app.task(
    name="promptstore.evaluate",
    base=EvaluateTask,
    **JOB_OPTIONS,
)
def evaluate(self: Task, evaluation_id: str) -> str:
    """Run evaluation ``evaluation_id`` (see ``worker.evaluate.run_evaluation_job``)."""
    return run_evaluation_job(str(evaluation_id), settings=get_settings())
