"""The engine's measurements: its Prometheus metrics, the record of each batch it runs, its
running totals, the recent images/s and the summary that /readyz and the dashboard show."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TypedDict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Window of the recent images/s (``promptstore_engine_images_per_second``, ``stats()``).
RATE_WINDOW_S = 10.0


class EngineMetrics:
    """The engine's Prometheus metrics, in the app's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "promptstore_engine_batch_size", "Images per forward of the inference engine.",
            registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.queue_wait = Histogram(
            "promptstore_engine_queue_wait_seconds", "Time a request's images waited in the queue before their forward.",
            registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.forward = Histogram(
            "promptstore_engine_forward_seconds", "Time of one batched forward (heads and top-k included).",
            registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.images = Counter("promptstore_engine_images_total", "Images classified by the engine.", registry=registry)
        self.images_per_second = Gauge(
            "promptstore_engine_images_per_second", "Images classified per second over the last 10 seconds.",
            registry=registry,
        )
        self.queued = Gauge("promptstore_engine_queue_images", "Images waiting in the inference queue.", registry=registry)
        self.rejected = Counter(
            "promptstore_engine_rejected_total", "Requests refused because the queue was full (503).", registry=registry
        )
        self.cache_hits = Counter("promptstore_prompt_cache_hits_total", "Requests whose prompt was resident.", registry=registry)
        self.cache_misses = Counter(
            "promptstore_prompt_cache_misses_total", "Requests whose prompt was not resident.", registry=registry
        )
        self.cache_loads = Counter(
            "promptstore_prompt_cache_loads_total", "Prompt loads from the object store (one per miss, single flight).",
            registry=registry,
        )
        self.cache_evictions = Counter(
            "promptstore_prompt_cache_evictions_total",
            "Resident prompts dropped, by reason: budget (LRU), version (a newer one), deleted, remote (another replica).",
            ["reason"], registry=registry,
        )
        self.cache_bytes = Gauge(
            "promptstore_prompt_cache_resident_bytes", "Device bytes held by cached resident prompts.", registry=registry
        )
        self.cache_entries = Gauge("promptstore_prompt_cache_entries", "Resident prompts cached.", registry=registry)
        self.requests = Counter(
            "promptstore_classify_requests_total", "Classify requests by task method and outcome.",
            ["method", "outcome"], registry=registry,
        )
        self.latency = Histogram(
            "promptstore_classify_latency_seconds", "Classify latency (request read to answer) by task method.",
            ["method"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


@dataclass(frozen=True)
class BatchDone:
    """One forward the batcher ran: when it ended (``time.perf_counter()``), its images and
    the seconds it took (heads and top-k included)."""

    ended: float
    images: int
    seconds: float


@dataclass(frozen=True)
class BatchTotals:
    """The batcher's running totals since it was built; subtract two to measure a window."""

    batches: int = 0  # forwards run
    images: int = 0  # images through them
    forward_s: float = 0.0  # seconds spent in them

    def plus(self, batch: BatchDone) -> "BatchTotals":
        return BatchTotals(self.batches + 1, self.images + batch.images, self.forward_s + batch.seconds)

    def __sub__(self, other: "BatchTotals") -> "BatchTotals":
        return BatchTotals(self.batches - other.batches, self.images - other.images, self.forward_s - other.forward_s)


class RecentRate:
    """Images per second over the last ``window`` seconds, fed with each ``BatchDone``."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._recent: deque[tuple[float, int]] = deque()  # (end, images) of recent batches
        self._lock = threading.Lock()

    def add(self, batch: BatchDone) -> None:
        with self._lock:
            self._recent.append((batch.ended, batch.images))

    def rate(self) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window


class EngineStats(TypedDict):
    """The engine's summary in /readyz (``engine``) and on the dashboard's overview."""

    queue_images: int
    queue_size: int
    max_batch: int
    max_wait_ms: float
    batches: int
    images: int
    images_per_second: float
    cache_entries: int
    cache_bytes: int
    cache_budget_bytes: int
    cache_hit_rate: float | None
    invalidation: str | None
