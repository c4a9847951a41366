"""``promptstore worker`` loads the backbone when a process that runs jobs starts (the solo
process, or each prefork child), before any job; a backbone that cannot load is named in
the log at start. No job is sent here: the lines can only come from the preload."""

from __future__ import annotations

from pathlib import Path

import pytest
from procs import settings_env, started


@pytest.mark.parametrize("concurrency", [1, 2], ids=["solo", "prefork"])
def test_worker_loads_the_backbone_at_start(concurrency: int, redis_url: str, tmp_path: Path) -> None:
    env = settings_env(
        PROMPTSTORE_BROKER_URL=redis_url, PROMPTSTORE_BACKBONE="open_clip:tiny:random", PROMPTSTORE_DEVICE="cpu"
    )
    with started(["worker", "--concurrency", str(concurrency)], env=env, cwd=tmp_path, name="worker") as worker:
        worker.wait_for("ready.", timeout=90)
        # one load per process that runs jobs
        log = worker.wait_for("backbone open_clip:tiny:random@0 runs with RANDOM weights", timeout=90, count=concurrency)
        assert "Traceback" not in log


def test_worker_names_a_backbone_that_cannot_load_at_start(redis_url: str, tmp_path: Path) -> None:
    env = settings_env(PROMPTSTORE_BROKER_URL=redis_url, PROMPTSTORE_BACKBONE="open_clip:no_such_arch:random")
    with started(["worker"], env=env, cwd=tmp_path, name="worker") as worker:
        log = worker.wait_for("backbone open_clip:no_such_arch:random failed to load", timeout=90)
        assert "failed to load: unknown open_clip architecture 'no_such_arch'" in log
        worker.wait_for("ready.", timeout=90)  # the worker still runs: its jobs will fail with the reason
