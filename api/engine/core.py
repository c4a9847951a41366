"""``Engine``: the routes' inference interface, made of the package's components.

A request's images are admitted to the batcher's queue (room reserved), its task's resident
prompt comes from the prompt cache (loaded from the object store on a miss) while the images
are preprocessed in a worker thread, then it joins the queue and awaits its rows of a mixed
forward. Versions seen by the cache are announced to other replicas through the invalidation
bus, and theirs evict here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from api.engine.batcher import Batcher
from api.engine.cache import PromptCache
from api.engine.invalidation import InvalidationBus
from api.engine.metrics import BatchDone, BatchTotals, EngineMetrics, EngineStats
from api.engine.request import PendingRequest, Prediction, PromptUnavailable, ServingRef

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from backbone import Backbone, ResidentPrompt
    from store.objects import ObjectStore
    from backbone.holder import BackboneHolder


class Engine:
    """Batches classify requests of every tenant into mixed forwards (see ``api.engine``).

    ``classify(ref, images, top_k)`` is the whole interface of the routes; ``evict(task_id)``
    is called when a task is deleted, ``published(task_id, version)`` when a job of this
    process published a version. Its parts: ``cache`` (PromptCache), ``batcher`` (Batcher),
    ``bus`` (InvalidationBus, with a Redis URL), ``metrics`` (EngineMetrics).
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
        self.metrics = EngineMetrics(registry or CollectorRegistry())
        self.bus = InvalidationBus(redis_url, self._remote_invalidation) if redis_url else None
        self.cache = PromptCache(cache_bytes, self._load_resident, self.metrics, on_new_version=self._announce)
        self.batcher = Batcher(
            backbone, self.metrics, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
            is_stale=self._is_stale,
        )
        self._open = 0  # classify calls under way (preprocessing, loading, queued or in a forward)
        self._open_lock = threading.Lock()

    # ---- life cycle

    def start(self) -> None:
        self.batcher.start()
        if self.bus is not None:
            self.bus.start()

    def close(self) -> None:
        self.batcher.close("the service is shutting down")
        if self.bus is not None:
            self.bus.close()
        self.cache.close()

    # ---- the routes' interface

    async def classify(
        self, ref: ServingRef, images: list["Image.Image"], top_k: int | None = None
    ) -> list[list[Prediction]]:
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
    ) -> list[list[Prediction]]:
        bb = self.backbone.get()
        if ref.version != 0 and ref.fingerprint != bb.fingerprint:  # version 0 is built here, on this one
            raise PromptUnavailable(
                f"the task's prompt (version {ref.version}) was tuned on backbone {ref.fingerprint.split('#')[0]} "
                f"but this service runs {bb.spec}; retrain the task to use it here"
            )
        n = len(images)
        self.batcher.admit(n)  # the images hold queue room from here: preprocessing memory is bounded too
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
            req = PendingRequest(ref, await resident, batch, top_k, loop, loop.create_future())
            self.batcher.enqueue(req)
            enqueued = True
        finally:
            if not enqueued:
                self.batcher.release(n)
        return await req.future

    def shed(self, reason: str = "the inference queue was shed") -> int:
        """Answer every queued request that no forward has taken yet with ``QueueFull`` (a 503
        with Retry-After); a batch already running finishes. Returns the requests shed."""
        return self.batcher.shed(reason)

    def evict(self, task_id: str) -> None:
        """The task was deleted: forget it here and, through Redis, in every replica."""
        self.cache.note_version(task_id, None, "deleted")
        if self.bus is not None:
            self.bus.publish(task_id, None)

    def published(self, task_id: str, generation: int) -> None:
        """A job of this process published a version, or a request of this process chose one to
        serve, making ``generation`` the task's serving generation: drop the older prompt at
        once (other replicas hear of it through Redis)."""
        self.cache.note_version(task_id, int(generation), "version")

    def served(self, task_id: str, generation: int) -> None:
        """A request of this process chose another version to serve (committed), making
        ``generation`` the task's serving generation: drop the older prompt here and, through
        Redis, in every replica, which from then on refuse requests that read an older one."""
        self.cache.note_version(task_id, int(generation), "version")
        if self.bus is not None:
            self.bus.publish(task_id, int(generation))

    def observe(self, method: str, outcome: str, seconds: float | None = None) -> None:
        self.metrics.requests.labels(method or "unknown", outcome).inc()
        if seconds is not None:
            self.metrics.latency.labels(method or "unknown").observe(seconds)

    # ---- measurements

    def on_batch(self, listener: Callable[[BatchDone], None]) -> Callable[[], None]:
        """``listener(BatchDone)`` after every forward; returns the function that removes it."""
        return self.batcher.on_batch(listener)

    def totals(self) -> BatchTotals:
        """Forwards run, images through them and seconds spent in them, since the start."""
        return self.batcher.totals()

    @property
    def resident_bytes(self) -> int:
        return self.cache.resident_bytes

    @property
    def queued_images(self) -> int:
        """Images admitted and not yet in a forward (queued or being preprocessed)."""
        return self.batcher.queued_images

    @property
    def enqueued_images(self) -> int:
        """Images preprocessed and waiting in the queue for a batch: what ``shed()`` answers."""
        return self.batcher.enqueued_images

    def stats(self) -> EngineStats:
        """A small summary for /readyz and the dashboard."""
        hits, misses = self.cache.hits, self.cache.misses
        totals = self.batcher.totals()
        return {
            "queue_images": self.batcher.queued_images,
            "queue_size": self.batcher.queue_size,
            "max_batch": self.batcher.max_batch,
            "max_wait_ms": self.batcher.max_wait * 1000.0,
            "batches": totals.batches,
            "images": totals.images,
            "images_per_second": round(self.batcher.rate(), 3),
            "cache_entries": len(self.cache),
            "cache_bytes": self.cache.resident_bytes,
            "cache_budget_bytes": self.cache.budget,
            "cache_hit_rate": None if hits + misses == 0 else round(hits / (hits + misses), 4),
            "invalidation": None if self.bus is None else ("redis" if self.bus.subscribed.is_set() else "connecting"),
        }

    # ---- prompt loading and invalidation

    def _load_resident(self, ref: ServingRef) -> "ResidentPrompt":
        from backbone import PromptMismatch, load_prompt, prepare_resident
        from backbone.artifacts import non_finite_tensor

        bb = self.backbone.get()
        if ref.version == 0:
            return _zero_shot_resident(bb, ref)
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
        return prepare_resident(bb, prompt)

    def _is_stale(self, req: PendingRequest) -> bool:
        known = self.cache.latest(req.ref.task_id)
        return known is not None and known > req.ref.generation

    def _announce(self, task_id: str, generation: int) -> None:
        if self.bus is not None:
            self.bus.publish(task_id, generation)

    def _remote_invalidation(self, task_id: str, generation: int | None) -> None:
        self.cache.note_version(task_id, generation, "remote" if generation is not None else "deleted")


