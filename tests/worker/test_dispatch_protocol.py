"""Both dispatchers describe themselves through ``worker.dispatch.Dispatcher``: kind, queue,
queue depth, live workers (what the API and the dashboard read)."""

from __future__ import annotations

from store.settings import Settings
from worker.dispatch import CeleryDispatcher, Dispatcher, ThreadDispatcher, make_dispatcher


def test_thread_dispatcher_describes_itself(tmp_path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite", job_threads=2)
    d: Dispatcher = make_dispatcher(settings)
    assert isinstance(d, ThreadDispatcher)
    assert d.kind == "threads" and d.queue
    assert d.queue_depth() == 0
    assert d.workers_alive() == ["in-process pool: 2 thread(s), 0 busy"]
    assert d.on_published is None


def test_celery_dispatcher_describes_itself() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:9/0", broker_timeout=0.2)
    d: Dispatcher = make_dispatcher(settings)
    assert isinstance(d, CeleryDispatcher)
    assert d.kind == "celery" and d.queue == "promptstore"
    try:
        d.queue_depth()
    except Exception as exc:  # nothing listens on port 9: the broker's own error, quickly
        assert "redis" in type(exc).__module__ or isinstance(exc, OSError)
    else:  # pragma: no cover
        raise AssertionError("queue_depth answered without a broker")
    d.shutdown()
