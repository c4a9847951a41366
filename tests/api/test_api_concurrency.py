"""Concurrent HTTP transitions of one task on SQLite and Postgres (docs/operations.md,
"Concurrent changes to one task"): of twenty parallel retrains with distinct configs exactly
one is answered 202, the others 409, and the run that happens is the winner's; a cancel racing
the end of a run is either accepted (the run ends cancelled) or refused (the run published).
Real threads, each request in its own session; no timing is asserted."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from psdata import dataset_zip

CLASSES = ("bird", "cat", "dog")


def _settings(settings_factory: Any, backend: str) -> Any:
    if backend == "postgres":
        return settings_factory(db="postgres", objects="s3")
    return settings_factory(db="sqlite", objects="local")


def _parallel(fns: list[Any]) -> list[Any]:
    barrier = threading.Barrier(len(fns))
    out: list[Any] = [None] * len(fns)

    def go(i: int) -> None:
        barrier.wait()
        out[i] = fns[i]()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_twenty_parallel_retrains_one_202_the_rest_409(backend: str, settings_factory: Any, make_api: Any) -> None:
    api = make_api(_settings(settings_factory, backend))
    tenant = api.tenant()
    tid = api.create_task(
        tenant, "coop", dataset=dataset_zip(CLASSES, per_class=3), config={"epochs": 1, "n_ctx": 2}
    ).json()["id"]
    api.wait_ready(tenant, tid, timeout=120)

    def retrain(epochs: int) -> Any:
        return lambda: api.client.post(
            f"/v1/tasks/{tid}/retrain", data={"config": json.dumps({"epochs": epochs, "n_ctx": 2, "batch_size": 1})},
            headers=tenant,
        )

    # runs of a few seconds (batch 1): every request is answered while the winner's run is still
    # active, also on a loaded machine (after it ends, a retrain may rightly win again)
    responses = _parallel([retrain(100 + i) for i in range(20)])
    codes = [r.status_code for r in responses]
    assert sorted(set(codes)) == [202, 409] and codes.count(202) == 1, [(r.status_code, r.text[:120]) for r in responses]
    winner = next(r.json() for r in responses if r.status_code == 202)
    # a loser either reads the winner's queued run or loses the conditional write to it
    assert all(("already has a" in d or "changed while retraining" in d)
               for d in (r.json()["detail"] for r in responses if r.status_code == 409))
    epochs = winner["training"]["config"]["epochs"]  # the run's own; `config` is still version 1's
    assert winner["config"]["epochs"] == 1
    t = api.wait(tenant, tid, lambda t: t["version"] == 2 and t["training"]["status"] == "ready", timeout=180)
    assert t["config"]["epochs"] == epochs and t["metrics"]["epochs"] == epochs  # the winner's run happened
    assert len(api.client.get(f"/v1/tasks/{tid}/history", headers=tenant).json()["history"]) == epochs


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_parallel_cancels_of_one_queued_run_one_202(backend: str, settings_factory: Any, make_api: Any) -> None:
    api = make_api(_settings(settings_factory, backend))
    tenant = api.tenant()
    # zeroshot: a queued or running run that either ends cancelled or ready, never both
    tid = api.create_task(tenant, "zeroshot", classes=["cat", "dog"]).json()["id"]
    responses = _parallel([lambda: api.client.post(f"/v1/tasks/{tid}/cancel", headers=tenant) for _ in range(8)])
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 409} and codes.count(202) <= 1, codes
    t = api.wait(tenant, tid, lambda t: t["status"] in ("ready", "cancelled"), timeout=120)
    assert (t["status"] == "cancelled") == (codes.count(202) == 1), (t["status"], codes)
