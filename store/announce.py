"""Announcing prompt versions to the API replicas over Redis pub/sub.

The tuning job (Celery worker or in-process thread) announces a version it has just
published, and an API replica the version a tenant chose to serve, as the task's new serving
generation (``Task.serving_generation``, which also grows on a rollback); API replicas
(``api.engine.InvalidationBus``) subscribe, drop the old prompt from their device cache at
once and refuse requests that read an older generation. Announcing is an optimisation of memory, never
of correctness: every classify request reads its served version from the database, so
an announcement lost to a Redis outage costs nothing but a stale cache entry until the
next request for that task.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("promptstore.announce")

#: Messages of a publishing job carry this origin (replicas ignore only their own).
JOB_ORIGIN = "job"


def prompt_channel(redis_url: str) -> str:
    """The pub/sub channel for ``redis_url``. Pub/sub ignores database numbers, so the
    name carries it: two deployments on one Redis with other db numbers stay apart."""
    from redis.connection import parse_url

    db = parse_url(redis_url).get("db", 0)
    return f"promptstore:{int(db)}:prompt-versions"


def version_message(task_id: str, generation: int | None, origin: str) -> str:
    """``{"task_id", "generation", "origin"}``; generation None means the task was deleted."""
    return json.dumps({"task_id": task_id, "generation": generation, "origin": origin})


def message_generation(msg: dict) -> int | None:
    """The serving generation a message announces (None: deleted). Messages of releases before
    serving generations said ``version``, which then grew exactly as the generation does."""
    value = msg["generation"] if "generation" in msg else msg["version"]
    return None if value is None else int(value)


def announce_version(redis_url: str, task_id: str, version: int | None) -> bool:
    """Publish serving generation ``version`` of the task (None: deleted) once, with short
    timeouts; never raises. True when Redis took it."""
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.publish(prompt_channel(redis_url), version_message(task_id, version, JOB_ORIGIN))
        finally:
            client.close()
        return True
    except redis.RedisError as exc:
        log.warning("could not announce generation %s of task %s over Redis: %s", version, task_id, exc)
        return False
