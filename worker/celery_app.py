"""The Celery application (Redis broker). Tasks live in ``worker.tasks``.

Run a worker with ``promptstore worker`` (or ``celery -A worker.celery_app worker``);
``PROMPTSTORE_BROKER_URL`` must be set. Results go to the database, not to a result
backend; messages carry ids only (JSON, never pickle).
"""

from __future__ import annotations

from celery import Celery

from store.settings import Settings

#: Redis re-delivers an unacknowledged message after this long; tuning runs must finish
#: well within it (a duplicate delivery is harmless anyway: the job is idempotent).
VISIBILITY_TIMEOUT_S = 12 * 3600

QUEUE = "promptstore"


def make_celery(broker_url: str | None) -> Celery:
    app = Celery("promptstore", broker=broker_url, include=["worker.tasks"])
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
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


celery_app = make_celery(Settings().broker_url)
app = celery_app  # what `celery -A worker.celery_app` looks for
