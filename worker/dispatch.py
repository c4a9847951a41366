"""Getting a job to something that runs it. Two kinds of job: a tuning run
(``submit(task_id, attempt)``, ``worker.jobs``) and an evaluation (``submit_evaluation(id)``,
``worker.evaluate``), on the same queue.

- ``CeleryDispatcher``: sends ``promptstore.tune(task_id, attempt)`` or
  ``promptstore.evaluate(evaluation_id)`` to the broker.
- ``ThreadDispatcher``: runs the same job bodies in a thread pool of the server process
  (``promptstore serve`` with no broker configured); at start it resubmits the runs and
  evaluations that were queued or running (without a live lease) when the process last
  stopped, and then runs the reconciler (``worker.reconcile``) every
  ``settings.reconcile_interval_s``, which re-sends queued jobs nobody claimed and re-queues or
  fails jobs whose execution stopped renewing its lease.

Callers submit only after the database commit that created the run.

The API and the dashboard know a dispatcher through the ``Dispatcher`` protocol only: its
``kind``, its ``queue``, ``queue_depth()`` and ``workers_alive()``; ``run_celery_worker`` is
the other end of the Celery queue (``promptstore worker``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, Protocol

from store import evaluations as evals
from store import repo
from store.db import get_sessionmaker, session_scope
from worker.evaluate import mark_evaluation_failed_after_retries, run_evaluation_job
from worker.jobs import JobInterrupted, TransientJobError, mark_failed_after_retries, run_tune_job

if TYPE_CHECKING:
    from store.settings import Settings
    from worker.reconcile import Reconciler

log = logging.getLogger("promptstore.worker")

TUNE_TASK_NAME = "promptstore.tune"
EVALUATE_TASK_NAME = "promptstore.evaluate"


#: Seconds ``workers_alive`` waits for the Celery workers' ping replies.
PING_TIMEOUT_S = 1.0

DispatcherKind = Literal["threads", "celery"]


class Dispatcher(Protocol):
    """What gets a tuning run or an evaluation to something that runs it, as the API and the
    dashboard see it."""

    #: "threads": jobs run in this process; "celery": on the broker, for worker processes.
    kind: DispatcherKind
    #: The queue the jobs wait in (the broker queue the workers consume, for Celery).
    queue: str
    #: Called with (task_id, serving generation) when a job run by this process publishes a version
    #: (jobs run elsewhere announce through the database and Redis instead).
    on_published: Callable[[str, int], None] | None

    def submit(self, task_id: str, attempt: int) -> None:
        """Send run ``attempt`` of ``task_id``; call it only after the commit that created the
        run (a lost send leaves the run queued, and the reconciler sends it again)."""
        ...

    def submit_evaluation(self, evaluation_id: str) -> None:
        """Send the evaluation's job; call it only after the commit that created it (a lost send
        leaves it queued, and the reconciler sends it again)."""
        ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def queue_depth(self) -> int | None:
        """Jobs sent and not started yet; None when this dispatcher cannot count them.
        May ask the broker (bounded by its timeouts): call it off the request path."""
        ...

    def workers_alive(self) -> list[str]:
        """What runs the jobs now (workers answering a ping, or the in-process pool), for people.
        May ask the broker and raise when it does not answer: call it off the request path."""
        ...


class CeleryDispatcher:
    """Enqueue on the Celery broker (``settings.broker_url``)."""

    kind: DispatcherKind = "celery"

    def __init__(self, settings: "Settings") -> None:
        from worker.celery_app import QUEUE, make_celery

        if not settings.broker_url:
            raise ValueError("CeleryDispatcher needs PROMPTSTORE_BROKER_URL")
        self.app = make_celery(
            settings.broker_url, settings.broker_visibility_timeout, socket_timeout=settings.broker_timeout
        )
        self.timeout = settings.broker_timeout
        self.deadline = settings.broker_deadline
        self.broker_url = settings.broker_url
        self.queue = QUEUE
        self.on_published: Callable[[str, int], None] | None = None  # jobs run in worker processes

    def start(self) -> None:
        pass

    def queue_depth(self) -> int | None:
        """Messages waiting on the broker's queue (Redis: the length of its list)."""
        import redis

        r = redis.Redis.from_url(self.broker_url, socket_timeout=PING_TIMEOUT_S, socket_connect_timeout=PING_TIMEOUT_S)
        try:
            return int(r.llen(self.queue))
        finally:
            r.close()

    def workers_alive(self) -> list[str]:
        """The Celery workers answering a ping within ``PING_TIMEOUT_S``."""
        replies = self.app.control.inspect(timeout=PING_TIMEOUT_S).ping() or {}
        return sorted(replies)

    def submit(self, task_id: str, attempt: int) -> None:
        """Send the job; every connect and reply waits at most ``broker_timeout``, and attempts
        stop once ``broker_deadline`` is spent: then ``DependencyTimeout`` (or the broker's
        error). The job may be lost only as a message: its run stays queued in the database."""
        self._send(TUNE_TASK_NAME, [task_id, int(attempt)], f"task {task_id} attempt {attempt}")

    def submit_evaluation(self, evaluation_id: str) -> None:
        """Send the evaluation's job, bounded as ``submit``; a lost message leaves it queued."""
        self._send(EVALUATE_TASK_NAME, [evaluation_id], f"evaluation {evaluation_id}")

    def _send(self, name: str, args: list[Any], what: str) -> None:
        from store.timeouts import BROKER, DependencyTimeout

        start = time.monotonic()
        n = 0
        while True:
            try:
                # A connection of our own per submit: Celery's `app.pool` is kombu's process-wide
                # pool for this broker URL, shared with every other app in the process, so closing
                # it at shutdown would break them ("Acquire on closed pool"). Task creation is rare
                # enough that a connect per message costs nothing that matters.
                with self.app.connection_for_write() as conn:
                    self.app.send_task(name, args=args, connection=conn, retry=False)
                return
            except Exception as exc:
                backoff = 0.2 * 2**n
                n += 1
                # another attempt only when it fits (connect + one reply) within the deadline
                if time.monotonic() - start + backoff + 2 * self.timeout > self.deadline:
                    if "timeout" in f"{type(exc).__name__} {exc}".lower():
                        raise DependencyTimeout(BROKER, self.timeout) from exc
                    raise
                log.warning("enqueueing %s failed (%s); retrying", what, exc)
                time.sleep(backoff)

    def shutdown(self) -> None:
        self.app.close()


