"""The cross-tenant inference engine: one queue, one batch, one forward for every tenant.

Requests of any task enter one bounded queue. A dedicated thread closes a batch at
``max_batch`` images or ``max_wait_ms`` after its oldest request arrived, whichever comes
first, and runs it through ``backbone.forward_mixed`` (many tasks and methods in one
forward); each request gets its own rows back, in order. Decoding and preprocessing run
in the request's worker thread, so they overlap the forward of the previous batch; the
event loop only moves bytes and futures. A full queue answers at once (``QueueFull`` ->
503 with Retry-After) instead of letting latency grow without bound.

Each task's ``ResidentPrompt`` (prompt tensors and derived tensors: class text features,
heads) lives on the device in ``PromptCache``: an LRU bounded by bytes, one version per
task, loaded once per miss however many requests ask at the same moment (single flight).
A newer version (seen in a request, which reads the served version from the database) or
a delete evicts the old entry at once; with ``PROMPTSTORE_REDIS_URL`` set,
``InvalidationBus`` tells every other replica through Redis pub/sub. A request that read
an older version than the newest this process knows is refused with ``StaleVersion`` (the
route re-reads the database), also when it is already queued, so no request is answered
with a prompt older than one this replica has seen published.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from store.announce import prompt_channel, version_message

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from worker.runtime import BackboneHolder
    from backbone import Backbone, ResidentPrompt
    from store.objects import ObjectStore

log = logging.getLogger("promptstore.engine")

#: A deleted task's "newest version": every request for it is stale from then on.
DELETED = 2**62


@dataclass(frozen=True)
class ServingRef:
    """What classify needs to know about a task's served prompt version."""

    task_id: str
    version: int
    object_key: str
    fingerprint: str
    classes: tuple[str, ...]
    method: str = ""


class PromptUnavailable(Exception):
    """The served prompt cannot be used on this backbone (message is safe for the tenant)."""


class UnusableScores(PromptUnavailable):
    """The prompt produced a NaN or infinite logit: answered as an error (409), never as a score."""


class StaleVersion(Exception):
    """The request read a prompt version older than one this process knows; re-read it."""


class QueueFull(Exception):
    """The inference queue cannot take the request's images now."""

    def __init__(self, queued: int, limit: int, retry_after: int, reason: str | None = None) -> None:
        super().__init__(reason or f"the inference queue is full ({queued} of {limit} images waiting)")
        self.retry_after = retry_after


# --------------------------------------------------------------------------- metrics


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


# --------------------------------------------------------------------------- prompt cache


@dataclass
class _Entry:
    version: int
    resident: Any  # ResidentPrompt
    nbytes: int


