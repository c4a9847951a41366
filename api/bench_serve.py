"""``promptstore bench serve``: the whole service under load, against what it replaces.

Starts the service in this process (uvicorn on a free port, embedded SQLite and file://
objects in a temporary folder), publishes ``--tasks`` ready tasks of mixed methods across
``--tenants`` tenants straight through the store (each prompt is its method's own
initialisation plus noise, ``backbone.tuning.random_prompt``: serving cost does not depend
on how well a prompt was tuned), then drives ``--clients`` concurrent HTTP clients (from a
process of their own: raw keep-alive HTTP/1.1, a fraction of a millisecond of CPU per
request) for ``--seconds`` seconds per scenario, each request classifying ``--images``
image(s) of a random task.

Two scenarios, each with its own N tasks:
  features  zeroshot, coop, linear-probe: the image path is untouched, so the reference
            is (a) the bare image tower at the mean batch size the engine formed;
  mixed     every method (VPT and padding included): the reference is (a') the one-task
            prompted forward, each method's images through one task of that method at the
            same batch size (same prompt lengths, no mixing), weighted by the served mix.
On the mixed tasks also, through the same HTTP service and clients:
  (b) one request one forward: the engine with ``max_batch = 1`` (no batching);
  (c) a naive server: one request at a time, and on every task switch it loads the task's
      model state (the backbone weights from a checkpoint, the prompt from the object
      store, prepared on the device), as a model-per-tenant server does. It serves one
      request at a time, so its images/s is images over the time it was busy (its answers
      over HTTP are in the JSON too).
The engine's seconds are split into ``--rounds`` windows, each followed by its in-process
reference (at the mean batch size formed so far), so that a drift of the machine's speed
hits both alike; the reference is the mean over rounds. Served images/s is the steady
state: the images of the batches that ended inside a window after its first two, over the
time they took (a window opens on an idle service, and its first batches fill the
pipeline); the whole-window figure (answers over the time to the last of them) is printed
and written too.
Prints a table and writes JSON; ratios are measured in the one run.

    promptstore bench serve                              # ViT-B-32 random, CPU, 100 tasks, 32 clients
    promptstore bench serve --backbone open_clip:tiny:random --tasks 6 --clients 4 --seconds 2
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from fastapi import FastAPI

    from api.engine import ServingRef
    from backbone import Backbone
    from store.settings import Settings

DEFAULT_BACKBONE = "open_clip:ViT-B-32:random"
DEFAULT_OUT = "bench-results/serve.json"
FEATURE_METHODS = ("zeroshot", "coop", "linear-probe")
TEXT_METHODS = ("zeroshot", "coop", "cocoop")
#: Configs of the published prompts: one per method, so all its tasks share their prompt length.
SERVE_CONFIGS: dict[str, dict[str, Any]] = {
    "zeroshot": {"templates": "single"},
    "coop": {"n_ctx": 16},
    "cocoop": {},
    "vpt-shallow": {"n_tokens": 10},
    "vpt-deep": {"n_tokens": 10},
    "padding": {},
    "linear-probe": {},
}
TARGETS = {"features_vs_tower": 0.9, "mixed_vs_one_task": 0.9, "vs_one_request_one_forward": 1.5, "vs_naive_reload": 20.0}


# --------------------------------------------------------------------------- seeding tasks


@dataclass(frozen=True)
class SeededTask:
    task_id: str
    method: str
    tenant: int  # index into the tenants' keys
    headers: dict[str, str]


def seed_tasks(
    settings: "Settings",
    bb: "Backbone",
    *,
    n_tasks: int,
    n_tenants: int,
    methods: list[str],
    n_classes: int = 4,
    seed: int = 0,
) -> list[SeededTask]:
    """Create ``n_tenants`` tenants and ``n_tasks`` ready tasks (methods round-robin, tenants
    round-robin) whose first version is published through ``store.publish`` exactly as a
    tuning job publishes it. Each method's prompt is built once (``random_prompt``); every
    task gets its own class names and its own noise on the learned tensors."""
    import torch

    from backbone import TrainedPrompt
    from backbone.tuning import random_prompt
    from store import repo
    from store.db import session_scope
    from store.publish import publish_prompt
    from worker import runtime

    sm = runtime.get_sessionmaker(settings.database_url)
    objects = runtime.get_object_store(settings)
    keys = []
    run = secrets.token_hex(3)
    with session_scope(sm) as s:
        for i in range(n_tenants):
            tenant, key = repo.create_tenant(s, f"bench-{run}-tenant-{i}")
            keys.append((tenant.id, key))
    base: dict[str, TrainedPrompt] = {}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n_tasks):
        method = methods[t % len(methods)]
        tenant_i = t % n_tenants
        tenant_id, key = keys[tenant_i]
        classes = [f"object {seed + t} {c}" for c in range(n_classes)]
        if method not in base:
            base[method] = random_prompt(bb, method, classes, SERVE_CONFIGS.get(method, {}), seed=seed)
        b = base[method]
        tensors = {
            k: (v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v).contiguous()
            for k, v in b.tensors.items()
        }
        prompt = TrainedPrompt(b.method, b.config, classes, b.fingerprint, tensors)
        with session_scope(sm) as s:
            task = repo.create_task(
                s, tenant_id=tenant_id, name=f"bench task {t}", method=method, config=prompt.config, classes=classes
            )
            task_id = task.id
        with session_scope(sm) as s:
            repo.claim_run(s, task_id, 1)
        data = prompt.to_bytes(extra={"version": "1", "task_id": task_id, "attempt": "1"})
        pv = publish_prompt(
            sm, objects, task_id=task_id, attempt=1, data=data, fingerprint=bb.fingerprint, classes=classes, metrics={}
        )
        if pv is None:
            raise RuntimeError(f"could not publish bench task {task_id}")
        out.append(SeededTask(task_id, method, tenant_i, {"Authorization": f"Bearer {key}"}))
    return out


# --------------------------------------------------------------------------- the server in a thread


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: "FastAPI") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", log_config=None, access_log=False, backlog=4096)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


# --------------------------------------------------------------------------- load


def make_images(size: int, n: int = 8, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEG images of ``size`` px (noise over a colour, like photos compress)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, size=3)
        arr = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _percentiles(lat: list[float]) -> dict[str, float | None]:
    if not lat:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    s = sorted(lat)

    def q(p: float) -> float:
        return 1000.0 * s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99), "mean_ms": 1000.0 * statistics.fmean(s)}


class _Conn:
    """One keep-alive HTTP/1.1 connection of the load generator. Raw asyncio streams, with
    each request's bytes built by hand: on a 2-core machine the clients share the cores with
    the server, and a full client library (httpx measured about 8 ms of CPU per request)
    would take a tenth of the machine from the service it measures."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.reader is not None
        try:
            self.writer.write(head + body)
            status_line, _, rest = (await self.reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
            headers = {}
            for line in rest.split(b"\r\n"):
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            status = int(status_line.split(b" ", 2)[1])
            if b"content-length" not in headers:
                raise ConnectionError(f"HTTP {status} answer without a Content-Length")
            data = await self.reader.readexactly(int(headers[b"content-length"]))
        except BaseException:
            self.close()
            raise
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _classify_request(host: str, task: SeededTask, images: list[bytes], boundary: str) -> tuple[bytes, bytes]:
    """(head, body) of a multipart classify request for ``task`` with ``images``."""
    parts = []
    for j, img in enumerate(images):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{j}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode() + img + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST /v1/tasks/{task.task_id}/classify?top_k=1 HTTP/1.1\r\nHost: {host}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in task.headers.items())
        + f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def steady_state(batch_log: list[tuple[float, int]], window_end: float, skip: int = 2) -> dict[str, Any]:
    """Served images/s once the pipeline is full: the images of the batches that ended inside
    the window after the first ``skip`` (a window opens on an idle service: its first batch
    closes on the few requests already decoded, the next on what queued meanwhile), over the
    time from the end of batch ``skip`` to the end of the last one. Each batch's answers go
    out over HTTP as it ends."""
    ends = [(t, n) for t, n in batch_log if t <= window_end]
    if len(ends) < skip + 2:
        return {"steady_images_per_s": None, "steady_images": 0, "steady_s": 0.0}
    images, secs = sum(n for _, n in ends[skip + 1:]), ends[-1][0] - ends[skip][0]
    return {"steady_images_per_s": images / secs if secs > 0 else None, "steady_images": images, "steady_s": secs}


