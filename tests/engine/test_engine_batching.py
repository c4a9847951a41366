"""The dynamic batcher: a batch that mixes tasks and methods answers every request exactly
as one-request-at-a-time serving does; requests larger than a batch are split and come
back in order; a burst over the queue bound gets 503s at once and the service recovers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from enginetest_helpers import _assert_same, _concurrent, _metric, _post
from psdata import image_bytes

from backbone import method_names


def test_mixed_batch_equals_one_request_at_a_time(settings_factory: Any, serve: Any, seed: Any) -> None:
    methods = method_names()
    batched_settings = settings_factory(max_batch=2 * len(methods), max_wait_ms=5000)
    tasks = seed(batched_settings, len(methods), methods)
    assert sorted({t.method for t in tasks}) == sorted(methods)
    calls = [(t, [image_bytes(i, seed=3 * i), image_bytes(i + 1, seed=3 * i + 1)]) for i, t in enumerate(tasks)]

    # Every request of every task lands in ONE forward: the batch closes when its
    # 2 * len(methods) images are in (long before max_wait).
    batched = serve(batched_settings)
    b0 = batched.engine.totals().batches
    together = asyncio.run(_concurrent(batched.url, calls))
    assert [r.status_code for r in together] == [200] * len(calls), [r.text for r in together]
    assert batched.engine.totals().batches - b0 == 1
    assert batched.engine.totals().images == 2 * len(methods)

    # The same requests one at a time, on a replica of the same store that never batches.
    single = serve(batched_settings.model_copy(update={"max_batch": 1, "max_wait_ms": 0}))
    for (task, images), r in zip(calls, together):
        alone = _post(single.url, task, images)
        assert alone.status_code == 200, alone.text
        assert r.json()["version"] == alone.json()["version"] == 1
        _assert_same(r.json()["predictions"], alone.json()["predictions"])
        # ... and image by image
        for j, img in enumerate(images):
            one = _post(single.url, task, [img])
            _assert_same([r.json()["predictions"][j]], one.json()["predictions"])
    assert single.engine.totals().batches == single.engine.totals().images  # batch size 1 throughout

    metrics = httpx.get(f"{batched.url}/metrics").text
    assert _metric(metrics, "promptstore_engine_batch_size_count") == 1
    assert _metric(metrics, "promptstore_engine_batch_size_sum") == 2 * len(methods)
    assert _metric(metrics, "promptstore_engine_images_total") == 2 * len(methods)
    assert _metric(metrics, "promptstore_prompt_cache_loads_total") == len(methods)
    assert _metric(metrics, "promptstore_engine_queue_images") == 0
    for m in methods:
        assert f'promptstore_classify_requests_total{{method="{m}",outcome="ok"}} 1.0' in metrics
        assert f'promptstore_classify_latency_seconds_count{{method="{m}"}} 1.0' in metrics
    for name in ("promptstore_engine_queue_wait_seconds_count", "promptstore_engine_forward_seconds_count",
                 "promptstore_engine_images_per_second", "promptstore_prompt_cache_resident_bytes"):  # fmt: skip
        assert _metric(metrics, name) > 0


def test_request_larger_than_a_batch_is_split_in_order(settings_factory: Any, serve: Any, seed: Any) -> None:
    settings = settings_factory(max_batch=3, max_wait_ms=0)
    task, other = seed(settings, 2, ["vpt-deep", "padding"])
    app = serve(settings)
    images = [image_bytes(i % 4, seed=i) for i in range(8)]
    r = _post(app.url, task, images, top_k=2)
    assert r.status_code == 200, r.text
    assert app.engine.totals().batches >= 3  # 8 images in batches of at most 3
    preds = r.json()["predictions"]
    assert len(preds) == 8 and all(len(p) == 2 for p in preds)
    for img, p in zip(images, preds):
        one = _post(app.url, task, [img], top_k=2).json()["predictions"][0]
        assert [x["label"] for x in one] == [x["label"] for x in p]
        assert all(abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(one, p))
    # and the other task's answers are its own, not the first task's
    r2 = _post(app.url, other, images[:2])
    assert {x["label"] for x in r2.json()["predictions"][0]} == set(
        x["label"] for x in _post(app.url, other, images[:1]).json()["predictions"][0]
    )
    assert {x["label"] for x in r2.json()["predictions"][0]}.isdisjoint({x["label"] for x in preds[0]})


def test_burst_over_the_queue_bound_gets_503_and_recovers(settings_factory: Any, serve: Any, seed: Any) -> None:
    # Batches close only when 64 images are in or 8 s after the oldest request: the first
    # 8 single-image requests fill the queue (8 images) and wait there while the burst comes
    # (8 s, not less: on a loaded machine the burst's 20 requests take a while to send).
    settings = settings_factory(queue_size=8, max_batch=64, max_wait_ms=8000)
    (task,) = seed(settings, 1, ["linear-probe"])
    app = serve(settings)
    img = image_bytes(1)

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], int, httpx.Response]:
        async with httpx.AsyncClient(base_url=app.url, timeout=60) as http:

            async def post() -> httpx.Response:
                files = [("images", ("a.png", img, "image/png"))]
                return await http.post(f"/v1/tasks/{task.task_id}/classify", files=files, headers=task.headers)

            first = [asyncio.create_task(post()) for _ in range(8)]
            deadline = time.monotonic() + 20
            while app.engine.queued_images < 8:
                assert time.monotonic() < deadline, "the first requests never filled the queue"
                await asyncio.sleep(0.01)
            burst = await asyncio.gather(*(post() for _ in range(20)))
            # refused at once, not after waiting for room: the queued requests are all still
            # unanswered when the last refusal arrives (an order of events, not a duration)
            still_waiting = sum(not t.done() for t in first)
            queued = await asyncio.gather(*first)
            after = await post()
            return queued, burst, still_waiting, after

    queued, burst, still_waiting, after = asyncio.run(scenario())
    for r in burst:
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert "queue is full" in r.json()["detail"]
    assert still_waiting == 8
    assert [r.status_code for r in queued] == [200] * 8
    assert after.status_code == 200  # recovered
    assert app.engine.queued_images == 0
    metrics = httpx.get(f"{app.url}/metrics").text
    assert _metric(metrics, "promptstore_engine_rejected_total") == 20
    assert 'promptstore_classify_requests_total{method="linear-probe",outcome="rejected"} 20.0' in metrics


def test_shed_answers_the_queued_requests_with_503_and_the_engine_goes_on(
    settings_factory: Any, serve: Any, seed: Any
) -> None:
    # Batches close only after 3 s: four requests wait in the queue when shed() runs.
    settings = settings_factory(queue_size=64, max_batch=64, max_wait_ms=3000)
    (task,) = seed(settings, 1, ["linear-probe"])
    app = serve(settings)
    img = image_bytes(2)

    async def scenario() -> tuple[list[httpx.Response], int, httpx.Response]:
        async with httpx.AsyncClient(base_url=app.url, timeout=60) as http:

            async def post() -> httpx.Response:
                files = [("images", ("a.png", img, "image/png"))]
                return await http.post(f"/v1/tasks/{task.task_id}/classify", files=files, headers=task.headers)

            waiting = [asyncio.create_task(post()) for _ in range(4)]
            deadline = time.monotonic() + 20
            # queued_images also counts images still being preprocessed, which shed() cannot
            # answer yet: wait until all four are in the queue proper.
            while app.engine.enqueued_images < 4:
                assert time.monotonic() < deadline, "the requests never reached the queue"
                await asyncio.sleep(0.01)
            shed = app.engine.shed()
            answers = await asyncio.gather(*waiting)
            return answers, shed, await post()

    answers, shed, after = asyncio.run(scenario())
    assert shed == 4
    for r in answers:
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        assert "the inference queue was shed" in r.json()["detail"]
    assert after.status_code == 200, after.text  # the engine goes on
    assert app.engine.queued_images == 0