class PromptCache:
    """Resident prompts on the device: an LRU over tasks bounded by ``budget_bytes``.

    One version per task. ``get(ref)`` returns a future of the ResidentPrompt: at once on a
    hit; on a miss the first caller starts one load (``loader(ref)``, on a loader thread)
    and every concurrent caller of the same version shares it (single flight). A prompt
    bigger than the whole budget is served but never cached, so the resident bytes never
    exceed the budget (prompts still used by a running batch stay alive until it ends).
    """

    def __init__(
        self,
        budget_bytes: int,
        loader: Callable[[ServingRef], Any],
        metrics: EngineMetrics,
        on_new_version: Callable[[str, int], None] | None = None,
        load_threads: int = 2,
    ) -> None:
        self.budget = int(budget_bytes)
        self.loader = loader
        self.metrics = metrics
        self.on_new_version = on_new_version
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # task_id -> entry, LRU first
        self._inflight: dict[tuple[str, int], Future] = {}
        self._latest: dict[str, int] = {}  # task_id -> newest version known (DELETED when deleted)
        self._epoch: dict[str, int] = {}  # bumped on every eviction of a task: late loads are not cached
        self._bytes = 0
        self.hits = self.misses = self.loads = 0
        self._loads = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="promptstore-load")
        metrics.cache_bytes.set_function(lambda: self._bytes)
        metrics.cache_entries.set_function(lambda: len(self._entries))

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def versions(self) -> dict[str, int]:
        """task_id -> cached version (for tests and the dashboard)."""
        with self._lock:
            return {k: e.version for k, e in self._entries.items()}

    def latest(self, task_id: str) -> int | None:
        return self._latest.get(task_id)

    def get(self, ref: ServingRef) -> Future:
        """Future of ``ref``'s ResidentPrompt. Raises StaleVersion when a newer version is known."""
        announce = False
        with self._lock:
            known = self._latest.get(ref.task_id)
            if known is not None and ref.version < known:
                raise StaleVersion(f"task {ref.task_id}: version {ref.version} is older than {known}")
            if known is None or ref.version > known:
                self._latest[ref.task_id] = ref.version
                self._drop_task(ref.task_id, "version", keep=ref.version)
                announce = True
            entry = self._entries.get(ref.task_id)
            if entry is not None and entry.version == ref.version:
                self._entries.move_to_end(ref.task_id)
                self.hits += 1
                self.metrics.cache_hits.inc()
                fut: Future = Future()
                fut.set_result(entry.resident)
                return fut
            self.misses += 1
            self.metrics.cache_misses.inc()
            key = (ref.task_id, ref.version)
            fut = self._inflight.get(key)
            if fut is None:
                fut = Future()
                self._inflight[key] = fut
                epoch = self._epoch.get(ref.task_id, 0)
                self._loads.submit(self._load, ref, fut, epoch)
        if announce and self.on_new_version is not None:
            self.on_new_version(ref.task_id, ref.version)
        return fut

    def _load(self, ref: ServingRef, fut: Future, epoch: int) -> None:
        key = (ref.task_id, ref.version)
        try:
            with self._lock:
                self.loads += 1
            self.metrics.cache_loads.inc()
            resident = self.loader(ref)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            _settle(fut, error=exc)
            return
        nbytes = int(getattr(resident, "nbytes", 0) or 0)
        with self._lock:
            self._inflight.pop(key, None)
            current = (
                self._epoch.get(ref.task_id, 0) == epoch
                and self._latest.get(ref.task_id) == ref.version
            )
            if current and nbytes <= self.budget:
                self._drop_task(ref.task_id, "version")
                while self._entries and self._bytes + nbytes > self.budget:
                    self._drop(next(iter(self._entries)), "budget")
                self._entries[ref.task_id] = _Entry(ref.version, resident, nbytes)
                self._bytes += nbytes
            elif current:
                log.warning(
                    "task %s: resident prompt of %d bytes exceeds the whole cache budget of %d bytes "
                    "(PROMPTSTORE_PROMPT_CACHE_BYTES); served without caching", ref.task_id, nbytes, self.budget,
                )
        _settle(fut, result=resident)

    def _drop(self, task_id: str, reason: str) -> None:
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self._bytes -= entry.nbytes
            self.metrics.cache_evictions.labels(reason).inc()

    def _drop_task(self, task_id: str, reason: str, keep: int | None = None) -> None:
        entry = self._entries.get(task_id)
        if entry is not None and entry.version != keep:
            self._drop(task_id, reason)
            self._epoch[task_id] = self._epoch.get(task_id, 0) + 1

    def note_version(self, task_id: str, version: int | None, reason: str) -> bool:
        """Another source says ``version`` is now served (None: the task was deleted): drop
        older entries at once and refuse older requests. True when it was news."""
        newest = DELETED if version is None else int(version)
        with self._lock:
            known = self._latest.get(task_id)
            news = known is None or newest > known
            if news:
                self._latest[task_id] = newest
            entry = self._entries.get(task_id)
            if entry is not None and entry.version < newest:
                self._drop(task_id, reason)
            if news:  # a load of an older version still under way must not be cached
                self._epoch[task_id] = self._epoch.get(task_id, 0) + 1
        return news

    def clear(self) -> None:
        with self._lock:
            for task_id in list(self._entries):
                self._drop(task_id, "budget")

    def close(self) -> None:
        self._loads.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- invalidation across replicas


