"""The prompt cache: each task's ``ResidentPrompt`` (prompt tensors and derived tensors:
class text features, heads) on the device, an LRU bounded by bytes, one version per task,
loaded once per miss however many requests ask at the same moment (single flight).

Prompts are ordered by the task's serving generation (``ServingRef.generation``), which grows
whenever the served prompt changes, a rollback to an older version included: a newer
generation (seen in a request, which reads it from the database, or announced by another
replica) or a delete evicts the old entry at once, and a request that read an older
generation than the newest this process knows is refused with ``StaleVersion``: no answer
ever comes from a prompt other than the one most recently chosen.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api.engine.metrics import EngineMetrics
from api.engine.request import ServingRef, StaleVersion

if TYPE_CHECKING:
    from backbone import ResidentPrompt

log = logging.getLogger("promptstore.engine")

#: A deleted task's "newest version": every request for it is stale from then on.
DELETED = 2**62


@dataclass
class _Entry:
    version: int
    generation: int
    resident: "ResidentPrompt"
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
        loader: Callable[[ServingRef], "ResidentPrompt"],
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
        self._inflight: dict[tuple[str, int], Future[ResidentPrompt]] = {}
        self._latest: dict[str, int] = {}  # task_id -> newest generation known (DELETED when deleted)
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
        """The newest serving generation known for the task (``DELETED`` once deleted)."""
        return self._latest.get(task_id)

    def get(self, ref: ServingRef) -> "Future[ResidentPrompt]":
        """Future of ``ref``'s ResidentPrompt. Raises StaleVersion when a newer generation is known."""
        announce = False
        with self._lock:
            known = self._latest.get(ref.task_id)
            if known is not None and ref.generation < known:
                raise StaleVersion(
                    f"task {ref.task_id}: serving generation {ref.generation} is older than {known}"
                )
            if known is None or ref.generation > known:
                self._latest[ref.task_id] = ref.generation
                self._drop_task(ref.task_id, "version", keep=ref.generation)
                announce = True
            entry = self._entries.get(ref.task_id)
            if entry is not None and entry.generation == ref.generation:
                self._entries.move_to_end(ref.task_id)
                self.hits += 1
                self.metrics.cache_hits.inc()
                fut: Future[ResidentPrompt] = Future()
                fut.set_result(entry.resident)
                return fut
            self.misses += 1
            self.metrics.cache_misses.inc()
            key = (ref.task_id, ref.generation)
            fut = self._inflight.get(key)
            if fut is None:
                fut = Future()
                self._inflight[key] = fut
                epoch = self._epoch.get(ref.task_id, 0)
                self._loads.submit(self._load, ref, fut, epoch)
        if announce and self.on_new_version is not None:
            self.on_new_version(ref.task_id, ref.generation)
        return fut

    def _load(self, ref: ServingRef, fut: "Future[ResidentPrompt]", epoch: int) -> None:
        key = (ref.task_id, ref.generation)
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
        nbytes = int(resident.nbytes)
        with self._lock:
            self._inflight.pop(key, None)
            current = (
                self._epoch.get(ref.task_id, 0) == epoch
                and self._latest.get(ref.task_id) == ref.generation
            )
            if current and nbytes <= self.budget:
                self._drop_task(ref.task_id, "version")
                while self._entries and self._bytes + nbytes > self.budget:
                    self._drop(next(iter(self._entries)), "budget")
                self._entries[ref.task_id] = _Entry(ref.version, ref.generation, resident, nbytes)
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
        if entry is not None and entry.generation != keep:
            self._drop(task_id, reason)
            self._epoch[task_id] = self._epoch.get(task_id, 0) + 1

    def note_version(self, task_id: str, generation: int | None, reason: str) -> bool:
        """Another source says serving generation ``generation`` is now the task's (None: the
        task was deleted): drop older entries at once and refuse older requests. True when it
        was news."""
        newest = DELETED if generation is None else int(generation)
        with self._lock:
            known = self._latest.get(task_id)
            news = known is None or newest > known
            if news:
                self._latest[task_id] = newest
            entry = self._entries.get(task_id)
            if entry is not None and entry.generation < newest:
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


def _settle(fut: "Future[ResidentPrompt]", *, result: "ResidentPrompt | None" = None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except Exception:  # InvalidStateError: settled meanwhile
        pass
