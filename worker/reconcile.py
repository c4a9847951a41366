"""The run reconciler: no run stays queued or running without something working on it.

A run can be left active with nothing behind it:

- **queued without a message**: the API committed the run and died before the broker send
  (or the send was lost); only a message makes a worker claim it;
- **running without a worker**: the worker was killed (SIGKILL, lost node, OOM) or the
  in-process runner stopped; its job no longer renews its lease (``store.repo.claim_run``).

``reconcile_once`` finds both with one query (``repo.stuck_runs``) and acts on each with one
conditional write, so any number of reconcilers (every ``promptstore worker``, every
``promptstore serve`` that runs jobs in-process) can run at once without a lock: for each run
exactly one of them wins the write and sends the message.

- a run queued since more than ``requeue_queued_after_s`` is sent again (``queued_at``
  bumped first, conditionally). If the first message was only waiting in a long queue, the
  duplicate is harmless: the claim is conditional, so the second delivery finds the run
  running under a live lease, or finished, and does nothing;
- a running run whose lease expired is put back to queued as the SAME attempt and sent again,
  up to ``run_max_requeues`` times; after that it is failed with a readable reason
  (``STALLED_REASON``). Its old execution, if it ever wakes up, finds its lease gone (its
  progress, publish and finish writes are conditional on its owner) and stops without
  publishing.

Evaluations (``store.evaluations``) are reconciled the same way when the caller passes
``submit_evaluation``: a queued one whose message was last sent more than
``requeue_queued_after_s`` ago is sent again, a running one whose lease expired is put back to
queued (and sent) up to ``run_max_requeues`` times, then failed with ``STALLED_EVALUATION``.

The bound (docs/operations.md, "Runs that cannot get stuck"): a run whose worker stopped is
re-queued or failed at most ``run_lease_s + reconcile_interval_s`` after the worker's last
heartbeat; a queued run whose message was lost is sent again at most
``requeue_queued_after_s + reconcile_interval_s`` after it was committed. Timestamps come from
the clocks of the machines involved: keep them synchronised (NTP) to well under the lease.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from store import evaluations as evals
from store import repo
from store.db import session_scope, utcnow

log = logging.getLogger("promptstore.worker")

#: The error of a run failed because its worker stopped responding too many times.
STALLED_REASON = "the worker running this task stopped responding; retrain to try again"
#: The error of an evaluation failed for the same reason.
STALLED_EVALUATION = "the worker running this evaluation stopped responding; submit it again"


@dataclasses.dataclass
class ReconcileReport:
    """What one pass did, as ``(task_id, attempt)`` lists for runs and id lists for evaluations."""

    resent: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    requeued: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    evaluations_resent: list[str] = dataclasses.field(default_factory=list)
    evaluations_requeued: list[str] = dataclasses.field(default_factory=list)
    evaluations_failed: list[str] = dataclasses.field(default_factory=list)


def reconcile_once(
    sm: sessionmaker[Session],
    submit: Callable[[str, int], None],
    *,
    requeue_queued_after_s: float,
    max_requeues: int,
    submit_evaluation: Callable[[str], None] | None = None,
    objects: Any = None,
) -> ReconcileReport:
    """One pass: re-send queued runs whose message may be lost, re-queue (or fail) running
    runs whose lease expired. ``submit(task_id, attempt)`` sends a run to the job runner; it is
    called after the commit that recorded the decision. A send that fails is logged and tried
    again on a later pass (the run stays queued). With ``submit_evaluation(evaluation_id)`` the
    evaluations are reconciled too; ``objects`` (an object store) deletes the zip of an
    evaluation failed here (else the garbage collector does)."""
    report = ReconcileReport()
    now = utcnow()
    with session_scope(sm) as s:
        runs = repo.stuck_runs(s, now=now, requeue_queued_after_s=requeue_queued_after_s)
    for run in runs:
        key = (run.task_id, run.attempt)
        with session_scope(sm) as s:
            if run.run_status == repo.QUEUED:
                action = "resent" if repo.mark_resent(s, run, now=now) else None
            elif run.requeues >= max_requeues:
                won = repo.fail_stalled_run(s, run, now=now, error=STALLED_REASON)
                action = "failed" if won else None
            else:
                action = "requeued" if repo.requeue_stalled_run(s, run, now=now) else None
        if action is None:  # another reconciler, the job itself or the tenant acted first
            continue
        getattr(report, action).append(key)
        if action == "failed":
            log.warning(
                "reconciler: task %s attempt %s failed: its worker stopped responding %d times",
                run.task_id, run.attempt, run.requeues + 1,
            )
            continue
        if action == "requeued":
            log.warning(
                "reconciler: task %s attempt %s re-queued: its worker stopped responding (lease of %s expired)",
                run.task_id, run.attempt, run.lease_owner or "a stopped job",
            )
        else:
            log.warning("reconciler: task %s attempt %s still queued; sent again", run.task_id, run.attempt)
        try:
            submit(run.task_id, run.attempt)
        except Exception as exc:
            log.error("reconciler: could not send task %s attempt %s (%s); next pass tries again",
                      run.task_id, run.attempt, type(exc).__name__)
    if submit_evaluation is not None:
        _reconcile_evaluations(sm, submit_evaluation, report, now=now, requeue_queued_after_s=requeue_queued_after_s,
                               max_requeues=max_requeues, objects=objects)
    return report


def _reconcile_evaluations(
    sm: sessionmaker[Session],
    submit: Callable[[str], None],
    report: ReconcileReport,
    *,
    now: Any,
    requeue_queued_after_s: float,
    max_requeues: int,
    objects: Any,
) -> None:
    with session_scope(sm) as s:
        stuck = evals.stuck_evaluations(s, now=now, requeue_queued_after_s=requeue_queued_after_s)
    for ev in stuck:
        key = None
        with session_scope(sm) as s:
            if ev.status == evals.QUEUED:
                action = "resent" if evals.mark_evaluation_resent(s, ev, now=now) else None
            elif ev.requeues >= max_requeues:
                won, key = evals.fail_stalled_evaluation(s, ev, now=now, error=STALLED_EVALUATION)
                action = "failed" if won else None
            else:
                action = "requeued" if evals.requeue_stalled_evaluation(s, ev, now=now) else None
        if action is None:  # another reconciler, the job itself or a delete acted first
            continue
        getattr(report, f"evaluations_{action}").append(ev.id)
        if action == "failed":
            log.warning("reconciler: evaluation %s failed: its worker stopped responding %d times", ev.id,
                        ev.requeues + 1)
            if key is not None and objects is not None:
                try:
                    objects.delete(key)
                except Exception as exc:  # no row refers to it: the garbage collector takes it
                    log.warning("reconciler: could not delete %s (%s)", key, type(exc).__name__)
            continue
        if action == "requeued":
            log.warning("reconciler: evaluation %s re-queued: its worker stopped responding (lease of %s expired)",
                        ev.id, ev.lease_owner or "a stopped job")
        else:
            log.warning("reconciler: evaluation %s still queued; sent again", ev.id)
        try:
            submit(ev.id)
        except Exception as exc:
            log.error("reconciler: could not send evaluation %s (%s); next pass tries again", ev.id,
                      type(exc).__name__)


class Reconciler:
    """``reconcile_once`` every ``settings.reconcile_interval_s`` in a daemon thread."""

    def __init__(
        self,
        settings: Any,
        submit: Callable[[str, int], None],
        *,
        sm: sessionmaker[Session] | None = None,
        name: str = "promptstore-reconciler",
        submit_evaluation: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.submit = submit
        self.submit_evaluation = submit_evaluation
        self._object_store: Any = None
        self._sm = sm
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sessionmaker(self) -> sessionmaker[Session]:
        """The given sessionmaker, else an engine of its own, opened in the reconciler's thread:
        in ``promptstore worker`` the main process forks the job processes, which must not
        inherit (and close) its connections; a child forked later drops the pool at once."""
        if self._sm is None:
            import os

            from store.db import make_engine, make_sessionmaker

            engine = make_engine(self.settings.database_url)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
            self._sm = make_sessionmaker(engine)
        return self._sm

    def run_once(self) -> ReconcileReport:
        return reconcile_once(
            self._sessionmaker(),
            self.submit,
            requeue_queued_after_s=self.settings.requeue_queued_after_s,
            max_requeues=self.settings.run_max_requeues,
            submit_evaluation=self.submit_evaluation,
            objects=self._objects(),
        )

    def _objects(self) -> Any:
        """An object store client of the reconciler's own (to delete the zip of an evaluation
        failed here; opened in its thread, as its database engine), or None."""
        if self.submit_evaluation is None or not getattr(self.settings, "object_store_url", None):
            return None
        if self._object_store is None:
            try:
                from store.objects import open_object_store

                self._object_store = open_object_store(self.settings)
            except Exception:  # the garbage collector deletes the zip instead
                return None
        return self._object_store

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        log.info("reconciler: every %.1fs (lease %.1fs, re-send queued runs after %.1fs)",
                 self.settings.reconcile_interval_s, self.settings.run_lease_s, self.settings.requeue_queued_after_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_s):
            try:
                self.run_once()
            except Exception as exc:  # the database may be down: the next pass tries again
                log.warning("reconciler: pass failed (%s: %s); next pass in %.1fs", type(exc).__name__,
                            str(exc).splitlines()[0][:200] if str(exc) else "", self.settings.reconcile_interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
