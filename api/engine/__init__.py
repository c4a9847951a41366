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

One module per component: ``request`` (``ServingRef``, ``Prediction``, the errors, the
``Inference`` interface the routes call), ``metrics`` (Prometheus metrics, batch totals,
``EngineStats``), ``cache`` (``PromptCache``), ``invalidation`` (``InvalidationBus``),
``batcher`` (``Batcher``: the queue and the forward thread) and ``core`` (``Engine``, which
puts them together).
"""

from api.engine.batcher import Batcher, top_predictions
from api.engine.cache import DELETED, PromptCache
from api.engine.core import Engine
from api.engine.invalidation import InvalidationBus
from api.engine.metrics import BatchDone, BatchTotals, EngineMetrics, EngineStats
from api.engine.request import (
    Inference,
    PendingRequest,
    Prediction,
    PromptUnavailable,
    QueueFull,
    ServingRef,
    StaleVersion,
    UnusableScores,
)

__all__ = [
    "DELETED",
    "BatchDone",
    "BatchTotals",
    "Batcher",
    "Engine",
    "EngineMetrics",
    "EngineStats",
    "Inference",
    "InvalidationBus",
    "PendingRequest",
    "Prediction",
    "PromptCache",
    "PromptUnavailable",
    "QueueFull",
    "ServingRef",
    "StaleVersion",
    "UnusableScores",
    "top_predictions",
]