def served_rate(d: dict[str, Any]) -> float:
    """The served images/s the ratios use: steady state where the window had enough batches."""
    return d.get("steady_images_per_s") or d["images_per_s"]


def merge_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One result of several ``_drive`` windows: images over the summed serving time,
    percentiles over every latency; each window kept under ``windows`` (without latencies)."""
    lat = [x for w in windows for x in w.pop("latencies_s")]
    secs = sum(w["seconds"] for w in windows)
    errors: dict[str, int] = {}
    for w in windows:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    images = sum(w["images"] for w in windows)
    forward_s = sum(w.get("forward_s", 0.0) for w in windows)
    batches, rows = sum(w.get("batches", 0) for w in windows), sum(w.get("rows", 0) for w in windows)
    steady_images, steady_s = sum(w.get("steady_images", 0) for w in windows), sum(w.get("steady_s", 0.0) for w in windows)
    return {
        "images_per_s": images / secs if secs > 0 else 0.0,
        "requests": sum(w["requests"] for w in windows),
        "images": images,
        "seconds": secs,
        "window_s": sum(w["window_s"] for w in windows),
        "errors": errors,
        "client_cpu_s": sum(w["client_cpu_s"] for w in windows),
        "server_cpu_s": sum(w.get("server_cpu_s", 0.0) for w in windows),
        "batches": batches,
        "rows": rows,
        "mean_batch": rows / batches if batches else None,
        "steady_images_per_s": steady_images / steady_s if steady_s > 0 else None,
        "steady_images": steady_images,
        "steady_s": steady_s,
        "forward_s": forward_s,
        "forward_images_per_s": rows / forward_s if forward_s > 0 else None,
        **_percentiles(lat),
        "windows": windows,
    }


async def _drive(
    url: str, tasks: list[SeededTask], *, clients: int, seconds: float, images: list[bytes], per_request: int, seed: int
) -> dict[str, Any]:
    """Counts what completes inside the window; requests still open at its end are dropped."""
    from urllib.parse import urlsplit

    parsed = urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", int(parsed.port or 80)
    boundary = secrets.token_hex(16)
    lat: list[float] = []
    counts = {"images": 0, "requests": 0}
    errors: dict[str, int] = {}
    conns = [_Conn(host, port) for _ in range(clients)]
    cpu0 = time.process_time()
    start = time.perf_counter()
    stop_at = start + seconds
    last = [start]  # the last completion inside the window

    async def client(i: int) -> None:
        rnd = random.Random(seed * 1000 + i)
        conn = conns[i]
        while time.perf_counter() < stop_at:
            task = rnd.choice(tasks)
            head, body = _classify_request(parsed.netloc, task, [rnd.choice(images) for _ in range(per_request)], boundary)
            t0 = time.perf_counter()
            try:
                status, _ = await conn.post(head, body)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.05)
                continue
            t1 = time.perf_counter()
            if t1 > stop_at:
                return
            if status == 200:
                lat.append(t1 - t0)
                counts["images"] += per_request
                counts["requests"] += 1
                last[0] = max(last[0], t1)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1
                if status == 503:
                    await asyncio.sleep(0.05)

    running = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.wait(running, timeout=seconds)
    for t in running:
        t.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    for c in conns:
        c.close()
    client_cpu = time.process_time() - cpu0
    # Served images over the time it took to serve them: from the start to the last answer
    # inside the window (a batch still running at the end counts neither its images nor its time).
    served_s = last[0] - start
    return {
        "images_per_s": counts["images"] / served_s if served_s > 0 else 0.0,
        "requests": counts["requests"],
        "images": counts["images"],
        "seconds": served_s,
        "window_s": seconds,
        "errors": errors,
        "client_cpu_s": client_cpu,
        "latencies_s": lat,
        **_percentiles(lat),
    }


def drive(url: str, tasks: list[SeededTask], **kw: Any) -> dict[str, Any]:
    """``clients`` concurrent HTTP clients for ``seconds``: images/s and latency percentiles."""
    return asyncio.run(_drive(url, tasks, **kw))


class ClientProcess:
    """Runs ``drive`` in a process of its own, as real clients are: the load generator
    must not share the server's interpreter lock (it still shares the machine's cores)."""

    def __init__(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def drive(self, url: str, tasks: list[SeededTask], **kw: Any) -> dict[str, Any]:
        return self._pool.submit(drive, url, tasks, **kw).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def wait_idle(server: Any, timeout: float = 300.0) -> float:
    """Until ``server`` (the engine or a NaiveServer) has finished the requests the clients
    left open at the end of a window (so they do not slow the next one); seconds waited."""
    t0 = time.perf_counter()
    quiet_since = None
    while time.perf_counter() - t0 < timeout:
        if server.idle:
            quiet_since = quiet_since or time.perf_counter()
            if time.perf_counter() - quiet_since > 0.3:
                break
        else:
            quiet_since = None
        time.sleep(0.02)
    return time.perf_counter() - t0


def warm(url: str, engine: Any, settings: "Settings", tasks: list[SeededTask], images: list[bytes]) -> None:
    """Load every task's prompt into the engine's cache (as the first request of each task
    would, without its forward), then one request over HTTP for one task of each method (the
    engine windows skip their first batches anyway; this checks that every method answers)."""
    import httpx

    from api.engine import ServingRef
    from store import repo
    from store.db import session_scope
    from worker import runtime

    sm = runtime.get_sessionmaker(settings.database_url)
    futures = []
    with session_scope(sm) as s:
        for t in tasks:
            task = repo.get_task_for_job(s, t.task_id)
            pv = repo.get_served_version(s, t.task_id, tenant_id=task.tenant_id)  # type: ignore[union-attr]
            ref = ServingRef(t.task_id, pv.version, pv.object_key, pv.fingerprint, tuple(task.classes), task.method)  # type: ignore[union-attr]
            futures.append(engine.cache.get(ref))
    for f in futures:
        f.result()

    async def go() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600.0) as http:

            async def one(t: SeededTask) -> None:
                r = await http.post(
                    f"/v1/tasks/{t.task_id}/classify", files=[("images", ("w.jpg", images[0], "image/jpeg"))],
                    headers=t.headers,
                )
                if r.status_code != 200:
                    raise RuntimeError(f"warm-up classify of task {t.task_id} ({t.method}) failed: {r.text}")

            first = {t.method: t for t in reversed(tasks)}  # the first task of each method
            await asyncio.gather(*(one(t) for t in first.values()))

    asyncio.run(go())


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
    """The model-per-tenant baseline behind the engine's ``classify`` interface: one request
    at a time, and on every task switch the task's model state is loaded again (the
    backbone weights from a safetensors checkpoint, the prompt from the object store, then
    prepared on the device)."""

    def __init__(self, bb: "Backbone", objects: Any, checkpoint: Path) -> None:
        self.bb = bb
        self.objects = objects
        self.checkpoint = checkpoint
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptstore-naive")
        self._current: tuple[tuple[str, int], Any] | None = None
        self.switches = 0
        self.closing = False  # set at the end of its run: what is still queued is refused
        self.busy_s = 0.0  # seconds spent serving (it serves one request at a time)
        self.served = 0  # images served
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def idle(self) -> bool:
        return self._busy == 0

    async def classify(self, ref: "ServingRef", images: list[Any], top_k: int | None = None) -> list[list[dict[str, Any]]]:
        from api.engine import QueueFull

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

    def _classify(self, ref: "ServingRef", images: list[Any], top_k: int | None) -> list[list[dict[str, Any]]]:
        import torch

        from api.engine import QueueFull

        if self.closing:
            raise QueueFull(0, 0, 1, "the naive baseline's window is over")
        from safetensors.torch import load_model

        from api.engine import top_predictions
        from backbone import forward_mixed, load_prompt

        started = time.perf_counter()
        key = (ref.task_id, ref.version)
        if self._current is None or self._current[0] != key:
            load_model(self.bb.model, str(self.checkpoint), device=str(self.bb.device))
            resident = self.bb.prepare(load_prompt(self.objects.get(ref.object_key), self.bb))
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

    def close(self) -> None:
        self._executor.shutdown(wait=True)


# --------------------------------------------------------------------------- the run


def _machine(bb: "Backbone") -> dict[str, Any]:
    from backbone.bench import machine_info

    return machine_info(bb.device)


def run(
    *,
    backbone: str = DEFAULT_BACKBONE,
    device: str | None = None,
    tasks: int = 100,
    tenants: int = 10,
    clients: int = 32,
    seconds: float = 24.0,
    rounds: int = 2,
    baseline_seconds: float | None = None,
    images_per_request: int = 1,
    max_batch: int | None = None,
    max_wait_ms: float = 5.0,
    classes: int = 4,
    threads: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_model

    from api.app import create_app
    from store.migrate import upgrade
    from store.settings import Settings
    from worker import runtime

    if threads:
        torch.set_num_threads(threads)
    # The engine's time per scenario is split into ``rounds`` windows, each followed by its
    # reference; the batch-1 and naive baselines reach their steady state at once (and sit
    # far from their targets), so a few seconds do.
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    base_s = baseline_seconds if baseline_seconds is not None else max(2.0, min(3.0, seconds / 2))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="promptstore-bench-serve-") as tmp:
        root = Path(tmp)
        bb = runtime.get_backbone(backbone, device)
        dev = bb.device
        if max_batch is None:  # on a CPU, images/s barely grows past 16: shorter batches, finer timing
            max_batch = 256 if dev.type == "cuda" else 16
        settings = Settings(
            database_url=f"sqlite:///{root / 'promptstore.db'}",
            object_store_url=f"file://{root / 'objects'}",
            backbone=backbone,
            device=device,
            admin_token=secrets.token_urlsafe(16),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            queue_size=max(1024, 4 * clients * images_per_request),
            max_classify_images=max(64, images_per_request),
            classify_rate=0,  # the bench measures the engine, not the per-tenant limit
        )
        upgrade(settings.database_url)
        log(f"backbone {bb.fingerprint} on {dev} ({bb.dtype}); seeding 2 x {tasks} tasks across {tenants} tenants ...")
        features = [m for m in FEATURE_METHODS if bb.has_text or m not in TEXT_METHODS]
        every = [m for m in SERVE_CONFIGS if bb.has_text or m not in TEXT_METHODS]
        t0 = time.perf_counter()
        feat_tasks = seed_tasks(settings, bb, n_tasks=tasks, n_tenants=tenants, methods=features, n_classes=classes, seed=seed)
        # The mixed scenario takes its feature-path tasks from the first scenario (already
        # resident) and adds tasks of the other methods: N tasks, methods round-robin.
        plan = [every[t % len(every)] for t in range(tasks)]
        reuse = {m: [t for t in feat_tasks if t.method == m] for m in features}
        others = [m for m in plan if m not in reuse]
        fresh = iter(seed_tasks(
            settings, bb, n_tasks=len(others), n_tenants=tenants, methods=others, n_classes=classes, seed=seed + tasks
        )) if others else iter(())
        mixed_tasks = [reuse[m].pop(0) if m in reuse and reuse[m] else next(fresh) for m in plan]
        seed_s = time.perf_counter() - t0
        images = make_images(bb.image_size + bb.image_size // 8, seed=seed)
        app = create_app(settings)
        state = app.state.ps
        engine = state.inference
        res: dict[str, Any] = {
            "benchmark": "serve",
            "backbone": bb.fingerprint,
            "dtype": str(bb.dtype).replace("torch.", ""),
            "machine": _machine(bb),
            "params": {
                "tasks_per_scenario": tasks, "tenants": tenants, "clients": clients, "seconds": seconds, "rounds": rounds,
                "baseline_seconds": base_s, "images_per_request": images_per_request, "max_batch": max_batch,
                "max_wait_ms": max_wait_ms, "classes_per_task": classes, "seed": seed,
                "features_methods": features, "mixed_methods": every,
            },
            "setup_s": {"seed_tasks": seed_s},
        }
        with closing(ClientProcess()) as clients_proc, ServerThread(app) as server:
            if not state.backbone.wait(600) or state.backbone.error:
                raise RuntimeError(f"backbone did not load: {state.backbone.error}")

            def served(name: str, task_list: list[SeededTask], secs: float, run_seed: int = seed) -> dict[str, Any]:
                b0, r0, f0, c0 = engine.batches, engine.rows, engine.forward_s, time.process_time()
                engine.batch_log = batch_log = []
                window_end = time.perf_counter() + secs  # the clients' window ends a little later
                out = clients_proc.drive(
                    server.url, task_list, clients=clients, seconds=secs, images=images,
                    per_request=images_per_request, seed=run_seed,
                )
                engine.batch_log = None
                out.update(steady_state(batch_log, window_end))
                nb, nr = engine.batches - b0, engine.rows - r0
                out["server_cpu_s"] = time.process_time() - c0
                out["mean_batch"] = nr / nb if nb else None
                out["batches"] = nb
                out["rows"] = nr
                # rows over seconds inside forwards: the forward's own speed under the HTTP load
                # (the rest of the gap to the reference is time the forward thread waited)
                out["forward_s"] = engine.forward_s - f0
                out["forward_images_per_s"] = nr / out["forward_s"] if out["forward_s"] > 0 else None
                out["shed_after_window"] = engine.shed()  # answered after the window: not waited for
                out["drain_s"] = wait_idle(engine)
                log(f"{name}: {out['images_per_s']:.2f} img/s, p50 {out['p50_ms'] or 0:.0f} ms, "
                    f"p99 {out['p99_ms'] or 0:.0f} ms, mean batch {out['mean_batch'] or 0:.1f}, errors {out['errors']}")
                return out

            def alternate(
                name: str, task_list: list[SeededTask], reference: Callable[[int], dict[str, Any]]
            ) -> tuple[dict[str, Any], dict[str, Any]]:
                """``rounds`` engine windows of ``seconds / rounds``, each followed by its in-process
                reference at the mean batch size the engine formed so far. The speed of a shared
                machine drifts (on a 2-core VM the same forward varied by a third within a minute):
                a reference timed beside each window drifts with it."""
                windows, refs = [], []
                for i in range(rounds):
                    windows.append(served(f"{name} {i + 1}/{rounds}", task_list, seconds / rounds, seed * 100 + i))
                    nb, nr = sum(w["batches"] for w in windows), sum(w["rows"] for w in windows)
                    refs.append(reference(max(1, round(nr / nb)) if nb else 1))
                out = merge_windows(windows)
                ref = {
                    "images_per_s": statistics.fmean(r["images_per_s"] for r in refs),
                    "batch": refs[-1]["batch"],
                    "each_round": refs,
                }
                out["round_ratios"] = [
                    served_rate(w) / r["images_per_s"] if r["images_per_s"] else None for w, r in zip(windows, refs)
                ]
                log(f"{name}: {served_rate(out):.2f} img/s in steady state over {rounds} windows "
                    f"({out['images_per_s']:.2f} over whole windows); reference {ref['images_per_s']:.2f} img/s")
                return out, ref

            from backbone import forward_mixed

            def tower_at(b: int) -> dict[str, Any]:
                return time_forward(bb, lambda x: bb.vision.forward(x).embeds.float().cpu(), b, base_s / 2, 2)

            t0 = time.perf_counter()
            warm(server.url, engine, settings, feat_tasks, images)
            res["setup_s"]["warm_features"] = time.perf_counter() - t0
            feat, tower = alternate("features: engine", feat_tasks, tower_at)
            log(f"(a) bare image tower at batch {tower['batch']}: {tower['images_per_s']:.2f} img/s")

            t0 = time.perf_counter()
            warm(server.url, engine, settings, mixed_tasks, images)
            res["setup_s"]["warm_mixed"] = time.perf_counter() - t0
            residents: dict[str, Any] = {}
            for t in mixed_tasks:
                if t.method not in residents:
                    residents[t.method] = _resident_of(engine, t.task_id)
            share = {m: sum(1 for t in mixed_tasks if t.method == m) / len(mixed_tasks) for m in residents}

            def one_task_at(b: int) -> dict[str, Any]:
                per_method = {
                    m: time_forward(
                        bb, lambda x, r=r: forward_mixed(bb, [r], x, torch.zeros(x.shape[0], dtype=torch.long)),
                        b, max(0.5, base_s / (2 * len(residents))),
                    )
                    for m, r in residents.items()
                }
                ips = 1.0 / sum(share[m] / per_method[m]["images_per_s"] for m in residents)
                return {"images_per_s": ips, "batch": b, "per_method": per_method}

            mixed, one_task = alternate("mixed: engine", mixed_tasks, one_task_at)
            one_task["share"] = share
            one_task["per_method"] = {
                m: statistics.fmean(r["per_method"][m]["images_per_s"] for r in one_task["each_round"]) for m in residents
            }
            log(f"(a') one-task prompted forward at batch {one_task['batch']}, weighted by the mix: "
                f"{one_task['images_per_s']:.2f} img/s")

            engine.max_batch = 1
            try:
                batch1 = served("mixed: one request one forward", mixed_tasks, base_s)
                batch1.pop("latencies_s")
            finally:
                engine.max_batch = max_batch

            checkpoint = root / "backbone.safetensors"
            save_model(bb.model, str(checkpoint))
            naive_server = NaiveServer(bb, state.objects, checkpoint)
            state.inference = naive_server
            try:
                naive = clients_proc.drive(
                    server.url, mixed_tasks, clients=clients, seconds=base_s, images=images,
                    per_request=images_per_request, seed=seed + 1,
                )
                naive.pop("latencies_s")
                naive["task_switches"] = naive_server.switches
                naive_server.closing = True
                naive["drain_s"] = wait_idle(naive_server)
                # It serves one request at a time, so its capacity is images over busy time:
                # more precise than the few answers that fit in a short window on a CPU.
                naive["http_images_per_s"] = naive["images_per_s"]
                naive["busy_s"] = naive_server.busy_s
                naive["images_per_s"] = naive_server.served / naive_server.busy_s if naive_server.busy_s else 0.0
                log(f"mixed: naive reload-per-switch: {naive['images_per_s']:.2f} img/s, "
                    f"p50 {naive['p50_ms'] or 0:.0f} ms, {naive_server.switches} switches")
            finally:
                state.inference = engine
                naive_server.close()

        res["features"] = {"engine": feat, "bare_tower": tower}
        res["mixed"] = {
            "engine": mixed,
            "one_task_prompted": one_task,
            "one_request_one_forward": batch1,
            "naive_reload_per_switch": naive,
        }
        served_mixed = served_rate(mixed)
        ratios = {
            "features_vs_tower": served_rate(feat) / tower["images_per_s"],
            "mixed_vs_one_task": served_mixed / one_task["images_per_s"],
            "vs_one_request_one_forward": served_mixed / served_rate(batch1) if served_rate(batch1) else None,
            "vs_naive_reload": served_mixed / naive["images_per_s"] if naive["images_per_s"] else None,
        }
        res["ratios_whole_windows"] = {
            "features_vs_tower": feat["images_per_s"] / tower["images_per_s"],
            "mixed_vs_one_task": mixed["images_per_s"] / one_task["images_per_s"],
        }
        res["ratios"] = ratios
        res["targets"] = {k: {"min": v, "met": ratios[k] is not None and ratios[k] >= v} for k, v in TARGETS.items()}
        res["total_s"] = time.perf_counter() - t_start
    return res


def _resident_of(engine: Any, task_id: str) -> Any:
    """The engine's cached resident prompt of ``task_id`` (warmed up before)."""
    entry = engine.cache._entries.get(task_id)
    if entry is None:
        raise RuntimeError(f"task {task_id} is not resident after the warm-up; raise PROMPTSTORE_PROMPT_CACHE_BYTES")
    return entry.resident