def _zero_shot_resident(bb: "Backbone", ref: ServingRef) -> "ResidentPrompt":
    """Version 0 of a task with no version yet: CLIP zero-shot on its class names (the
    ``zeroshot`` method's templates), built here, never stored. PromptUnavailable (409) when the
    backbone has no text tower or a class name's prompt does not fit its text encoder."""
    from backbone import ConfigError, prepare_resident, tune, validate_config
    from backbone.methods import check_class_texts

    if bb.text_tokens is None:
        raise PromptUnavailable(
            f"the backbone {bb.spec} has no text tower to answer with zero-shot predictions before it"
        )
    classes = list(ref.classes)
    try:
        config = validate_config("zeroshot", None)
        check_class_texts("zeroshot", classes, config, bb.text_tokens)
        prompt = tune(bb, "zeroshot", classes, None, None, config).prompt
    except ConfigError as exc:
        raise PromptUnavailable(f"its class names cannot be served zero-shot before it: {exc}") from None
    return prepare_resident(bb, prompt)


def _retrieve(fut: "asyncio.Future[ResidentPrompt]") -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved, so that asyncio does not log it as lost


def _preprocess(bb: "Backbone", images: list["Image.Image"]) -> "torch.Tensor":
    return bb.preprocess_batch(images)  # (n, 3, S, S)
