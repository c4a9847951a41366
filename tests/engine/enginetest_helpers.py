"""Helpers of the engine tests: classify over real HTTP, compare answers, read /metrics."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx


def _post(url: str, task: Any, images: list[bytes], top_k: int | None = None) -> httpx.Response:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    q = "" if top_k is None else f"?top_k={top_k}"
    return httpx.post(f"{url}/v1/tasks/{task.task_id}/classify{q}", files=files, headers=task.headers, timeout=60)


async def _concurrent(url: str, calls: list[tuple[Any, list[bytes]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def one(task: Any, images: list[bytes]) -> httpx.Response:
            files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
            return await http.post(f"/v1/tasks/{task.task_id}/classify", files=files, headers=task.headers)

        return await asyncio.gather(*(one(t, imgs) for t, imgs in calls))


def _assert_same(a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]]) -> None:
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert sorted(p["label"] for p in pa) == sorted(p["label"] for p in pb)
        sa, sb = {p["label"]: p["score"] for p in pa}, {p["label"]: p["score"] for p in pb}
        for label in sa:
            assert abs(sa[label] - sb[label]) < 1e-4, (label, sa[label], sb[label])


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))
