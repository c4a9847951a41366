"""What the engine is measured against, each on a state of its own (the service's shared
backbone and its engine are never changed by a baseline):

  in-process references  ``time_forward``: a function of a preprocessed batch timed alone
                         (the bare image tower, the one-task prompted forward);
  (b) one request one forward  ``one_request_one_forward_app``: the service itself, built
                         with ``max_batch = 1`` (no batching), on the same store;
  (c) naive reload per switch  ``naive_app``: the service's routes with ``NaiveServer`` as
                         its inference, a model-per-tenant server with a backbone of its own
                         that it reloads from a checkpoint on every task switch.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from api.engine import Prediction, QueueFull, ServingRef, top_predictions

if TYPE_CHECKING:
    from fastapi import FastAPI
    from PIL import Image

    from api.engine import EngineStats
    from backbone import Backbone, ResidentPrompt
    from store.objects import ObjectStore
    from store.settings import Settings


# --------------------------------------------------------------------------- in-process references


def _sync(bb: "Backbone") -> None:
    import torch

    if bb.device.type == "cuda":
        torch.cuda.synchronize(bb.device)


def time_forward(
    bb: "Backbone", fn: Callable[[Any], Any], batch: int, seconds: float, min_rounds: int = 1
) -> dict[str, float]:
    """Images/s of ``fn(images)`` (median round) on random preprocessed images (B, 3, S, S),
    rounds until ``seconds`` have passed and at least ``min_rounds`` ran."""
    import torch

    s = bb.image_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(bb.device, bb.dtype)
    with torch.inference_mode():
        if bb.device.type == "cuda":
            fn(x)  # kernels for this batch size (on CPU the engine runs have warmed up everything)
        _sync(bb)
        times = []
        t_end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            fn(x)
            _sync(bb)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() >= t_end and len(times) >= min_rounds:
                break
    med = statistics.median(times)
    return {"images_per_s": batch / med, "median_s": med, "batch": batch, "rounds": len(times)}


class NaiveServer:
    """The model-per-tenant baseline behind the routes' inference interface
    (``api.engine.Inference``): one request at a time, and on every task switch the task's
    model state is loaded again (the backbone weights from a safetensors checkpoint into
    its own backbone, the prompt from the object store, then prepared on the device)."""

    def __init__(self, bb: "Backbone", objects: "ObjectStore", checkpoint: Path) -> None:
        self.bb = bb  # its own backbone (``naive_app`` loads one): the service's stays untouched
        self.objects = objects
        self.checkpoint = checkpoint
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptstore-naive")
        self._current: tuple[tuple[str, int], ResidentPrompt] | None = None
        self.switches = 0
        self.closing = False  # set at the end of its run: what is still queued is refused
        self.busy_s = 0.0  # seconds spent serving (it serves one request at a time)
        self.served = 0  # images served
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def idle(self) -> bool:
        return self._busy == 0

    async def classify(
        self, ref: ServingRef, images: list["Image.Image"], top_k: int | None = None
    ) -> list[list[Prediction]]:
        if self.closing:
            raise QueueFull(0, 0, 1, "the naive baseline's window is over")
        loop = asyncio.get_running_loop()
        with self._lock:
            self._busy += 1
        try:
            return await loop.run_in_executor(self._executor, self._classify, ref, images, top_k)
        finally:
            with self._lock:
                self._busy -= 1

    def _classify(self, ref: ServingRef, images: list["Image.Image"], top_k: int | None) -> list[list[Prediction]]:
        import torch
        from safetensors.torch import load_model

        from backbone import forward_mixed, load_prompt, prepare_resident

        if self.closing:
            raise QueueFull(0, 0, 1, "the naive baseline's window is over")
        started = time.perf_counter()
        key = (ref.task_id, ref.version)
        if self._current is None or self._current[0] != key:
            load_model(self.bb.model, str(self.checkpoint), device=str(self.bb.device))
            resident = prepare_resident(self.bb, load_prompt(self.objects.get(ref.object_key), self.bb))
            self._current = (key, resident)
            self.switches += 1
        resident = self._current[1]
        x = torch.stack([self.bb.preprocess(img) for img in images])  # (n, 3, S, S)
        with torch.inference_mode():
            logits = forward_mixed(self.bb, [resident], x, torch.zeros(x.shape[0], dtype=torch.long))
        out = [top_predictions(row, resident.classes, top_k) for row in logits]
        self.busy_s += time.perf_counter() - started
        self.served += len(images)
        return out

    def observe(self, method: str, outcome: str, seconds: float | None = None) -> None:
        pass

    def evict(self, task_id: str) -> None:
        if self._current is not None and self._current[0][0] == task_id:
            self._current = None

    def published(self, task_id: str, version: int) -> None:
        self.evict(task_id)

    def served(self, task_id: str, generation: int) -> None:
        self.evict(task_id)

    def stats(self) -> "EngineStats":
        return {
            "queue_images": 0, "queue_size": 1, "max_batch": 1, "max_wait_ms": 0.0, "batches": self.switches,
            "images": self.served, "images_per_second": 0.0, "cache_entries": int(self._current is not None),
            "cache_bytes": 0 if self._current is None else self._current[1].nbytes, "cache_budget_bytes": 0,
            "cache_hit_rate": None, "invalidation": None,
        }

    def start(self) -> None:
        pass

    def close(self) -> None:
        self._executor.shutdown(wait=True)


# --------------------------------------------------------------------------- baseline apps


def one_request_one_forward_app(settings: "Settings") -> "FastAPI":
    """(b): the service on the same store, its engine built with ``max_batch = 1``."""
    from api.app import create_app

    return create_app(settings.model_copy(update={"max_batch": 1}))


def naive_app(settings: "Settings", checkpoint: Path) -> tuple["FastAPI", NaiveServer]:
    """(c): the service's routes on the same store with a ``NaiveServer`` as inference. It
    loads a backbone of its own (never the process's shared one, which its reloads would
    overwrite) and saves its weights to ``checkpoint``, which it reloads on every switch."""
    from safetensors.torch import save_model

    from api.app import create_app
    from backbone import load_backbone
    from store.objects import get_object_store

    bb = load_backbone(settings.backbone, settings.device)
    save_model(bb.model, str(checkpoint))
    server = NaiveServer(bb, get_object_store(settings), checkpoint)
    return create_app(settings, inference=server), server
