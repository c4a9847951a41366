"""Getting a tuning job to something that runs it.

- ``CeleryDispatcher``: sends ``promptstore.tune(task_id, attempt)`` to the broker.
- ``ThreadDispatcher``: runs the same job body in a thread pool of the server process
  (``promptstore serve`` with no broker configured); at start it resubmits the runs that
  were queued or running (without a live lease) when the process last stopped, and then runs
  the reconciler (``worker.reconcile``) every ``settings.reconcile_interval_s``, which re-sends
  queued runs nobody claimed and re-queues or fails runs whose job stopped renewing its lease.

Callers submit only after the database commit that created the run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from store import repo
from store.db import session_scope
from worker import runtime
from worker.jobs import JobInterrupted, TransientJobError, mark_failed_after_retries, run_tune_job

if TYPE_CHECKING:
    from store.settings import Settings
    from worker.reconcile import Reconciler

log = logging.getLogger("promptstore.worker")

TUNE_TASK_NAME = "promptstore.tune"


class Dispatcher(Protocol):
    def submit(self, task_id: str, attempt: int) -> None: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...


class CeleryDispatcher:
    """Enqueue on the Celery broker (``settings.broker_url``)."""

    kind = "celery"

    def __init__(self, settings: "Settings") -> None:
        from worker.celery_app import make_celery

        if not settings.broker_url:
            raise ValueError("CeleryDispatcher needs PROMPTSTORE_BROKER_URL")
        self.app = make_celery(
            settings.broker_url, settings.broker_visibility_timeout, socket_timeout=settings.broker_timeout
        )
        self.timeout = settings.broker_timeout
        self.deadline = settings.broker_deadline

    def start(self) -> None:
        pass

    def submit(self, task_id: str, attempt: int) -> None:
        """Send the job; every connect and reply waits at most ``broker_timeout``, and attempts
        stop once ``broker_deadline`` is spent: then ``DependencyTimeout`` (or the broker's
        error). The job may be lost only as a message: its run stays queued in the database."""
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
                    self.app.send_task(TUNE_TASK_NAME, args=[task_id, int(attempt)], connection=conn, retry=False)
                return
            except Exception as exc:
                backoff = 0.2 * 2**n
                n += 1
                # another attempt only when it fits (connect + one reply) within the deadline
                if time.monotonic() - start + backoff + 2 * self.timeout > self.deadline:
                    if "timeout" in f"{type(exc).__name__} {exc}".lower():
                        raise DependencyTimeout(BROKER, self.timeout) from exc
                    raise
                log.warning("enqueueing task %s attempt %s failed (%s); retrying", task_id, attempt, exc)
                time.sleep(backoff)

    def shutdown(self) -> None:
        self.app.close()


class ThreadDispatcher:
    """Run jobs in ``settings.job_threads`` threads of this process, retrying transient
    errors a few times with exponential backoff."""

    kind = "threads"

    def __init__(self, settings: "Settings", *, max_retries: int = 5, backoff_s: float = 1.0) -> None:
        self.settings = settings
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], Future[None]] = {}
        self._executor: ThreadPoolExecutor | None = None
        #: Called with (task_id, version) after a job of this pool publishes a version.
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
                    self.settings, self._resubmit, sm=runtime.get_sessionmaker(self.settings.database_url)
                )
                self._reconciler.start()
        try:
            with session_scope(runtime.get_sessionmaker(self.settings.database_url)) as s:
                pending = repo.pending_runs(s)
        except Exception:
            log.exception("could not list pending tuning runs; they resume on the next start")
            return
        for task_id, attempt in pending:
            log.info("resuming tuning of task %s attempt %s", task_id, attempt)
            self.submit(task_id, attempt)

    def submit(self, task_id: str, attempt: int) -> None:
        key = (task_id, int(attempt))
        with self._lock:
            if self._executor is None:
                raise RuntimeError("ThreadDispatcher is not started")
            if key in self._inflight:
                return
            fut = self._executor.submit(self._run, task_id, int(attempt))
            self._inflight[key] = fut
        fut.add_done_callback(lambda _f, k=key: self._done(k))

    def _resubmit(self, task_id: str, attempt: int) -> None:
        """The reconciler's send: a no-op while the pool is stopped (its next start resumes)."""
        if not self._stop.is_set():
            self.submit(task_id, attempt)

    def _done(self, key: tuple[str, int]) -> None:
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


def make_dispatcher(settings: "Settings") -> CeleryDispatcher | ThreadDispatcher:
    return CeleryDispatcher(settings) if settings.broker_url else ThreadDispatcher(settings)