class ThreadDispatcher:
    """Run jobs in ``settings.job_threads`` threads of this process, retrying transient
    errors a few times with exponential backoff."""

    kind: DispatcherKind = "threads"
    queue = "in-process"

    def __init__(self, settings: "Settings", *, max_retries: int = 5, backoff_s: float = 1.0) -> None:
        self.settings = settings
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: (task_id, attempt) of a run, ("evaluation", id) of an evaluation
        self._inflight: dict[tuple[str, Any], Future[None]] = {}
        self._executor: ThreadPoolExecutor | None = None
        #: Called with (task_id, serving generation) after a job of this pool publishes a version.
        self.on_published: Callable[[str, int], None] | None = None
        self._reconciler: "Reconciler | None" = None

    def start(self) -> None:
        """Start the pool, resubmit runs left queued or running by a previous process, and
        start the periodic reconciler."""
        from worker.reconcile import Reconciler

        with self._lock:
            if self._executor is None:
                self._stop.clear()
                self._executor = ThreadPoolExecutor(
                    max_workers=self.settings.job_threads, thread_name_prefix="promptstore-job"
                )
            if self._reconciler is None:
                self._reconciler = Reconciler(
                    self.settings, self._resubmit, sm=get_sessionmaker(self.settings.database_url),
                    submit_evaluation=self._resubmit_evaluation,
                )
                self._reconciler.start()
        try:
            with session_scope(get_sessionmaker(self.settings.database_url)) as s:
                pending = repo.pending_runs(s)
                pending_evaluations = evals.pending_evaluations(s)
        except Exception:
            log.exception("could not list pending tuning runs and evaluations; they resume on the next start")
            return
        for task_id, attempt in pending:
            log.info("resuming tuning of task %s attempt %s", task_id, attempt)
            self.submit(task_id, attempt)
        for evaluation_id in pending_evaluations:
            log.info("resuming evaluation %s", evaluation_id)
            self.submit_evaluation(evaluation_id)

    def submit(self, task_id: str, attempt: int) -> None:
        self._submit((task_id, int(attempt)), self._run, task_id, int(attempt))

    def submit_evaluation(self, evaluation_id: str) -> None:
        self._submit(("evaluation", evaluation_id), self._run_evaluation, evaluation_id)

    def _submit(self, key: tuple[str, Any], fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._executor is None:
                raise RuntimeError("ThreadDispatcher is not started")
            if key in self._inflight:
                return
            fut = self._executor.submit(fn, *args)
            self._inflight[key] = fut
        fut.add_done_callback(lambda _f, k=key: self._done(k))

    def queue_depth(self) -> int | None:
        """Jobs submitted to the pool and waiting for a thread."""
        with self._lock:
            return sum(1 for f in self._inflight.values() if not f.running() and not f.done())

    def workers_alive(self) -> list[str]:
        with self._lock:
            busy = sum(1 for f in self._inflight.values() if f.running())
        threads = int(self.settings.job_threads)
        return [f"in-process pool: {threads} thread(s), {min(busy, threads)} busy"]

    def _resubmit(self, task_id: str, attempt: int) -> None:
        """The reconciler's send: a no-op while the pool is stopped (its next start resumes)."""
        if not self._stop.is_set():
            self.submit(task_id, attempt)

    def _resubmit_evaluation(self, evaluation_id: str) -> None:
        if not self._stop.is_set():
            self.submit_evaluation(evaluation_id)

    def _done(self, key: tuple[str, Any]) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def _run(self, task_id: str, attempt: int) -> None:
        for n in range(self.max_retries + 1):
            if self._stop.is_set():
                return
            try:
                run_tune_job(
                    task_id, attempt, settings=self.settings, stop_event=self._stop, on_published=self.on_published
                )
                return
            except JobInterrupted:
                log.info("task %s attempt %s: interrupted by shutdown; resumes at next start", task_id, attempt)
                return
            except TransientJobError as exc:
                if n == self.max_retries:
                    mark_failed_after_retries(task_id, attempt, settings=self.settings, exc=exc)
                    return
                delay = min(60.0, self.backoff_s * 2**n)
                log.warning("task %s attempt %s: retry %d in %.1fs (%s)", task_id, attempt, n + 1, delay, exc)
                if self._stop.wait(delay):
                    return
            except Exception:
                log.exception("task %s attempt %s: job crashed", task_id, attempt)
                return

    def _run_evaluation(self, evaluation_id: str) -> None:
        for n in range(self.max_retries + 1):
            if self._stop.is_set():
                return
            try:
                run_evaluation_job(evaluation_id, settings=self.settings, stop_event=self._stop)
                return
            except JobInterrupted:
                log.info("evaluation %s: interrupted by shutdown; resumes at next start", evaluation_id)
                return
            except TransientJobError as exc:
                if n == self.max_retries:
                    mark_evaluation_failed_after_retries(evaluation_id, settings=self.settings, exc=exc)
                    return
                delay = min(60.0, self.backoff_s * 2**n)
                log.warning("evaluation %s: retry %d in %.1fs (%s)", evaluation_id, n + 1, delay, exc)
                if self._stop.wait(delay):
                    return
            except Exception:
                log.exception("evaluation %s: job crashed", evaluation_id)
                return

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no job is in flight (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight:
                    return True
            time.sleep(0.05)
        return False

    def shutdown(self, wait: bool = True) -> None:
        """Stop: running jobs see the stop flag at their next step and leave their run
        ``running`` for the next start to resume; queued ones are dropped (same)."""
        self._stop.set()
        with self._lock:
            ex, self._executor = self._executor, None
            reconciler, self._reconciler = self._reconciler, None
        if reconciler is not None:
            reconciler.stop()
        if ex is not None:
            ex.shutdown(wait=wait, cancel_futures=True)


def make_dispatcher(settings: "Settings") -> Dispatcher:
    """Celery when a broker is configured, else the in-process thread pool."""
    return CeleryDispatcher(settings) if settings.broker_url else ThreadDispatcher(settings)


def run_celery_worker(settings: "Settings", *, concurrency: int = 1, loglevel: str = "INFO") -> None:
    """Consume the Celery queue in this process (``promptstore worker``; needs ``broker_url``),
    with the object garbage collector and the run reconciler beside it. Blocks."""
    from store.consistency import PeriodicCollector
    from worker.celery_app import QUEUE, celery_app
    from worker.reconcile import Reconciler

    celery_app.conf.broker_url = settings.broker_url
    pool = "solo" if concurrency == 1 else "prefork"
    _preload_backbone_in_job_processes(settings, pool)
    # the object garbage collector (PROMPTSTORE_GC_INTERVAL; its own connections, opened in its thread)
    PeriodicCollector.from_settings(settings).start()
    # the reconciler (PROMPTSTORE_RECONCILE_INTERVAL_S): re-sends queued runs and evaluations whose
    # message was lost, re-queues or fails those whose worker stopped renewing its lease; safe with many
    # workers (each decision is a conditional write); its own connections, opened in its thread
    sender = CeleryDispatcher(settings)
    Reconciler(settings, sender.submit, submit_evaluation=sender.submit_evaluation).start()
    celery_app.worker_main(
        ["worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", f"--pool={pool}", "--without-gossip",
         "--without-mingle", "-Q", QUEUE]
    )


def _preload_backbone_in_job_processes(settings: "Settings", pool: str) -> None:
    """Start loading the backbone as soon as a process that runs jobs exists (this one for the
    solo pool, each child for prefork), in the background: the first job does not pay for the
    load, and a backbone that cannot load is in the log at start. A job arriving meanwhile waits
    for the same load; a failed load is tried again by the job, which fails with the reason."""
    from backbone.holder import BackboneHolder

    def start(**_: Any) -> None:
        BackboneHolder(settings.backbone, settings.device).start()

    if pool == "solo":
        start()
    else:  # Celery kills a child whose init takes over 4 s: the load must not block it
        from celery.signals import worker_process_init

        worker_process_init.connect(start, weak=False)
