"""The device prompt cache: bounded by bytes, one load per miss however many requests ask
at once, and a retrained or deleted task is never answered with its old prompt."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import httpx
import pytest
import torch
from enginetest_helpers import _assert_same, _metric, _post
from PIL import Image
from psdata import dataset_zip, image_bytes

from api.engine import ServingRef, StaleVersion
from backbone import load_prompt, prepare_resident
from backbone.holder import get_backbone
from store.db import get_sessionmaker
from store.objects import get_object_store



def _resident_nbytes(settings: Any, task_id: str) -> int:
    from store import repo
    from store.db import session_scope

    bb = get_backbone(settings.backbone, settings.device)
    with session_scope(get_sessionmaker(settings.database_url)) as s:
        task = repo.get_task_for_job(s, task_id)
        key = repo.get_served_version(s, task_id, tenant_id=task.tenant_id).object_key  # type: ignore[union-attr]
    return prepare_resident(bb, load_prompt(get_object_store(settings).get(key), bb)).nbytes


def test_cache_never_exceeds_its_byte_budget(settings_factory: Any, serve: Any, seed: Any) -> None:
    probe = settings_factory()
    methods = ["zeroshot", "coop", "vpt-shallow", "vpt-deep", "padding", "linear-probe"]
    tasks = seed(probe, 2 * len(methods), methods)
    sizes = {t.task_id: _resident_nbytes(probe, t.task_id) for t in tasks}
    budget = 2 * max(sizes.values()) + min(sizes.values()) // 2
    app = serve(probe.model_copy(update={"prompt_cache_bytes": budget, "max_wait_ms": 0}))
    for rnd in range(2):
        for t in tasks:
            r = _post(app.url, t, [image_bytes(rnd)])
            assert r.status_code == 200, r.text
            assert app.engine.cache.resident_bytes <= budget
            assert app.engine.cache.resident_bytes == sum(sizes[k] for k in app.engine.cache.versions())
    metrics = httpx.get(f"{app.url}/metrics").text
    assert _metric(metrics, "promptstore_prompt_cache_resident_bytes") <= budget
    assert _metric(metrics, 'promptstore_prompt_cache_evictions_total{reason="budget"}') >= len(tasks)
    assert 1 <= len(app.engine.cache) < len(tasks)

    # A prompt bigger than the whole budget is served, never cached.
    tiny = serve(probe.model_copy(update={"prompt_cache_bytes": min(sizes.values()) - 1, "max_wait_ms": 0}))
    r = _post(tiny.url, tasks[0], [image_bytes(0)])
    assert r.status_code == 200, r.text
    assert tiny.engine.cache.resident_bytes == 0 and len(tiny.engine.cache) == 0


def test_concurrent_misses_load_once(settings_factory: Any, serve: Any, seed: Any) -> None:
    settings = settings_factory(max_batch=4, max_wait_ms=1)
    (task,) = seed(settings, 1, ["coop"])
    app = serve(settings)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=app.url, timeout=60) as http:
            files = [("images", ("a.png", image_bytes(2), "image/png"))]
            return await asyncio.gather(
                *(http.post(f"/v1/tasks/{task.task_id}/classify", files=files, headers=task.headers) for _ in range(16))
            )

    rs = asyncio.run(burst())
    assert [r.status_code for r in rs] == [200] * 16
    for r in rs[1:]:  # the same answer (up to float rounding: batches of different sizes)
        _assert_same(r.json()["predictions"], rs[0].json()["predictions"])
    assert app.engine.cache.loads == 1
    metrics = httpx.get(f"{app.url}/metrics").text
    assert _metric(metrics, "promptstore_prompt_cache_loads_total") == 1
    assert _metric(metrics, "promptstore_prompt_cache_misses_total") + _metric(
        metrics, "promptstore_prompt_cache_hits_total"
    ) == 16

    # The tenant's request counter gets the 16 requests (written in one flush, not 16 UPDATEs).
    from store import repo
    from store.db import session_scope

    app.state.requests.flush()
    with session_scope(app.state.sessionmaker) as s:
        assert repo.get_tenant(s, repo.get_task_for_job(s, task.task_id).tenant_id).request_count == 16  # type: ignore[union-attr]


def _expected(api: Any, headers: dict[str, str], task_id: str, img: bytes) -> tuple[int, list[tuple[str, float]]]:
    """(version, [(label, score)] best first) computed from the downloaded prompt alone."""
    r = api.client.get(f"/v1/tasks/{task_id}/prompt", headers=headers)
    assert r.status_code == 200
    bb = api.state.backbone.get()
    resident = prepare_resident(bb, load_prompt(r.content, bb))
    x = bb.preprocess(Image.open(io.BytesIO(img)).convert("RGB")).unsqueeze(0)
    probs = torch.softmax(resident.forward(x)[0], dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    return int(r.headers["X-Prompt-Version"]), [(resident.classes[i], float(probs[i])) for i in order]


def _answers(r: Any) -> list[tuple[str, float]]:
    assert r.status_code == 200, r.text
    return [(p["label"], p["score"]) for p in r.json()["predictions"][0]]


def _close(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [x for x, _ in a] == [x for x, _ in b] and all(abs(p - q) < 1e-4 for (_, p), (_, q) in zip(a, b))


@pytest.mark.parametrize("method", ["linear-probe", "vpt-shallow"])
def test_retrained_task_is_never_answered_with_its_old_prompt(method: str, settings_factory: Any, make_api: Any) -> None:
    api = make_api(settings_factory(max_wait_ms=0))
    tenant = api.tenant()
    config = {"linear-probe": {"l2_grid": [1.0], "max_iter": 30}, "vpt-shallow": {"epochs": 2, "n_tokens": 2}}[method]
    task = api.create_task(tenant, method, dataset=dataset_zip(("cat", "dog", "owl"), per_class=4), config=config).json()
    api.wait_ready(tenant, task["id"])
    img = image_bytes(1, seed=9)
    classify = lambda: api.client.post(  # noqa: E731
        f"/v1/tasks/{task['id']}/classify", files=[("images", ("a.png", img, "image/png"))], headers=tenant
    )
    v1, old = _expected(api, tenant, task["id"], img)
    r = classify()
    assert v1 == 1 and r.json()["version"] == 1 and _close(_answers(r), old)
    engine = api.state.inference
    assert engine.cache.versions()[task["id"]] == 1

    other = {"linear-probe": {"l2_grid": [0.001], "max_iter": 30, "seed": 3}, "vpt-shallow": {"epochs": 3, "n_tokens": 2, "seed": 5}}
    r = api.client.post(f"/v1/tasks/{task['id']}/retrain", data={"config": json.dumps(other[method])}, headers=tenant)
    assert r.status_code == 202, r.text
    api.wait(tenant, task["id"], lambda t: t["version"] == 2)
    # The job told this process's engine: version 1 left the cache before any request asked.
    assert task["id"] not in engine.cache.versions()
    v2, new = _expected(api, tenant, task["id"], img)
    assert v2 == 2 and not _close(new, old)
    for _ in range(3):
        r = classify()
        assert r.json()["version"] == 2 and _close(_answers(r), new)
    assert engine.cache.versions()[task["id"]] == 2  # the old entry is gone, at once
    metrics = api.client.get("/metrics").text
    assert _metric(metrics, 'promptstore_prompt_cache_evictions_total{reason="version"}') == 1

    # A request that read version 1 before the publish is refused and re-read, never served v1.
    stale = ServingRef(task["id"], 1, "unused", api.state.backbone.get().fingerprint, ("cat", "dog", "owl"), method)
    with pytest.raises(StaleVersion):
        engine.cache.get(stale)

    # Delete: evicted at once; the task is gone for classify.
    assert api.client.delete(f"/v1/tasks/{task['id']}", headers=tenant).status_code == 204
    assert task["id"] not in engine.cache.versions()
    assert classify().status_code == 404
    metrics = api.client.get("/metrics").text
    assert _metric(metrics, 'promptstore_prompt_cache_evictions_total{reason="deleted"}') == 1
