"""What a classify request carries into the engine, what it gets back and what it may raise,
and the interface the routes call (``Inference``): the engine's public surface."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypedDict

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from api.engine.metrics import EngineStats
    from backbone import ResidentPrompt


@dataclass(frozen=True)
class ServingRef:
    """What classify needs to know about a task's served prompt version. ``generation``: the
    task's serving generation (``Task.serving_generation``), which grows whenever the served
    prompt changes, also when ``version`` goes back (a rollback); the engine orders prompts by
    it. Left at -1 it is ``version`` (callers that never roll back: tests, benchmarks)."""

    task_id: str
    version: int
    object_key: str
    fingerprint: str
    classes: tuple[str, ...]
    method: str = ""
    generation: int = -1
    #: The task's default classify threshold (``Task.min_score``); None: none.
    min_score: float | None = None
    #: The task's own method (``method`` is the served prompt's: with ``auto`` they differ).
    task_method: str = ""

    @property
    def takes_samples(self) -> bool:
        """The task is tuned on images, so an image kept by classify may become its sample."""
        from backbone.methods import get_method

        try:
            return get_method(self.task_method or self.method).needs_dataset
        except Exception:  # a method this release does not know: it surely takes images
            return True

    def __post_init__(self) -> None:
        if self.generation < 0:
            object.__setattr__(self, "generation", int(self.version))


class Prediction(TypedDict):
    """One class of one image's answer: softmax score over the task's classes."""

    label: str
    score: float


class PromptUnavailable(Exception):
    """The served prompt cannot be used on this backbone (message is safe for the tenant)."""


class UnusableScores(PromptUnavailable):
    """The prompt produced a NaN or infinite logit: answered as an error (409), never as a score."""


class StaleVersion(Exception):
    """The request read a prompt of a serving generation older than one this process knows
    (a newer version was published, or the tenant chose another one); re-read it."""


class QueueFull(Exception):
    """The inference queue cannot take the request's images now."""

    def __init__(self, queued: int, limit: int, retry_after: int, reason: str | None = None) -> None:
        super().__init__(reason or f"the inference queue is full ({queued} of {limit} images waiting)")
        self.retry_after = retry_after


@dataclass
class PendingRequest:
    """A request in the batcher: its preprocessed images, its resident prompt, and the
    event-loop future its answer goes to. A request may be split over several batches."""

    ref: ServingRef
    resident: "ResidentPrompt"
    images: "torch.Tensor"  # (n, 3, S, S) preprocessed, CPU
    top_k: int | None
    loop: asyncio.AbstractEventLoop
    future: "asyncio.Future[list[list[Prediction]]]"
    enqueued: float = 0.0
    taken: int = 0  # rows handed to a batch so far
    done: int = 0  # rows answered so far
    results: list[list[Prediction] | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    def resolve(self, *, result: list[list[Prediction]] | None = None, error: BaseException | None = None) -> None:
        """Answer the request on its event loop (from any thread); a no-op when its client
        went away or its loop is closed."""

        def settle() -> None:
            if self.future.done():  # the client went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # its event loop is closed
            pass


class Inference(Protocol):
    """What the routes, the app's life cycle and the dashboard call on ``ServiceState.inference``
    (``api.engine.Engine`` in the service)."""

    async def classify(
        self, ref: ServingRef, images: list["Image.Image"], top_k: int | None = None
    ) -> list[list[Prediction]]: ...

    def observe(self, method: str, outcome: str, seconds: float | None = None) -> None: ...

    def evict(self, task_id: str) -> None: ...

    def published(self, task_id: str, generation: int) -> None: ...

    def served(self, task_id: str, generation: int) -> None: ...

    def stats(self) -> "EngineStats": ...

    def start(self) -> None: ...

    def close(self) -> None: ...