class InvalidationBus:
    """Redis pub/sub between replicas: ``{"task_id", "version"}`` (version null: deleted).

    ``publish`` never raises (a Redis outage costs memory, not correctness: every request
    still reads its served version from the database). The subscriber thread reconnects
    with a back-off and hands other replicas' messages to ``on_message``.
    """

    def __init__(self, url: str, on_message: Callable[[str, int | None], None]) -> None:
        import redis

        self.url = url
        self.on_message = on_message
        self.origin = uuid.uuid4().hex
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.channel = prompt_channel(url)
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptstore-invalidation", daemon=True)
        # Publishing happens on a thread of its own: callers (the event loop among them)
        # never wait on Redis.
        self._outbox: queue.Queue[str | None] = queue.Queue(maxsize=10_000)
        self._publisher = threading.Thread(target=self._publish_loop, name="promptstore-invalidation-pub", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._publisher.start()

    def publish(self, task_id: str, version: int | None) -> None:
        msg = version_message(task_id, version, self.origin)
        try:
            self._outbox.put_nowait(msg)
        except queue.Full:
            log.warning("prompt invalidation outbox full; task %s not announced to other replicas", task_id)

    def _publish_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self._redis.publish(self.channel, msg)
            except Exception as exc:  # redis errors: log and go on, see the class docstring
                log.warning("could not publish a prompt invalidation to Redis: %s", exc)

    def _run(self) -> None:
        import redis

        backoff = 0.5
        while not self._stop.is_set():
            pubsub = None
            try:
                conn = redis.Redis.from_url(self.url, socket_connect_timeout=2, health_check_interval=30)
                pubsub = conn.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self.subscribed.set()
                backoff = 0.5
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        self._handle(msg.get("data"))
            except redis.RedisError as exc:
                self.subscribed.clear()
                log.warning("prompt invalidation subscriber lost Redis (%s); reconnecting in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _handle(self, data: Any) -> None:
        try:
            msg = json.loads(data)
            if msg.get("origin") == self.origin:
                return
            task_id = str(msg["task_id"])
            version = None if msg.get("version") is None else int(msg["version"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed prompt invalidation message: %r", data)
            return
        self.on_message(task_id, version)

    def close(self) -> None:
        self._stop.set()
        if self._publisher.is_alive():
            self._outbox.put(None)  # after what is queued: pending announcements still go out
            self._publisher.join(timeout=3)
        if self._thread.is_alive():
            self._thread.join(timeout=3)


# --------------------------------------------------------------------------- the batcher


@dataclass
class _Request:
    ref: ServingRef
    resident: Any  # ResidentPrompt
    images: "torch.Tensor"  # (n, 3, S, S) preprocessed, CPU
    top_k: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float
    taken: int = 0  # rows handed to a batch so far
    done: int = 0  # rows answered so far
    results: list[Any] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


class Engine:
    """Batches classify requests of every tenant into mixed forwards (see the module doc).

    ``classify(ref, images, top_k)`` is the whole interface of the routes; ``evict(task_id)``
    is called when a task is deleted. ``max_batch`` may be changed at run time (the serve
    benchmark turns batching off with ``max_batch = 1``).
    """

    def __init__(
        self,
        backbone: "BackboneHolder",
        objects: "ObjectStore",
        *,
        cache_bytes: int,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 1024,
        redis_url: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.backbone = backbone
        self.objects = objects
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.queue_size = int(queue_size)
        self.metrics = EngineMetrics(registry or CollectorRegistry())
        self.bus = InvalidationBus(redis_url, self._remote_invalidation) if redis_url else None
        self.cache = PromptCache(cache_bytes, self._load_resident, self.metrics, on_new_version=self._announce)
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._queued = 0  # images in the queue, not yet handed to a batch
        self._reserved = 0  # images admitted, still being preprocessed (or their prompt loaded)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (time, images) of recent batches
        self._recent_lock = threading.Lock()
        self._open = 0  # classify calls under way (preprocessing, loading, queued or in a forward)
        self._open_lock = threading.Lock()
        self.batches = 0  # forwards run (the serve benchmark reads these)
        self.rows = 0  # images through them
        self.forward_s = 0.0  # seconds spent in them
        self.batch_log: list[tuple[float, int]] | None = None  # (end, images) of each batch, when a list
        self.metrics.queued.set_function(lambda: self._queued + self._reserved)
        self.metrics.images_per_second.set_function(self._rate)

    # ---- life cycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="promptstore-engine", daemon=True)
        self._thread.start()
        if self.bus is not None:
            self.bus.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.shed("the service is shutting down")
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.bus is not None:
            self.bus.close()
        self.cache.close()

    # ---- the routes' interface

    async def classify(
        self, ref: ServingRef, images: list["Image.Image"], top_k: int | None = None
    ) -> list[list[dict[str, Any]]]:
        """Per image, ``[{"label", "score"}, ...]`` sorted by score (softmax over the task's
        classes), cut to ``top_k``. Raises ``BackboneNotReady``, ``PromptUnavailable``,
        ``StaleVersion`` or ``QueueFull``."""
        with self._open_lock:
            self._open += 1
        try:
            return await self._classify(ref, images, top_k)
        finally:
            with self._open_lock:
                self._open -= 1

    @property
    def idle(self) -> bool:
        """No classify call under way."""
        return self._open == 0

    async def _classify(
        self, ref: ServingRef, images: list["Image.Image"], top_k: int | None
    ) -> list[list[dict[str, Any]]]:
        bb = self.backbone.get()
        if ref.fingerprint != bb.fingerprint:
            raise PromptUnavailable(
                f"the task's prompt (version {ref.version}) was tuned on backbone {ref.fingerprint.split('#')[0]} "
                f"but this service runs {bb.spec}; retrain the task to use it here"
            )
        n = len(images)
        self._admit(n)  # the images hold queue room from here: preprocessing memory is bounded too
        enqueued = False
        try:
            # The prompt loads (or comes from the cache) while the images are preprocessed. The
            # load is shared by concurrent requests: a client that goes away must not cancel it.
            resident = asyncio.shield(asyncio.wrap_future(self.cache.get(ref)))
            loop = asyncio.get_running_loop()
            try:
                batch = await loop.run_in_executor(None, _preprocess, bb, images)  # (n, 3, S, S)
            except BaseException:
                resident.add_done_callback(_retrieve)
                raise
            req = _Request(ref, await resident, batch, top_k, loop, loop.create_future(), 0.0)
            self._enqueue(req)
            enqueued = True
        finally:
            if not enqueued:
                with self._cond:
                    self._reserved -= n
        return await req.future

    def shed(self, reason: str = "the inference queue was shed") -> int:
        """Answer every queued request that no forward has taken yet with ``QueueFull`` (a 503
        with Retry-After); a batch already running finishes. Returns the requests shed."""
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
            self._queued = 0
        for req in pending:
            _resolve(req, error=QueueFull(0, self.queue_size, 1, reason))
        return len(pending)

    def evict(self, task_id: str) -> None:
        """The task was deleted: forget it here and, through Redis, in every replica."""
        self.cache.note_version(task_id, None, "deleted")
        if self.bus is not None:
            self.bus.publish(task_id, None)

    def observe(self, method: str, outcome: str, seconds: float | None = None) -> None:
        self.metrics.requests.labels(method or "unknown", outcome).inc()
        if seconds is not None:
            self.metrics.latency.labels(method or "unknown").observe(seconds)

    @property
    def resident_bytes(self) -> int:
        return self.cache.resident_bytes

    @property
    def queued_images(self) -> int:
        """Images admitted and not yet in a forward (queued or being preprocessed)."""
        return self._queued + self._reserved

    @property
    def enqueued_images(self) -> int:
        """Images preprocessed and waiting in the queue for a batch: what ``shed()`` answers."""
        return self._queued

    def stats(self) -> dict[str, Any]:
        """A small summary for /readyz and the dashboard."""
        hits, misses = self.cache.hits, self.cache.misses
        return {
            "queue_images": self._queued + self._reserved,
            "queue_size": self.queue_size,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000.0,
            "batches": self.batches,
            "images": self.rows,
            "images_per_second": round(self._rate(), 3),
            "cache_entries": len(self.cache),
            "cache_bytes": self.cache.resident_bytes,
            "cache_budget_bytes": self.cache.budget,
            "cache_hit_rate": None if hits + misses == 0 else round(hits / (hits + misses), 4),
            "invalidation": None if self.bus is None else ("redis" if self.bus.subscribed.is_set() else "connecting"),
        }

    # ---- prompt loading and invalidation

    def _load_resident(self, ref: ServingRef) -> "ResidentPrompt":
        from backbone import PromptMismatch, load_prompt
        from backbone.artifacts import non_finite_tensor

        bb = self.backbone.get()
        data = self.objects.get(ref.object_key)
        try:
            prompt = load_prompt(data, bb)
        except PromptMismatch as exc:
            raise PromptUnavailable(f"{exc}; retrain the task to use it on this backbone") from None
        bad = non_finite_tensor(prompt.tensors)
        if bad is not None:  # e.g. stored by a run that diverged before such runs were failed
            raise PromptUnavailable(
                f"the task's prompt (version {ref.version}) is unusable: its tensor {bad!r} holds NaN or infinite "
                "values (its training diverged); retrain the task with a lower learning rate"
            )
        return bb.prepare(prompt)

    def _announce(self, task_id: str, version: int) -> None:
        if self.bus is not None:
            self.bus.publish(task_id, version)

    def _remote_invalidation(self, task_id: str, version: int | None) -> None:
        self.cache.note_version(task_id, version, "remote" if version is not None else "deleted")

    def published(self, task_id: str, version: int) -> None:
        """A job of this process published ``version``: drop the older one at once (other
        replicas hear of it from the job's own Redis announcement)."""
        self.cache.note_version(task_id, int(version), "version")

    # ---- the queue

    def _admit(self, n: int) -> None:
        """Reserve room for ``n`` images or raise QueueFull. A request larger than the
        whole queue is admitted alone, when nothing else is waiting."""
        with self._cond:
            waiting = self._queued + self._reserved
            if self._stop or (waiting + n > self.queue_size and waiting > 0):
                self.metrics.rejected.inc()
                raise QueueFull(waiting, self.queue_size, self._retry_after())
            self._reserved += n

    def _retry_after(self) -> int:
        rate = self._rate()
        return max(1, min(30, math.ceil(self._queued / rate))) if rate > 0 else 1

    def _enqueue(self, req: _Request) -> None:
        with self._cond:
            if self._stop:
                raise QueueFull(self._queued, self.queue_size, 1, "the service is shutting down")
            req.enqueued = time.perf_counter()
            req.results = [None] * req.n
            self._queue.append(req)
            self._reserved -= req.n
            self._queued += req.n
            self._cond.notify()

    def _next_batch(self) -> list[tuple[_Request, int, int]] | None:
        """Block until a batch closes; its (request, first row, end row) slices."""
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            deadline = self._queue[0].enqueued + self.max_wait
            while not self._stop and self._queued < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._stop:
                return None
            room = self.max_batch
            out: list[tuple[_Request, int, int]] = []
            stale: list[_Request] = []
            while self._queue and room > 0:
                req = self._queue[0]
                known = self.cache.latest(req.ref.task_id)
                if known is not None and known > req.ref.version and req.taken == 0:
                    self._queue.popleft()
                    self._queued -= req.n
                    stale.append(req)
                    continue
                k = min(room, req.n - req.taken)
                out.append((req, req.taken, req.taken + k))
                req.taken += k
                room -= k
                self._queued -= k
                if req.taken == req.n:
                    self._queue.popleft()
        for req in stale:
            _resolve(req, error=StaleVersion(f"task {req.ref.task_id}: a newer version was published"))
        return out

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[tuple[_Request, int, int]]) -> None:
        import torch

        from backbone import forward_mixed

        started = time.perf_counter()
        for req, start, _ in batch:
            if start == 0:
                self.metrics.queue_wait.observe(started - req.enqueued)
        try:
            bb = self.backbone.get()
            slot: dict[int, int] = {}
            residents = []
            owner_list = []
            for req, start, end in batch:
                idx = slot.get(id(req.resident))
                if idx is None:
                    idx = slot[id(req.resident)] = len(residents)
                    residents.append(req.resident)
                owner_list.extend([idx] * (end - start))
            images = torch.cat([req.images[start:end] for req, start, end in batch])  # (B, 3, S, S)
            owner = torch.tensor(owner_list, dtype=torch.long)  # (B,)
            with torch.inference_mode():
                logits = forward_mixed(bb, residents, images, owner)  # B x (n_cls,)
                row = 0
                for req, start, end in batch:
                    classes = req.resident.classes or list(req.ref.classes)
                    try:
                        for j in range(start, end):
                            req.results[j] = top_predictions(logits[row + j - start], classes, req.top_k)
                    except UnusableScores as exc:  # this request fails; the rest of the batch is answered
                        _resolve(req, error=UnusableScores(
                            f"the task's prompt (version {req.ref.version}) is unusable on this service: it {exc} "
                            f"for image {j}; retrain the task (with a lower learning rate if its training was "
                            "unstable)"
                        ))
                    row += end - start
                    req.done += end - start
        except Exception as exc:
            log.exception("inference batch of %d images failed", sum(e - s for _, s, e in batch))
            for req, _, _ in batch:
                _resolve(req, error=exc)
            return
        n = images.shape[0]
        now = time.perf_counter()
        self.metrics.forward.observe(now - started)
        self.metrics.batch_size.observe(n)
        self.metrics.images.inc(n)
        self.batches += 1
        self.rows += n
        self.forward_s += now - started
        if self.batch_log is not None:
            self.batch_log.append((now, n))
        with self._recent_lock:
            self._recent.append((now, n))
        for req, _, end in batch:
            if req.done == req.n:
                _resolve(req, result=req.results)

    def _rate(self) -> float:
        now = time.perf_counter()
        with self._recent_lock:
            while self._recent and self._recent[0][0] < now - 10.0:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / 10.0


def top_predictions(logits: "torch.Tensor", classes: list[str], top_k: int | None) -> list[dict[str, Any]]:
    """logits (C,) -> ``[{"label", "score"}, ...]``: softmax over the classes, best first, cut to top_k.
    Raises ``UnusableScores`` (a 409) rather than answer a NaN score."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    if not bool(torch.isfinite(logits).all() and torch.isfinite(probs).all()):  # never a NaN/null score
        raise UnusableScores("produced non-finite scores (NaN or infinite logits)")
    k = len(classes) if top_k is None else max(1, min(int(top_k), len(classes)))
    scores, order = torch.sort(probs, descending=True)
    return [{"label": classes[i], "score": s} for s, i in zip(scores[:k].tolist(), order[:k].tolist())]


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved, so that asyncio does not log it as lost


def _settle(fut: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except Exception:  # InvalidStateError: settled meanwhile
        pass


def _resolve(req: _Request, *, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if req.future.done():  # the client went away
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(result)

    try:
        req.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # its event loop is closed
        pass


def _preprocess(bb: "Backbone", images: list["Image.Image"]) -> "torch.Tensor":
    return bb.preprocess_batch(images)  # (n, 3, S, S)
