"""Rate limits: per tenant on classify and on tuning jobs, per client address on failed admin
authentications. A refused call gets 429 with Retry-After.

Each limit is GCRA, the token bucket kept as one timestamp per key (the "theoretical
arrival time" ``tat``): a call costs ``1/rate`` seconds of it, and is allowed while ``tat``
stays within ``burst/rate`` seconds of now. With ``PROMPTSTORE_REDIS_URL`` set the timestamps
live in Redis and one Lua script reads and updates a key atomically on Redis's own clock, so
every replica draws from the same bucket; without it, in this process's memory. A Redis that
cannot be reached lets calls through (logged, and counted in
``promptstore_rate_limit_errors_total``) and is tried again ``REDIS_RETRY_S`` later: the limits
protect the service, they must not take it down, or slow it, with them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("promptstore.api")

#: Redis keys: ``promptstore:ratelimit:<scope>:<key>``.
KEY_PREFIX = "promptstore:ratelimit"
#: After a Redis error, calls go through unchecked for this long before Redis is tried again.
REDIS_RETRY_S = 5.0

# KEYS[1]: the bucket; ARGV: seconds per call, burst, 1 to take a call (0: only look).
# Returns "0" when allowed (and taken), else the seconds until it would be, as a string
# (a Lua number returned to Redis is cut to an integer).
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then return tostring(allow_at - now) end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
end
return '0'
"""


@dataclass(frozen=True)
class Limit:
    """``rate`` calls per second sustained, ``burst`` at once; rate 0 or burst 0: no limit."""

    rate: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.rate > 0 and self.burst > 0

    @classmethod
    def per_minute(cls, n: float, burst: int) -> "Limit":
        return cls(n / 60.0, burst)


class RateLimited(Exception):
    """The call is over its limit; ``retry_after`` is whole seconds until one is allowed."""

    def __init__(self, limit: str, retry_after: float) -> None:
        self.retry_after = max(1, int(retry_after + 0.999))
        self.detail = f"{limit}; retry in {self.retry_after} s"
        super().__init__(self.detail)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimiter:
    """The buckets of one process, in Redis when ``redis_url`` is given, else in memory."""

    def __init__(self, redis_url: str | None, registry: CollectorRegistry, *, timeout: float = 0.5) -> None:
        self.refused = Counter(
            "promptstore_rate_limited_total", "Calls refused with 429 by a rate limit.", ["scope"], registry=registry
        )
        self.errors = Counter(
            "promptstore_rate_limit_errors_total",
            "Rate-limit checks that could not reach Redis (the call was let through).",
            registry=registry,
        )
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}
        self._prune_at = 0.0
        self._last_warning = 0.0
        self._skip_redis_until = 0.0
        self._redis = None
        self._script = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
            self._script = self._redis.register_script(_GCRA_LUA)

    @property
    def backend(self) -> str:
        return "redis" if self._redis is not None else "memory"

    def wait(self, scope: str, key: str, limit: Limit, *, take: bool = True) -> float:
        """Seconds until a call under ``key`` is allowed: 0.0 when it is now (and then, with
        ``take``, the call is counted). Never raises."""
        if not limit.enabled:
            return 0.0
        bucket = f"{KEY_PREFIX}:{scope}:{key}"
        interval = 1.0 / limit.rate
        if self._script is not None:
            if time.monotonic() < self._skip_redis_until:
                return 0.0  # Redis failed a moment ago: do not make every call wait on its timeout
            try:
                return float(self._script(keys=[bucket], args=[repr(interval), limit.burst, 1 if take else 0]))
            except Exception as exc:  # redis errors: let the call through, see the module docstring
                self.errors.inc()
                now = time.monotonic()
                self._skip_redis_until = now + REDIS_RETRY_S
                if now - self._last_warning > 30:
                    self._last_warning = now
                    log.warning("rate limits are not enforced: Redis is unreachable (%s)", exc)
                return 0.0
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat.get(bucket, now), now)
            allow_at = tat + interval - interval * limit.burst
            if allow_at > now:
                return allow_at - now
            if take:
                self._tat[bucket] = tat + interval
                if now >= self._prune_at:  # forget the buckets that are full again
                    self._tat = {k: v for k, v in self._tat.items() if v > now}
                    self._prune_at = now + 60.0
            return 0.0

    def take(self, scope: str, key: str, limit: Limit, detail: str, *, count: bool = True) -> None:
        """Count one call (only look, without ``count``), or raise ``RateLimited`` saying
        ``detail`` and the wait."""
        wait = self.wait(scope, key, limit, take=count)
        if wait > 0:
            self.refused.labels(scope).inc()
            raise RateLimited(detail, wait)


def client_address(request: Request) -> str:
    """The caller's address as the server sees it (behind a proxy, uvicorn takes it from
    X-Forwarded-For only when the proxy is in FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else "unknown"
