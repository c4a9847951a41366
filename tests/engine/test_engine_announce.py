"""A tuning job announces each version it publishes over Redis, so API replicas drop the
old one without waiting for a request; Redis being down never fails the job."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from psdata import dataset_zip

from store.announce import JOB_ORIGIN, announce_version, prompt_channel


def _next_message(pubsub: Any, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.5)
        if msg and msg.get("type") == "message":
            return json.loads(msg["data"])
    return None


def test_channel_names_the_database_number() -> None:
    assert prompt_channel("redis://127.0.0.1:6379/3") == "promptstore:3:prompt-versions"
    assert prompt_channel("redis://127.0.0.1:6379") == "promptstore:0:prompt-versions"


def test_published_version_is_announced_on_redis(settings_factory: Any, make_api: Any, redis_url: str) -> None:
    pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(prompt_channel(redis_url))
    try:
        api = make_api(settings_factory(redis_url=redis_url))
        tenant = api.tenant()
        task = api.create_task(
            tenant, "linear-probe", dataset=dataset_zip(("cat", "dog"), per_class=3), config={"l2_grid": [1.0]}
        ).json()
        api.wait_ready(tenant, task["id"])
        seen = []
        while (msg := _next_message(pubsub, timeout=5)) is not None:
            seen.append(msg)
            if msg.get("origin") == JOB_ORIGIN:
                break
        assert {"task_id": task["id"], "generation": 1, "origin": JOB_ORIGIN} in seen, seen
    finally:
        pubsub.close()


def test_announcing_to_an_unreachable_redis_only_warns(caplog: Any) -> None:
    assert announce_version("redis://127.0.0.1:1/0", "t1", 2) is False
    assert "could not announce generation 2 of task t1" in caplog.text
