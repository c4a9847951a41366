"""Serving an older version (a rollback): the engine orders prompts by the task's serving
generation, not by version number, so after a tenant chooses a version no answer comes from
the one served before — in this process (the cache) and in another replica (Redis)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from apiclient import ADMIN
from psdata import dataset_zip, image_bytes
from test_engine_replicas import _metric, _until, two_replicas

from api.engine import ServingRef, StaleVersion
from api.engine.cache import PromptCache
from api.engine.metrics import EngineMetrics
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.timeout(300)


class _Resident:
    def __init__(self, ref: ServingRef) -> None:
        self.ref = ref
        self.nbytes = 10


def _ref(version: int, generation: int) -> ServingRef:
    return ServingRef("t", version, f"prompts/x/t/{version}.safetensors", "fp", ("a", "b"), "coop", generation)


def test_cache_orders_by_generation_so_a_rollback_wins_over_a_higher_version() -> None:
    loads: list[int] = []

    def loader(ref: ServingRef) -> Any:
        loads.append(ref.version)
        return _Resident(ref)

    cache = PromptCache(1000, loader, EngineMetrics(CollectorRegistry()))
    try:
        assert cache.get(_ref(2, 2)).result(5).ref.version == 2
        rolled = cache.get(_ref(1, 3)).result(5)  # version 1 chosen again: generation 3
        assert rolled.ref.version == 1 and cache.versions() == {"t": 1}
        with pytest.raises(StaleVersion):  # a request that read version 2 before the rollback
            cache.get(_ref(2, 2))
        assert cache.get(_ref(1, 3)).result(5).ref.version == 1 and loads == [2, 1]
        # announced from elsewhere (a job published version 3, generation 4): version 1 goes
        assert cache.note_version("t", 4, "remote") and cache.versions() == {}
        with pytest.raises(StaleVersion):
            cache.get(_ref(1, 3))
        # a ServingRef without a generation (tests, benches) orders by its version
        assert ServingRef("u", 7, "k", "fp", ("a",)).generation == 7
    finally:
        cache.close()


def test_rollback_reaches_both_replicas_and_the_old_version_never_answers_again(
    settings_factory: Any, redis_url: str, tmp_path: Any
) -> None:
    with two_replicas(settings_factory, redis_url, tmp_path) as (a, b):
        r = a.post("/v1/admin/tenants", json={"name": f"rollback-{time.monotonic_ns()}"}, headers=ADMIN)
        tenant = {"Authorization": f"Bearer {r.json()['api_key']}"}
        files = {"dataset": ("d.zip", dataset_zip(("cat", "dog", "owl"), per_class=4), "application/zip")}
        data = {"name": "t", "method": "linear-probe", "config": json.dumps({"l2_grid": [1.0], "max_iter": 30})}
        task_id = a.post("/v1/tasks", data=data, files=files, headers=tenant).json()["id"]

        def version() -> int | None:
            t = a.get(f"/v1/tasks/{task_id}", headers=tenant).json()
            assert t["status"] not in ("failed", "cancelled") and (t["training"] or {}).get("status") != "failed", t
            return t["version"]

        _until(lambda: version() == 1, "version 1 never published", 90)
        config = json.dumps({"l2_grid": [0.0001], "max_iter": 30, "seed": 7})
        assert a.post(f"/v1/tasks/{task_id}/retrain", data={"config": config}, headers=tenant).status_code == 202
        _until(lambda: version() == 2, "version 2 never published", 90)

        img = [("images", ("x.png", image_bytes(2, seed=4), "image/png"))]

        def classify(http: httpx.Client) -> dict[str, Any]:
            r = http.post(f"/v1/tasks/{task_id}/classify", files=img, headers=tenant)
            assert r.status_code == 200, r.text
            return r.json()

        v2 = classify(a)["predictions"]
        assert classify(b)["version"] == 2  # both replicas hold version 2 now

        # Both replicas are asked without pause while the tenant rolls back through A; every
        # answer to a request sent after the rollback returned must come from version 1.
        answers: list[tuple[float, float, int]] = []  # (sent, received, version)
        stop = threading.Event()

        def hammer(http: httpx.Client) -> None:
            while not stop.is_set():
                sent = time.monotonic()
                version = classify(http)["version"]
                answers.append((sent, time.monotonic(), version))

        threads = [threading.Thread(target=hammer, args=(h,)) for h in (a, b)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            r = a.post(f"/v1/tasks/{task_id}/versions/1/serve", headers=tenant)
            assert r.status_code == 200, r.text
            served_at = time.monotonic()
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        after = [v for sent, _, v in answers if sent > served_at]
        assert after and set(after) == {1}, answers
        assert {v for sent, received, v in answers if received < served_at} <= {2}
        ra, rb = classify(a), classify(b)
        assert ra["version"] == rb["version"] == 1 and ra["predictions"] == rb["predictions"] != v2

        # With no request to B, a roll-forward through A reaches B over Redis: B drops version 1
        # from its cache before anyone asks it (B learned the first rollback from the
        # requests above, which read the database, so this is the first news it gets by Redis).
        remote = _metric(b, 'promptstore_prompt_cache_evictions_total{reason="remote"}')
        assert _metric(b, "promptstore_prompt_cache_entries") == 1
        assert a.post(f"/v1/tasks/{task_id}/versions/2/serve", headers=tenant).status_code == 200
        _until(
            lambda: _metric(b, 'promptstore_prompt_cache_evictions_total{reason="remote"}') > remote,
            "replica B was not told of the change over Redis",
        )
        assert _metric(b, "promptstore_prompt_cache_entries") == 0
        assert classify(b)["version"] == 2 and classify(b)["predictions"] == v2
        events = [e["kind"] for e in a.get(f"/v1/tasks/{task_id}/events", headers=tenant).json()["items"]]
        assert events.count("published") == 2 and events[-2:] == ["served", "served"]
