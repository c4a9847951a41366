"""The load generator of ``promptstore bench serve``: ``clients`` concurrent HTTP clients for
``seconds``, each request classifying a random task's images; images/s and latency
percentiles of what completes inside the window. ``ClientProcess`` runs it in a process of
its own, as real clients are: it must not share the server's interpreter lock (it still
shares the machine's cores)."""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import socket
import statistics
import time
from typing import Any

from api.bench.seeding import SeededTask


def percentiles(lat: list[float]) -> dict[str, float | None]:
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
        **percentiles(lat),
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
