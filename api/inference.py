"""Classification of one request's images with one task's prompt.

A simple per-request path: each request's images go through ``backbone.forward_mixed``
on one dedicated inference thread (never on the event loop), with the task's resident
prompt kept in a small LRU bounded by device bytes. The cross-tenant batching engine
replaces this class behind the same ``classify(task, images, top_k)`` call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:
    from PIL import Image

    from api.state import BackboneHolder
    from backbone import Backbone
    from store.objects import ObjectStore

log = logging.getLogger("promptstore.api")


@dataclass(frozen=True)
class ServingRef:
    """What classify needs to know about a task's served prompt version."""

    task_id: str
    version: int
    object_key: str
    fingerprint: str
    classes: tuple[str, ...]


class PromptUnavailable(Exception):
    """The served prompt cannot be used on this backbone (message is safe for the tenant)."""


class Inference:
    def __init__(self, backbone: "BackboneHolder", objects: "ObjectStore", cache_bytes: int) -> None:
        self.backbone = backbone
        self.objects = objects
        self.cache_bytes = int(cache_bytes)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptstore-infer")
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._resident_bytes = 0

    async def classify(
        self, task: ServingRef, images: list["Image.Image"], top_k: int | None = None
    ) -> list[list[dict[str, Any]]]:
        """Per image, ``[{"label", "score"}, ...]`` sorted by score (softmax over the task's
        classes), cut to ``top_k``. Raises ``BackboneNotReady`` or ``PromptUnavailable``."""
        bb = self.backbone.get()
        if task.fingerprint != bb.fingerprint:
            raise PromptUnavailable(
                f"the task's prompt (version {task.version}) was tuned on backbone {task.fingerprint.split('#')[0]} "
                f"but this service runs {bb.spec}; retrain the task to use it here"
            )
        batch = await run_in_threadpool(_preprocess, bb, images)  # (B, 3, S, S)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._classify_sync, bb, task, batch, top_k)

    def _classify_sync(self, bb: "Backbone", task: ServingRef, batch: Any, top_k: int | None) -> list[list[dict[str, Any]]]:
        import torch

        from backbone import forward_mixed

        resident = self._resident(bb, task)
        owner = torch.zeros(batch.shape[0], dtype=torch.long)  # (B,)
        with torch.inference_mode():
            logits = forward_mixed(bb, [resident], batch, owner)  # list of (n_cls,)
        classes = list(getattr(resident, "classes", None) or task.classes)
        k = len(classes) if top_k is None else max(1, min(int(top_k), len(classes)))
        out = []
        for row in logits:
            probs = torch.softmax(row.float(), dim=-1)
            scores, idx = torch.sort(probs, descending=True)
            out.append([{"label": classes[int(i)], "score": float(s)} for s, i in zip(scores[:k], idx[:k])])
        return out

    def _resident(self, bb: "Backbone", task: ServingRef) -> Any:
        key = (task.task_id, task.version)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        from backbone import PromptMismatch, load_prompt

        data = self.objects.get(task.object_key)
        try:
            prompt = load_prompt(data, bb)
        except PromptMismatch as exc:
            raise PromptUnavailable(f"{exc}; retrain the task to use it on this backbone") from None
        resident = bb.prepare(prompt)
        nbytes = int(getattr(resident, "nbytes", 0) or 0)
        with self._lock:
            # A new version replaces the old one at once.
            for old in [k for k in self._cache if k[0] == task.task_id]:
                self._drop(old)
            self._cache[key] = resident
            self._resident_bytes += nbytes
            while self._resident_bytes > self.cache_bytes and len(self._cache) > 1:
                self._drop(next(iter(self._cache)))
        return resident

    def _drop(self, key: tuple[str, int]) -> None:
        resident = self._cache.pop(key, None)
        if resident is not None:
            self._resident_bytes -= int(getattr(resident, "nbytes", 0) or 0)

    def evict(self, task_id: str) -> None:
        """Forget every cached version of the task (deleted or re-published)."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == task_id]:
                self._drop(key)

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _preprocess(bb: "Backbone", images: list["Image.Image"]) -> Any:
    import torch

    return torch.stack([bb.preprocess(img) for img in images])  # (B, 3, S, S)
