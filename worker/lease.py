"""A job's hold on what it runs (a task's run, an evaluation): a lease renewed by a heartbeat.

``JobLease`` starts a daemon thread that calls ``renew(session)`` every quarter of
``lease_s``; once a renewal answers False (the run or evaluation is no longer this owner's: the
reconciler re-queued it after the lease expired and another execution took it over, or it
finished) ``lost`` is set and the heartbeat stops. ``release`` gives the lease up when the job
stops without finishing, so a retry may claim it at once. A database that is briefly down
costs a renewal, not the lease: it has three quarters of slack.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from store.db import session_scope

log = logging.getLogger("promptstore.worker")


class JobLease:
    """``owner`` holds a lease of ``lease_s`` seconds, renewed by ``renew(s) -> bool`` and
    given up by ``release(s)``; ``label`` names what it holds in log lines ("task T attempt 2")."""

    def __init__(
        self, sm: Any, *, owner: str, lease_s: float, renew: Callable[[Session], bool],
        release: Callable[[Session], Any], label: str,
    ) -> None:  # fmt: skip
        self.sm = sm
        self.owner = owner
        self.lease_s = float(lease_s)
        self.label = label
        self._renew = renew
        self._release = release
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"promptstore-lease-{self.owner[-12:]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.05, self.lease_s / 4)
        while not self._done.wait(interval):
            try:
                with session_scope(self.sm) as s:
                    held = self._renew(s)
            except Exception as exc:  # the database may be briefly down; the lease has slack
                log.warning("%s: lease renewal failed: %s", self.label, _brief(exc))
                continue
            if not held:
                self.lost.set()
                return

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def release(self) -> None:
        try:
            with session_scope(self.sm) as s:
                self._release(s)
        except Exception as exc:  # it expires by itself
            log.warning("%s: could not release the lease: %s", self.label, _brief(exc))


def _brief(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).replace("\n", " ")[:300]
