"""What one app instance holds: settings, database, object store, backbone, inference,
job dispatcher and metrics registry. Built by ``api.app.create_app``."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from api.middleware import HttpMetrics
from backbone.holder import BackboneHolder
from store.objects import ObjectStore

if TYPE_CHECKING:
    from api.engine import Inference
    from api.ratelimit import RateLimiter
    from store.settings import Settings
    from worker.dispatch import Dispatcher

log = logging.getLogger("promptstore.api")


class RequestCounter:
    """Classify requests per tenant, added to the tenants' counters (``repo.count_request``)
    in one transaction every ``interval`` seconds rather than one UPDATE per request: the
    classify path stays read-only, and concurrent requests of one tenant do not queue on
    its row. Counts that cannot be written (database down) are kept for the next flush."""

    def __init__(self, sm: sessionmaker[Session], interval: float = 1.0) -> None:
        self.sm = sm
        self.interval = interval
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, tenant_id: str, n: int = 1) -> None:
        with self._lock:
            self._counts[tenant_id] = self._counts.get(tenant_id, 0) + n

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="promptstore-request-counter", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        from store import repo
        from store.db import session_scope

        with self._lock:
            counts, self._counts = self._counts, {}
        if not counts:
            return
        try:
            with session_scope(self.sm) as s:
                for tenant_id, n in counts.items():
                    repo.count_request(s, tenant_id=tenant_id, n=n)
        except Exception as exc:  # database errors: keep the counts, say so, try again later
            log.warning("could not write request counts (%s); retrying", type(exc).__name__)
            with self._lock:
                for tenant_id, n in counts.items():
                    self._counts[tenant_id] = self._counts.get(tenant_id, 0) + n

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()


@dataclass
class ServiceState:
    settings: "Settings"
    sessionmaker: sessionmaker[Session]
    objects: ObjectStore
    backbone: BackboneHolder
    inference: "Inference"  # the cross-tenant inference engine (api.engine.Engine)
    dispatcher: "Dispatcher"
    registry: CollectorRegistry
    http_metrics: HttpMetrics
    limiter: "RateLimiter"  # per-tenant and per-address rate limits (api.ratelimit)
    requests: RequestCounter | None = None  # classify requests per tenant, flushed every second
