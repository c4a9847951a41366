"""The Celery application (Redis broker). Tasks live in ``worker.tasks``.

Run a worker with ``promptstore worker`` (or ``celery -A worker.celery_app worker``);
``PROMPTSTORE_BROKER_URL`` must be set. Results go to the database, not to a result
backend; messages carry ids only (JSON, never pickle).
"""

from __future__ import annotations

from celery import Celery

from store.settings import get_settings

#: Redis re-delivers an unacknowledged message after this long (default of
#: ``PROMPTSTORE_BROKER_VISIBILITY_TIMEOUT``); tuning runs must finish well within it (a
#: duplicate delivery is harmless anyway: the job is idempotent). This is also how a job
#: whose worker was killed (SIGKILL, lost node) reaches another worker.
VISIBILITY_TIMEOUT_S = 12 * 3600

QUEUE = "promptstore"


def make_celery(
    broker_url: str | None, visibility_timeout_s: float = VISIBILITY_TIMEOUT_S, *, socket_timeout: float | None = None
) -> Celery:
    """The app. ``socket_timeout`` (the API's producer: ``PROMPTSTORE_BROKER_TIMEOUT``) bounds
    each connect and each Redis reply; workers keep kombu's own polling timeouts."""
    # Idle workers sweep the unacknowledged messages for expired ones every
    # `unacked_restore_interval` seconds (throttle 1: every sweep scans): about ten times
    # per visibility timeout, at least every second, at most once a minute.
    restore_interval = max(1, min(60, int(visibility_timeout_s // 10)))
    app = Celery("promptstore", broker=broker_url, include=["worker.tasks"])
    bounded: dict[str, float] = {}
    if socket_timeout is not None:
        bounded = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        app.conf.broker_connection_timeout = socket_timeout
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": 1,
            **bounded,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


_settings = get_settings()
celery_app = make_celery(_settings.broker_url, _settings.broker_visibility_timeout)
app = celery_app  # what `celery -A worker.celery_app` looks for
