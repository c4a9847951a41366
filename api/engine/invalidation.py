"""Prompt invalidation across API replicas: Redis pub/sub of ``{"task_id", "generation"}``.

With ``PROMPTSTORE_REDIS_URL`` set, a replica that sees a newer serving generation of a task (a
published version, or one a tenant chose to serve; or deletes the task) tells every other
replica, which drops its cached prompt of that task at once.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable

from store.announce import message_generation, prompt_channel, version_message

log = logging.getLogger("promptstore.engine")


class InvalidationBus:
    """Redis pub/sub between replicas: ``{"task_id", "generation"}`` (null: deleted).

    ``publish`` never raises (a Redis outage costs memory, not correctness: every request
    still reads its served version from the database). The subscriber thread reconnects
    with a back-off and hands other replicas' messages to ``on_message``.
    """

    def __init__(self, url: str, on_message: Callable[[str, int | None], None]) -> None:
        import redis

        self.url = url
        self.on_message = on_message
        self.origin = uuid.uuid4().hex
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.channel = prompt_channel(url)
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptstore-invalidation", daemon=True)
        # Publishing happens on a thread of its own: callers (the event loop among them)
        # never wait on Redis.
        self._outbox: queue.Queue[str | None] = queue.Queue(maxsize=10_000)
        self._publisher = threading.Thread(target=self._publish_loop, name="promptstore-invalidation-pub", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._publisher.start()

    def publish(self, task_id: str, generation: int | None) -> None:
        msg = version_message(task_id, generation, self.origin)
        try:
            self._outbox.put_nowait(msg)
        except queue.Full:
            log.warning("prompt invalidation outbox full; task %s not announced to other replicas", task_id)

    def _publish_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self._redis.publish(self.channel, msg)
            except Exception as exc:  # redis errors: log and go on, see the class docstring
                log.warning("could not publish a prompt invalidation to Redis: %s", exc)

    def _run(self) -> None:
        import redis

        backoff = 0.5
        while not self._stop.is_set():
            pubsub = None
            try:
                conn = redis.Redis.from_url(self.url, socket_connect_timeout=2, health_check_interval=30)
                pubsub = conn.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self.subscribed.set()
                backoff = 0.5
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        self._handle(msg.get("data"))
            except redis.RedisError as exc:
                self.subscribed.clear()
                log.warning("prompt invalidation subscriber lost Redis (%s); reconnecting in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _handle(self, data: bytes | str | None) -> None:
        try:
            msg = json.loads(data)
            if msg.get("origin") == self.origin:
                return
            task_id = str(msg["task_id"])
            version = message_generation(msg)
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed prompt invalidation message: %r", data)
            return
        self.on_message(task_id, version)

    def close(self) -> None:
        self._stop.set()
        if self._publisher.is_alive():
            self._outbox.put(None)  # after what is queued: pending announcements still go out
            self._publisher.join(timeout=3)
        if self._thread.is_alive():
            self._thread.join(timeout=3)