def format_table(res: dict[str, Any]) -> str:
    p, m = res["params"], res["machine"]
    f, x, r = res["features"], res["mixed"], res["ratios"]

    def row(label: str, d: dict[str, Any], batch: Any = "", ips: float | None = None) -> str:
        def ms(k: str) -> str:
            return f"{d[k]:>8.0f}" if d.get(k) is not None else f"{'-':>8}"

        ips = d["images_per_s"] if ips is None else ips
        return f"{label:<46}{ips:>10.2f}{ms('p50_ms')}{ms('p95_ms')}{ms('p99_ms')}{str(batch):>8}"

    def steady(label: str, d: dict[str, Any]) -> str:
        return f"{label:<46}{served_rate(d):>10.2f}"

    mb = lambda d: f"{d['mean_batch']:.1f}" if d.get("mean_batch") else "-"  # noqa: E731
    lines = [
        f"serve bench: {res['backbone']} {res['dtype']} on {m['device']} ({m['device_name']}), torch {m['torch']}, "
        f"{m['torch_threads']} threads / {m['cpu_count']} cpus",
        f"{p['tasks_per_scenario']} tasks per scenario across {p['tenants']} tenants, {p['clients']} clients x "
        f"{p['images_per_request']} image(s)/request, {p['seconds']:g}s per engine run in {p['rounds']} windows, "
        f"max_batch {p['max_batch']}, "
        f"max_wait {p['max_wait_ms']:g} ms",
        "",
        f"{'':<46}{'images/s':>10}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'batch':>8}",
        f"features ({', '.join(p['features_methods'])})",
        row("  engine over HTTP, whole windows", f["engine"], mb(f["engine"])),
        steady("  engine over HTTP, steady state", f["engine"]),
        row("  (a) bare image tower, in-process", f["bare_tower"], f["bare_tower"]["batch"]),
        f"mixed ({', '.join(p['mixed_methods'])})",
        row("  engine over HTTP, whole windows", x["engine"], mb(x["engine"])),
        steady("  engine over HTTP, steady state", x["engine"]),
        row("  (a') one-task prompted forward, in-process", x["one_task_prompted"], x["one_task_prompted"]["batch"]),
        row("  (b) one request one forward, HTTP, steady", x["one_request_one_forward"], mb(x["one_request_one_forward"]),
            served_rate(x["one_request_one_forward"])),
        row("  (c) naive reload per task switch, HTTP", x["naive_reload_per_switch"], 1),
        "",
    ]
    names = {
        "features_vs_tower": "features engine / (a) bare tower",
        "mixed_vs_one_task": "mixed engine / (a') one-task prompted",
        "vs_one_request_one_forward": "mixed engine / (b) one request one forward",
        "vs_naive_reload": "mixed engine / (c) naive reload per switch",
    }
    for k, label in names.items():
        t = res["targets"][k]
        v = r[k]
        lines.append(
            f"{label:<46}{(f'{v:.3f}' if v is not None else '-'):>10}   target >= {t['min']:g}: "
            f"{'met' if t['met'] else 'NOT met'}"
        )
    w = res["ratios_whole_windows"]
    lines.append(
        f"(over whole windows, fill included: features {w['features_vs_tower']:.3f}, mixed {w['mixed_vs_one_task']:.3f}; "
        f"per round: features {', '.join(f'{v:.2f}' for v in f['engine']['round_ratios'])}, "
        f"mixed {', '.join(f'{v:.2f}' for v in x['engine']['round_ratios'])})"
    )
    lines.append(f"\ntotal {res['total_s']:.0f}s")
    return "\n".join(lines)


def run_serve_bench(out: str = DEFAULT_OUT, **kw: Any) -> dict[str, Any]:
    """Entry point of ``promptstore bench serve``: run, print the table, write JSON."""
    res = run(**kw)
    print(format_table(res), flush=True)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {path}", flush=True)
    return res
