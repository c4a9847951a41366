"""What the overview shows about the serving side: backbone, job queue and workers, prompt
cache, request rate. Each part degrades to a readable "unavailable (why)" instead of failing
the page, and nothing here blocks a render on the network: the broker is probed in a
background thread and the page shows the last answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from api.engine import EngineStats, Inference
from api.state import ServiceState
from backbone.holder import BackboneNotReady

if TYPE_CHECKING:
    from worker.dispatch import Dispatcher

log = logging.getLogger("promptstore.api")

#: How long a broker probe answer is shown before the next probe starts.
PROBE_INTERVAL_S = 10.0
#: Window of the request rate.
RATE_WINDOW_S = 60.0


def backbone_info(state: ServiceState) -> dict[str, Any]:
    """``{"id", "weights", "device", "status", "random"}``; ``random`` drives the warning."""
    try:
        bb = state.backbone.get()
    except BackboneNotReady as exc:
        return {"id": state.settings.backbone, "weights": None, "device": None, "status": str(exc), "random": False}
    weights = getattr(bb, "weights", None)
    return {
        "id": bb.spec,
        "weights": weights,
        "device": str(getattr(bb, "device", "")),
        "status": "ok",
        "random": weights == "random",
    }


def serving_fingerprint(state: ServiceState) -> str | None:
    """The fingerprint of the backbone this service runs (a version made on another one cannot
    be served); None while it loads or when it failed to."""
    try:
        fp = getattr(state.backbone.get(), "fingerprint", None)
    except BackboneNotReady:
        return None
    return str(fp) if fp else None


def cache_info(inference: Inference) -> dict[str, Any]:
    """Prompt cache size and hit rate, queue and throughput, from the engine's ``stats()``
    (``api.engine.EngineStats``); all None (shown as such) when it fails."""
    stats: EngineStats | None = None
    try:
        stats = inference.stats()
    except Exception as exc:  # an engine bug must not take the dashboard down
        log.warning("admin: %s.stats() failed: %s", type(inference).__name__, exc)
    if stats is None:
        return dict.fromkeys(
            ("prompts", "resident_bytes", "capacity_bytes", "hit_rate", "queued_images", "images_per_second", "batches")
        )
    return {
        "prompts": stats["cache_entries"],
        "resident_bytes": stats["cache_bytes"],
        "capacity_bytes": stats["cache_budget_bytes"],
        "hit_rate": stats["cache_hit_rate"],
        "queued_images": stats["queue_images"],
        "images_per_second": stats["images_per_second"],
        "batches": stats["batches"],
    }


@dataclass
class BrokerProbe:
    """A remote dispatcher's queue depth and live workers (``Dispatcher.queue_depth``,
    ``workers_alive``), refreshed in a background thread at most every ``PROBE_INTERVAL_S``."""

    dispatcher: "Dispatcher"
    result: dict[str, Any] = field(default_factory=lambda: {"checked_at": None})
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _running: bool = False

    def get(self) -> dict[str, Any]:
        with self._lock:
            stale = self.result["checked_at"] is None or time.time() - self.result["checked_at"] > PROBE_INTERVAL_S
            if stale and not self._running:
                self._running = True
                threading.Thread(target=self._probe, name="promptstore-admin-probe", daemon=True).start()
            return dict(self.result)

    def _probe(self) -> None:
        out: dict[str, Any] = {"queue_length": None, "queue_error": None, "workers": [], "workers_error": None}
        try:
            out["queue_length"] = self.dispatcher.queue_depth()
        except Exception as exc:
            out["queue_error"] = f"broker unreachable ({type(exc).__name__})"
        try:
            out["workers"] = self.dispatcher.workers_alive()
        except Exception as exc:
            out["workers_error"] = f"no answer ({type(exc).__name__})"
        out["checked_at"] = time.time()
        with self._lock:
            self.result = out
            self._running = False


class RateMeter:
    """Requests per second over the last ``RATE_WINDOW_S``, from samples of a monotonically
    growing total taken whenever the overview is read (the first read has no rate yet)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def rate(self, total: float, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._samples.append((now, total))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
                self._samples.popleft()
            t0, n0 = self._samples[0]
        if now - t0 < 0.5:
            return None
        return max(0.0, total - n0) / (now - t0)


def served_requests(state: ServiceState) -> float:
    """Requests answered so far by this process, the admin pages' own left out."""
    total = 0.0
    for metric in state.http_metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and not str(sample.labels.get("route", "")).startswith("/admin"):
                total += sample.value
    return total


def jobs_info(state: ServiceState, runs: dict[str, int], probe: BrokerProbe | None) -> dict[str, Any]:
    """Queue depth and workers: the in-process thread pool, or the Celery broker and workers."""
    dispatcher = state.dispatcher
    info: dict[str, Any] = {"kind": dispatcher.kind, "queued_runs": runs["queued"], "running_runs": runs["running"]}
    if dispatcher.kind == "threads" or probe is None:  # in this process: asked at once
        depth = dispatcher.queue_depth()
        info.update(
            queue_depth=depth if depth is not None else runs["queued"],
            queue_note="runs waiting for a job thread",
            workers=dispatcher.workers_alive(),
            workers_note=None,
        )
        return info
    got = probe.get()
    waiting = got.get("queue_length")
    info.update(
        queue_depth=waiting if waiting is not None else runs["queued"],
        queue_note=got.get("queue_error") or ("messages on the broker" if waiting is not None else "checking the broker…"),
        workers=list(got.get("workers") or []),
        workers_note=got.get("workers_error")
        or (None if got.get("checked_at") else "asking workers…")
        or (None if got.get("workers") else "no worker answered the last ping"),
    )
    return info
