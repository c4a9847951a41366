"""Bounded waits on the service's dependencies.

Every call to Postgres, the object store and Redis (the broker included) has a connect
timeout, a read timeout and a total deadline (settings ``PROMPTSTORE_DB_*``, ``S3_*``,
``REDIS_*``, ``BROKER_*``; docs/operations.md "Timeouts and retries"). A call that runs past
them raises ``DependencyTimeout`` naming the part; the API answers it with 503 and
``Retry-After`` (``api.errors``), never with a hang.
"""

from __future__ import annotations

import math

#: Seconds a client is told to wait (``Retry-After``) after a dependency timed out.
RETRY_AFTER_S = 5

DATABASE = "database"
OBJECT_STORE = "object store"
BROKER = "job queue (broker)"
REDIS = "redis"


class DependencyTimeout(Exception):
    """``part`` did not answer within ``seconds``. ``detail`` is fit for a client."""

    def __init__(self, part: str, seconds: float, detail: str | None = None) -> None:
        self.part = part
        self.seconds = float(seconds)
        self.detail = detail or f"{part} did not answer within {format_seconds(seconds)} s; retry"
        super().__init__(self.detail)

    @property
    def retry_after(self) -> int:
        return RETRY_AFTER_S

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def format_seconds(seconds: float) -> str:
    """``5.0`` -> ``"5"``, ``0.75`` -> ``"0.75"``."""
    if math.isfinite(seconds) and float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:g}"
