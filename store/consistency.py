"""Objects and rows stay consistent: the check (``promptstore fsck``) and the garbage collector.

The object store holds three kinds of objects:

- ``datasets/{tenant}/{sha256}.zip``: shared by every dataset row of the tenant with those
  bytes, so a request must never delete one inline (a concurrent upload of the same zip may
  have just rewritten it and not yet committed its row);
- ``prompts/{tenant}/{task}/{sha256}.safetensors``: referenced only by the task's
  ``prompt_versions`` rows; deleted inline when the task is deleted (``DELETE /v1/tasks``)
  and when a publish finds its task gone (``store.publish``);
- ``evaluations/{tenant}/{task}/{evaluation}.zip``: the labelled zip of one evaluation
  (``store.evaluations``), referenced by its row's ``object_key`` until the job finished it
  (the job clears the key and deletes the zip after that commit). An evaluation's rows go
  with its task, so the zip of a task deleted before its evaluation ran is collected here.

Every other unreferenced object (an upload whose request failed after the ``put``, a prompt
whose publish lost to a retrain or a cancel, the dataset zip of the last task that used it)
is left to the garbage collector: ``collect`` deletes an object only when no row refers to
it **and** it is older than the grace period (``PROMPTSTORE_GC_GRACE``). Writers always
``put`` before they commit the row, and a ``put`` always rewrites the object (its
last-modified time moves forward), so an object a request or a job is about to commit a
row for is younger than the grace: the collector leaves it alone, as long as no writer
takes longer than the grace between its ``put`` and its commit. The collector checks the
rows and the object's age again right before each delete.

``check`` reports both directions: *orphans* (objects without a row; young ones are in
flight or waiting for the grace) and *missing* (rows whose object is not in the store).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from store.db import session_scope
from store.models import Dataset, Evaluation, Prediction, PromptVersion, Sample
from store.objects import ObjectStore

log = logging.getLogger("promptstore.gc")

#: The key prefixes the service writes; objects elsewhere in the bucket are not its own.
PREFIXES = ("datasets/", "prompts/", "evaluations/", "samples/", "predictions/")
_CHUNK = 500


@dataclasses.dataclass(frozen=True)
class Orphan:
    """An object no row refers to."""

    key: str
    size: int
    last_modified: dt.datetime
    #: Older than the grace period: the collector deletes it (``--gc``).
    collectable: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "size": self.size,
            "last_modified": self.last_modified.isoformat(),
            "collectable": self.collectable,
        }


@dataclasses.dataclass(frozen=True)
class Missing:
    """A row whose object is not in the store."""

    table: str  # "datasets", "prompt_versions" or "evaluations"
    id: str
    tenant_id: str
    task_id: str | None
    object_key: str

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    orphans: list[Orphan]
    missing: list[Missing]
    grace_s: float
    #: Keys the collector deleted (only with ``collect``).
    collected: list[str] = dataclasses.field(default_factory=list)
    objects_scanned: int = 0

    @property
    def young_orphans(self) -> list[Orphan]:
        return [o for o in self.orphans if not o.collectable and o.key not in set(self.collected)]

    def as_json(self) -> dict[str, Any]:
        return {
            "orphans": [o.as_json() for o in self.orphans],
            "missing": [m.as_json() for m in self.missing],
            "collected": list(self.collected),
            "grace_s": self.grace_s,
            "objects_scanned": self.objects_scanned,
        }


def _chunks(items: list[str], n: int = _CHUNK) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def referenced(s: Session, keys: Iterable[str]) -> set[str]:
    """Those of ``keys`` that a committed dataset, prompt version or evaluation row refers to."""
    found: set[str] = set()
    for chunk in _chunks(sorted(set(keys))):
        found.update(s.scalars(select(Dataset.object_key).where(Dataset.object_key.in_(chunk))))
        found.update(s.scalars(select(PromptVersion.object_key).where(PromptVersion.object_key.in_(chunk))))
        found.update(s.scalars(select(Evaluation.object_key).where(Evaluation.object_key.in_(chunk))))
        found.update(s.scalars(select(Sample.object_key).where(Sample.object_key.in_(chunk))))
        found.update(s.scalars(select(Prediction.object_key).where(Prediction.object_key.in_(chunk))))
    return found


def check(
    sm: sessionmaker[Session], objects: ObjectStore, *, grace_s: float, now: dt.datetime | None = None
) -> Report:
    """List orphans (objects without a row) and missing objects (rows without an object).

    The store is listed *before* the rows are read: a row committed meanwhile still counts as
    a reference, and an object written meanwhile is not listed. A row whose object the listing
    lacks is confirmed with ``stat`` (its object may have been written after the listing)."""
    listed = {info.key: info for prefix in PREFIXES for info in objects.list(prefix)}
    with session_scope(sm) as s:
        refs = referenced(s, listed)
        rows: list[Missing] = []
        for ds in s.execute(select(Dataset.id, Dataset.tenant_id, Dataset.object_key)):
            if ds.object_key not in listed:
                rows.append(Missing("datasets", ds.id, ds.tenant_id, None, ds.object_key))
        for pv in s.execute(
            select(PromptVersion.id, PromptVersion.tenant_id, PromptVersion.task_id, PromptVersion.object_key)
        ):
            if pv.object_key not in listed:
                rows.append(Missing("prompt_versions", pv.id, pv.tenant_id, pv.task_id, pv.object_key))
        for ev in s.execute(
            select(Evaluation.id, Evaluation.tenant_id, Evaluation.task_id, Evaluation.object_key)
            .where(Evaluation.object_key.is_not(None))
        ):
            if ev.object_key not in listed:
                rows.append(Missing("evaluations", ev.id, ev.tenant_id, ev.task_id, ev.object_key))
        for r in s.execute(
            select(Sample.id, Sample.tenant_id, Sample.task_id, Sample.object_key).where(Sample.entry.is_(None))
        ):
            if r.object_key not in listed:
                rows.append(Missing("samples", r.id, r.tenant_id, r.task_id, r.object_key))
        for r in s.execute(
            select(Prediction.id, Prediction.tenant_id, Prediction.task_id, Prediction.object_key)
            .where(Prediction.object_key.is_not(None))
        ):
            if r.object_key not in listed:
                rows.append(Missing("predictions", r.id, r.tenant_id, r.task_id, r.object_key))
    missing = [m for m in rows if objects.stat(m.object_key) is None]
    now = now or dt.datetime.now(dt.timezone.utc)
    cutoff = now - dt.timedelta(seconds=grace_s)
    orphans = sorted(
        (
            Orphan(info.key, info.size, info.last_modified, info.last_modified <= cutoff)
            for key, info in listed.items()
            if key not in refs
        ),
        key=lambda o: o.key,
    )
    missing.sort(key=lambda m: (m.table, m.object_key, m.id))
    return Report(orphans=orphans, missing=missing, grace_s=grace_s, objects_scanned=len(listed))


def collect(sm: sessionmaker[Session], objects: ObjectStore, *, grace_s: float) -> Report:
    """``check``, then delete every orphan older than the grace period. Right before each
    delete the object is looked at again (a ``put`` since the listing makes it young) and the
    rows are read again (a row committed since the listing keeps it)."""
    report = check(sm, objects, grace_s=grace_s)
    candidates = [o.key for o in report.orphans if o.collectable]
    for chunk in _chunks(candidates):
        with session_scope(sm) as s:
            still_referenced = referenced(s, chunk)
        for key in chunk:
            if key in still_referenced:
                continue
            info = objects.stat(key)
            cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=grace_s)
            if info is None or info.last_modified > cutoff:
                continue
            objects.delete(key)
            report.collected.append(key)
            log.info("garbage collector: deleted %s (no row refers to it; last written %s)", key,
                     info.last_modified.isoformat())
    return report


class PeriodicCollector:
    """Runs ``collect`` in a daemon thread: first ``first_delay`` seconds after ``start``, then
    every ``interval`` seconds; an error is logged and the next pass tries again. Several
    processes may run one each (API replicas, workers): deleting an object twice is harmless.

    ``from_settings`` opens its own database engine (its connections closed after each pass)
    and object store client when the first pass runs, in the collector's thread, so that a
    Celery worker forking its job processes shares no connection with them."""

    def __init__(
        self,
        sm: sessionmaker[Session] | None,
        objects: ObjectStore | None,
        *,
        interval: float,
        grace_s: float,
        first_delay: float = 60.0,
        settings: Any = None,
        prediction_record_s: float | None = None,
    ) -> None:
        self.sm, self.objects = sm, objects
        #: How long a prediction's row outlives its image (``store.samples.sweep_predictions``).
        self.prediction_record_s = prediction_record_s if prediction_record_s is not None else (
            float(settings.prediction_record_s) if settings is not None else 30 * 24 * 3600.0
        )
        self.settings = settings
        self.interval, self.grace_s = interval, grace_s
        self.first_delay = min(first_delay, interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        self.passes = 0

    @classmethod
    def from_settings(cls, settings: Any, *, first_delay: float = 60.0) -> "PeriodicCollector":
        return cls(
            None, None, interval=settings.gc_interval, grace_s=settings.gc_grace, first_delay=first_delay,
            settings=settings,
        )

    def _connect(self) -> None:
        if self.sm is not None and self.objects is not None:
            return
        from store.db import make_engine, make_sessionmaker
        from store.objects import open_object_store

        if self.objects is None:
            self.objects = open_object_store(self.settings)
        if self.sm is None:
            self._engine = make_engine(self.settings.database_url)
            self.sm = make_sessionmaker(self._engine)

    def start(self) -> None:
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="promptstore-gc", daemon=True)
        self._thread.start()

    def run_once(self) -> Report | None:
        try:
            self._connect()
            assert self.sm is not None and self.objects is not None
            report = collect(self.sm, self.objects, grace_s=self.grace_s)
            from store.samples import sweep_predictions  # kept images past their retention go too

            sweep_predictions(self.sm, self.objects, record_s=self.prediction_record_s)
        except Exception as exc:  # database or object store down: try again next pass
            log.warning("garbage collector pass failed (%s: %s); next pass in %.0f s",
                        type(exc).__name__, exc, self.interval)
            return None
        finally:
            self.passes += 1
            if self._engine is not None:  # no connection stays open between passes
                self._engine.dispose()
        if report.missing:
            log.error("%d row(s) point at a missing object; run `promptstore fsck` for the list",
                      len(report.missing))
        return report

    def _run(self) -> None:
        delay = self.first_delay
        while not self._stop.wait(delay):
            self.run_once()
            delay = self.interval

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
