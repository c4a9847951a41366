"""The batcher: one bounded queue and one forward thread for the requests of every tenant.

The thread closes a batch at ``max_batch`` images or ``max_wait_ms`` after its oldest request
arrived, whichever comes first, and runs it through ``backbone.forward_mixed`` (many tasks and
methods in one forward); each request gets its own rows back, in order. Room in the queue is
reserved at admission (``admit``), before the images are preprocessed, so preprocessing memory
is bounded too; a full queue answers at once (``QueueFull`` -> 503 with Retry-After) instead of
letting latency grow without bound. A queued request whose task has a newer version by the time
its batch forms is answered ``StaleVersion`` (``is_stale``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from api.engine.metrics import BatchDone, BatchTotals, EngineMetrics, RecentRate
from api.engine.request import PendingRequest, Prediction, QueueFull, StaleVersion, UnusableScores

if TYPE_CHECKING:
    import torch

    from backbone import ResidentPrompt
    from backbone.holder import BackboneHolder

log = logging.getLogger("promptstore.engine")

#: (request, first row, end row) of each request's share of a batch.
Slice = tuple[PendingRequest, int, int]


class Batcher:
    """Forms mixed batches from the queue and runs them on ``backbone`` in its own thread.

    ``on_batch(listener)`` calls ``listener(BatchDone)`` in the forward thread after every
    forward (the recent images/s is one such listener); ``totals()`` are the running totals.
    """

    def __init__(
        self,
        backbone: "BackboneHolder",
        metrics: EngineMetrics,
        *,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        is_stale: Callable[[PendingRequest], bool],
    ) -> None:
        self.backbone = backbone
        self.metrics = metrics
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.queue_size = int(queue_size)
        self.is_stale = is_stale
        self._cond = threading.Condition()
        self._queue: deque[PendingRequest] = deque()
        self._queued = 0  # images in the queue, not yet handed to a batch
        self._reserved = 0  # images admitted, still being preprocessed (or their prompt loaded)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._totals = BatchTotals()
        self._listeners: list[Callable[[BatchDone], None]] = []
        self._recent = RecentRate()
        self.on_batch(self._recent.add)
        metrics.queued.set_function(lambda: self._queued + self._reserved)
        metrics.images_per_second.set_function(self.rate)

    # ---- life cycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="promptstore-engine", daemon=True)
        self._thread.start()

    def close(self, reason: str = "the service is shutting down") -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.shed(reason)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ---- measurements

    def on_batch(self, listener: Callable[[BatchDone], None]) -> Callable[[], None]:
        """Call ``listener`` after every forward (in the forward thread; keep it short).
        Returns the function that removes it."""
        with self._cond:
            self._listeners = [*self._listeners, listener]

        def remove() -> None:
            with self._cond:
                self._listeners = [x for x in self._listeners if x is not listener]

        return remove

    def totals(self) -> BatchTotals:
        return self._totals

    def rate(self) -> float:
        """Images per second over the last 10 seconds."""
        return self._recent.rate()

    @property
    def queued_images(self) -> int:
        """Images admitted and not yet in a forward (queued or being preprocessed)."""
        return self._queued + self._reserved

    @property
    def enqueued_images(self) -> int:
        """Images preprocessed and waiting in the queue for a batch: what ``shed()`` answers."""
        return self._queued

    # ---- the queue

    def admit(self, n: int) -> None:
        """Reserve room for ``n`` images or raise QueueFull. A request larger than the
        whole queue is admitted alone, when nothing else is waiting."""
        with self._cond:
            waiting = self._queued + self._reserved
            if self._stop or (waiting + n > self.queue_size and waiting > 0):
                self.metrics.rejected.inc()
                raise QueueFull(waiting, self.queue_size, self._retry_after())
            self._reserved += n

    def release(self, n: int) -> None:
        """Give back room reserved by ``admit`` for images that will not be enqueued."""
        with self._cond:
            self._reserved -= n

    def enqueue(self, req: PendingRequest) -> None:
        """Queue an admitted request (its room moves from reserved to queued)."""
        with self._cond:
            if self._stop:
                raise QueueFull(self._queued, self.queue_size, 1, "the service is shutting down")
            req.enqueued = time.perf_counter()
            req.results = [None] * req.n
            self._queue.append(req)
            self._reserved -= req.n
            self._queued += req.n
            self._cond.notify()

    def shed(self, reason: str = "the inference queue was shed") -> int:
        """Answer every queued request that no forward has taken yet with ``QueueFull`` (a 503
        with Retry-After); a batch already running finishes. Returns the requests shed."""
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
            self._queued = 0
        for req in pending:
            req.resolve(error=QueueFull(0, self.queue_size, 1, reason))
        return len(pending)

    def _retry_after(self) -> int:
        rate = self.rate()
        return max(1, min(30, math.ceil(self._queued / rate))) if rate > 0 else 1

    def _next_batch(self) -> list[Slice] | None:
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
            out: list[Slice] = []
            stale: list[PendingRequest] = []
            while self._queue and room > 0:
                req = self._queue[0]
                if req.taken == 0 and self.is_stale(req):
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
            req.resolve(error=StaleVersion(f"task {req.ref.task_id}: a newer version was published"))
        return out

    # ---- the forward

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[Slice]) -> None:
        import torch

        from backbone import forward_mixed

        started = time.perf_counter()
        for req, start, _ in batch:
            if start == 0:
                self.metrics.queue_wait.observe(started - req.enqueued)
        try:
            bb = self.backbone.get()
            slot: dict[int, int] = {}
            residents: list[ResidentPrompt] = []
            owner_list: list[int] = []
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
                        req.resolve(error=UnusableScores(
                            f"the task's prompt (version {req.ref.version}) is unusable on this service: it {exc} "
                            f"for image {j}; retrain the task (with a lower learning rate if its training was "
                            "unstable)"
                        ))
                    row += end - start
                    req.done += end - start
        except Exception as exc:
            log.exception("inference batch of %d images failed", sum(e - s for _, s, e in batch))
            for req, _, _ in batch:
                req.resolve(error=exc)
            return
        n = images.shape[0]
        now = time.perf_counter()
        self.metrics.forward.observe(now - started)
        self.metrics.batch_size.observe(n)
        self.metrics.images.inc(n)
        done = BatchDone(ended=now, images=n, seconds=now - started)
        self._totals = self._totals.plus(done)
        for listener in self._listeners:
            try:
                listener(done)
            except Exception:  # a listener's bug must not fail the batch's answers
                log.exception("a batch listener failed")
        for req, _, _ in batch:
            if req.done == req.n:
                req.resolve(result=req.results)  # type: ignore[arg-type]


def top_predictions(logits: "torch.Tensor", classes: list[str], top_k: int | None) -> list[Prediction]:
    """logits (C,) -> ``[{"label", "score"}, ...]``: softmax over the classes, best first, cut to top_k.
    Raises ``UnusableScores`` (a 409) rather than answer a NaN score."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    if not bool(torch.isfinite(logits).all() and torch.isfinite(probs).all()):  # never a NaN/null score
        raise UnusableScores("produced non-finite scores (NaN or infinite logits)")
    k = len(classes) if top_k is None else max(1, min(int(top_k), len(classes)))
    scores, order = torch.sort(probs, descending=True)
    return [{"label": classes[i], "score": s} for s, i in zip(scores[:k].tolist(), order[:k].tolist())]
