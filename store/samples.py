"""A task's samples over time, and the predictions kept for feedback.

**Samples.** A task trains on its *sample set*: ``Sample`` rows, each one labelled image.
Samples come from three sources: ``dataset`` (the task's dataset zip), ``upload``
(``POST /v1/tasks/{id}/samples``) and ``feedback`` (a kept prediction the tenant labelled). An
uploaded image's original bytes live under the content-addressed ``samples/{tenant}/{sha256}``
(shared by the tenant's tasks, so a request never deletes one: the garbage collector does once
no row refers to it); a dataset sample points at its member (``entry``) of the dataset zip
itself, which is stored once and kept as long as the task's dataset row (a new dataset replaces
those samples in the same transaction), so expanding a zip stores no object.

- The same rules as dataset uploads (docs/inputs.md): a label is a class name
  (``store.textinput.check_name``); an image is decoded by ``store.images.decode_image`` and
  identified by its decoded pixels (``store.archive.pixel_digest``), so the same picture under
  two labels of one task is refused, and a copy under the same label is counted once (unique
  ``(task_id, pixels)`` in the database: it holds under concurrent requests too).
- **Expansion of the dataset** (``ensure_seeded``): a task's zip becomes its first samples
  lazily, by its first tuning job or its first samples call, whichever comes first (tasks
  created before samples existed are expanded the same way). It is idempotent: the rows are
  inserted in the transaction whose conditional write sets ``tasks.samples_seeded`` (for the
  dataset read), so of concurrent expansions one commits.
  A retrain with a new dataset replaces the set (``repo.request_retrain``): the rows go, the
  flag is cleared and the new zip is expanded the same way.
- **Snapshot** (``take_snapshot``): a run trains on the set as it is when the job takes its
  snapshot, right after it claimed the run: in one transaction, ``samples_since_run`` is reset
  (a conditional write that holds the task's row) and the rows are read, so a sample added
  concurrently is either in the snapshot or counted towards the next run, never both nor
  neither. Its hash is the sha256 of the lines ``label + "\\t" + sha256 + "\\n"`` (UTF-8) of its
  (label, image sha256) pairs sorted by code point; the published version records it with the
  number of samples and the count per class.
- **Classes** of a run: the task's dataset's classes that have samples, in the dataset's order,
  then the labels added later, sorted by code point (``order_classes``): a task whose samples
  are its dataset trains exactly as on the zip.
- **Auto-retrain** (``request_auto_retrain``): a task with ``retrain_after_samples = N`` gets a
  run requested once ``samples_since_run >= N`` and no run is queued or running (one
  conditional write: at most one run at a time). It is checked after every add (the API) and
  after every publish (the job, which then runs it itself), so a run that ends with the counter
  already at N is followed by the next.

**Predictions** (``keep_predictions``): a classify request with ``keep=true`` stores each image
under ``predictions/{tenant}/{task}/{id}`` with a row that expires after
``settings.prediction_retention_s``. Without ``keep`` nothing is stored. A feedback turns a live
one into a sample; ``sweep_predictions`` clears the object key of expired rows, then deletes
their images, and deletes the rows ``prediction_record_s`` after their expiry (until then a late
feedback is told when it expired).

Writers store the object before the row that points at it (``docs/operations.md``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import logging
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from store import repo
from store.archive import ArchiveManifest, DatasetError, iter_archive_images, pixel_digest
from store.db import session_scope, utcnow
from store.images import ImageError, decode_image
from store.models import ACTIVE_STATUSES, RUNNING, Dataset, Prediction, Sample, Task, new_id
from store.objects import ObjectNotFound, ObjectStore, sha256_hex, validate_key

log = logging.getLogger("promptstore.store")

#: Prefixes of the objects this module writes (the garbage collector must know them).
SAMPLES_PREFIX = "samples/"
PREDICTIONS_PREFIX = "predictions/"
#: Sources of a sample.
DATASET, UPLOAD, FEEDBACK = "dataset", "upload", "feedback"
#: Objects stored or read at once (puts of an expansion, gets of a snapshot).
IO_THREADS = 8
#: Conflicts or duplicates named in one message before "and N more".
_MAX_LISTED = 10
_CHUNK = 500


class SampleError(repo.StoreError):
    """A refused sample (API: 422): the message names the image and what is accepted."""


class SamplesChanged(repo.StoreError):
    """The task's samples changed while the request ran (a concurrent add of the same picture,
    a retrain that replaced the set): nothing was written; send it again (API: 409)."""


class PredictionGone(repo.StoreError):
    """No such kept prediction (API: 404); ``expired_at`` set when it expired (its image is
    gone or going), else it never existed for this task (or was kept without ``keep``)."""

    def __init__(self, message: str, *, expired_at: dt.datetime | None = None) -> None:
        super().__init__(message)
        self.expired_at = expired_at


class PredictionUsed(repo.StoreError):
    """The prediction was already labelled with another label (API: 409)."""


def sample_key(tenant_id: str, sha256: str) -> str:
    """``samples/{tenant}/{sha256}``: the original bytes of a sample (shared by the tenant's tasks)."""
    return validate_key(f"{SAMPLES_PREFIX}{tenant_id}/{sha256}")


def prediction_key(tenant_id: str, task_id: str, prediction_id: str) -> str:
    """``predictions/{tenant}/{task}/{id}``: the image of a kept prediction, until it expires."""
    return validate_key(f"{PREDICTIONS_PREFIX}{tenant_id}/{task_id}/{prediction_id}")


# --------------------------------------------------------------------------- images in


@dataclasses.dataclass(frozen=True)
class NewImage:
    """An image on its way in: its label, its original bytes, its decoded picture's identity
    (hex ``pixel_digest``) and how messages name it (``images[0]``, ``file 'cat/a.png'``);
    ``entry``: its member name when it comes from a zip."""

    label: str
    data: bytes
    pixels: str
    name: str
    entry: str | None = None

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)


def decoded_image(label: str, data: bytes, *, name: str, max_pixels: int) -> NewImage:
    """``data`` checked as every image is (``decode_image``: ImageError naming ``name``, 413 for
    a size limit, 422 otherwise) and identified by its pixels."""
    if not data:
        raise ImageError(f"{name} is empty")
    img = decode_image(data, max_pixels=max_pixels, name=name)
    try:
        return NewImage(label=label, data=data, pixels=pixel_digest(img).hex(), name=name)
    finally:
        img.close()


def archive_images(data: bytes, limits: Any) -> tuple[ArchiveManifest, list[NewImage]]:
    """The images of a dataset zip as samples: every rule of ``store.archive`` (DatasetError),
    copies within a class kept once (``manifest.warnings`` says which were dropped), in archive
    order, each with its original bytes."""
    manifest, decoded = iter_archive_images(data, limits)
    digests: list[str] = []
    for img, _label in decoded:
        digests.append(pixel_digest(img).hex())
        img.close()
    kept = manifest.images  # once the iterator is exhausted: the kept entries, in the order yielded
    if len(kept) != len(digests):  # pragma: no cover - store.archive keeps them in step
        raise DatasetError("archive could not be read consistently; upload it again")
    out: list[NewImage] = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        for entry, digest in zip(kept, digests):
            info = infos[entry.index] if 0 <= entry.index < len(infos) else zf.getinfo(entry.path)
            out.append(NewImage(
                label=manifest.classes[entry.label], data=zf.read(info), pixels=digest, name=f"file '{entry.shown}'",
                entry=info.filename,
            ))
    return manifest, out


def _listed(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- adding samples


@dataclasses.dataclass
class Plan:
    """What an add will write: ``new`` images (in order) and the ``duplicates`` it counts once,
    as ``(image, existing sample id or None for an earlier image of the request)``."""

    new: list[NewImage]
    duplicates: list[tuple[NewImage, Sample | None]]

    def duplicate_notes(self) -> list[str]:
        notes = []
        for img, existing in self.duplicates:
            if existing is not None:
                notes.append(f"{img.name} is the same image as sample {existing.id} (class '{existing.label}'); "
                             "counted once")
            else:
                notes.append(f"{img.name} is the same image as an earlier one of this request; counted once")
        return notes


def _existing_by_pixels(s: Session, task_id: str, pixels: Iterable[str]) -> dict[str, Sample]:
    found: dict[str, Sample] = {}
    keys = sorted(set(pixels))
    for i in range(0, len(keys), _CHUNK):
        rows = s.scalars(select(Sample).where(Sample.task_id == task_id, Sample.pixels.in_(keys[i : i + _CHUNK])))
        found.update({row.pixels: row for row in rows})
    return found


def plan_additions(s: Session, task_id: str, images: Sequence[NewImage]) -> Plan:
    """Check ``images`` against the task's samples and each other (read only). SampleError
    (naming every conflict, up to 10) when a picture is already a sample, or earlier in the
    request, under another label; copies under the same label are counted once."""
    existing = _existing_by_pixels(s, task_id, (img.pixels for img in images))
    first: dict[str, NewImage] = {}
    plan = Plan(new=[], duplicates=[])
    conflicts: list[str] = []
    for img in images:
        have = existing.get(img.pixels)
        if have is not None:
            if have.label == img.label:
                plan.duplicates.append((img, have))
            else:
                conflicts.append(f"{img.name} (label '{img.label}') is already sample {have.id} of class '{have.label}'")
            continue
        earlier = first.get(img.pixels)
        if earlier is not None:
            if earlier.label == img.label:
                plan.duplicates.append((img, None))
            else:
                conflicts.append(f"{img.name} (label '{img.label}') is the same image as {earlier.name} "
                                 f"(label '{earlier.label}')")
            continue
        first[img.pixels] = img
        plan.new.append(img)
    if conflicts:
        what = "the same image is" if len(conflicts) == 1 else f"{len(conflicts)} images are"
        raise SampleError(
            f"{what} under two labels: {_listed(conflicts)}; an image can have one label only (delete the "
            "sample first to label it again)"
        )
    return plan


def put_images(objects: ObjectStore, tenant_id: str, images: Sequence[NewImage]) -> None:
    """Store each image under ``samples/{tenant}/{sha256}`` (before any row refers to it)."""
    jobs = {sample_key(tenant_id, img.sha256): img.data for img in images}
    if len(jobs) <= 1:
        for key, data in jobs.items():
            objects.put(key, data)
        return
    with ThreadPoolExecutor(max_workers=min(IO_THREADS, len(jobs)), thread_name_prefix="promptstore-put") as pool:
        for _ in pool.map(lambda kv: objects.put(*kv), jobs.items()):
            pass


def insert_samples(
    s: Session, task_id: str, images: Sequence[NewImage], *, tenant_id: str, source: str,
) -> list[Sample]:
    """Record ``images`` (their objects already stored) as samples of the task and add them to
    its ``samples_since_run``, in the caller's transaction. One conditional write first (the
    task is the tenant's and its set is expanded: it also holds the task's row against a
    snapshot in progress), then the rows. SamplesChanged, with the session rolled back, when
    the set was replaced meanwhile or a concurrent request added one of the pictures."""
    if not images:
        return []
    won = s.execute(
        update(Task)
        .where(Task.id == task_id, Task.tenant_id == tenant_id, Task.samples_seeded.is_(True))
        .values(samples_since_run=Task.samples_since_run + len(images))
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    if not won:
        s.rollback()
        raise SamplesChanged(f"task {task_id}: its samples were replaced (or it was deleted) while this request ran; "
                             "read them and send the request again")
    now = utcnow()
    rows = [
        Sample(
            task_id=task_id, tenant_id=tenant_id, label=img.label, object_key=sample_key(tenant_id, img.sha256),
            sha256=img.sha256, pixels=img.pixels, size=len(img.data), source=source, ordinal=i, created_at=now,
        )
        for i, img in enumerate(images)
    ]
    s.add_all(rows)
    try:
        s.flush()
    except IntegrityError:
        s.rollback()
        raise SamplesChanged(f"task {task_id}: a concurrent request added one of these images meanwhile; nothing was "
                             "added: send the request again") from None
    return rows


def set_retrain_after_samples(s: Session, task_id: str, n: int | None, *, tenant_id: str) -> bool:
    """Set (None: clear) the task's auto-retrain threshold; False when unknown or foreign."""
    result = s.execute(
        update(Task).where(Task.id == task_id, Task.tenant_id == tenant_id).values(retrain_after_samples=n)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def request_auto_retrain(s: Session, task_id: str, *, tenant_id: str) -> Task | None:
    """Request the task's next run if it asks for one (``retrain_after_samples`` = N set,
    ``samples_since_run`` >= N) and none is queued or running; the caller commits and then
    enqueues ``(task.id, task.attempt)``. None when nothing is due or a concurrent request or
    run won (the conditional write of ``repo.request_retrain``: at most one run at a time)."""
    row = s.execute(
        select(Task.retrain_after_samples, Task.samples_since_run, Task.run_status)
        .where(Task.id == task_id, Task.tenant_id == tenant_id)
    ).first()
    if row is None or row.retrain_after_samples is None or row.samples_since_run < row.retrain_after_samples:
        return None
    if row.run_status in ACTIVE_STATUSES:
        return None  # the samples count towards the run after it (checked when it publishes)
    try:
        return repo.request_retrain(s, task_id, tenant_id=tenant_id, samples_at_least=int(row.retrain_after_samples))
    except repo.TaskStateError:
        return None


# --------------------------------------------------------------------------- expanding the dataset


def ensure_seeded(
    sm: sessionmaker[Session], objects: ObjectStore, task_id: str, *, limits: Any,
) -> bool:
    """Expand the task's dataset zip into its first samples, once (see the module docstring);
    False when the task is gone. Raises what reading the zip raises (``ObjectNotFound``,
    ``DatasetError``)."""
    with session_scope(sm) as s:
        row = s.execute(
            select(Task.tenant_id, Task.dataset_id, Task.samples_seeded).where(Task.id == task_id)
        ).first()
        if row is None:
            return False
        if row.samples_seeded:
            return True
        ds_key = s.scalar(select(Dataset.object_key).where(Dataset.id == row.dataset_id)) if row.dataset_id else None
    tenant_id, dataset_id = row.tenant_id, row.dataset_id
    images: list[NewImage] = []
    if ds_key is not None:  # rows pointing into the zip: nothing is stored
        _manifest, images = archive_images(objects.get(ds_key), limits)
    with session_scope(sm) as s:
        same_dataset = Task.dataset_id.is_(None) if dataset_id is None else Task.dataset_id == dataset_id
        won = s.execute(
            update(Task)
            .where(Task.id == task_id, Task.samples_seeded.is_(False), same_dataset)
            .values(samples_seeded=True)
            .execution_options(synchronize_session=False)
        ).rowcount == 1
        if not won:  # another expansion committed first, or the dataset changed: read again
            s.rollback()
            again = s.execute(select(Task.samples_seeded).where(Task.id == task_id)).first()
            return again is not None and (again[0] or ensure_seeded(sm, objects, task_id, limits=limits))
        s.execute(delete(Sample).where(Sample.task_id == task_id))  # none while unexpanded; made sure
        now = utcnow()
        s.add_all(
            Sample(
                task_id=task_id, tenant_id=tenant_id, label=img.label, object_key=ds_key, entry=img.entry,
                sha256=img.sha256, pixels=img.pixels, size=len(img.data), source=DATASET, ordinal=i, created_at=now,
            )
            for i, img in enumerate(images)
        )
    if images:
        log.info("task %s: its dataset became %d samples", task_id, len(images))
    return True


# --------------------------------------------------------------------------- snapshots


def snapshot_hash(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 of the lines ``label\\tsha256\\n`` (UTF-8) of the (label, image sha256) pairs
    sorted by code point: the identity of a sample set, whatever order it was read in."""
    h = hashlib.sha256()
    for label, digest in sorted(pairs):
        h.update(f"{label}\t{digest}\n".encode("utf-8"))
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class SnapshotItem:
    id: str
    label: str
    object_key: str
    sha256: str
    #: The zip member of ``object_key`` holding the image (a dataset sample), else None.
    entry: str | None = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The samples a run trains on, in training order ((created_at, ordinal, id))."""

    items: tuple[SnapshotItem, ...]
    #: The classes of the dataset the set was expanded from, in its order (``order_classes``).
    dataset_classes: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        return snapshot_hash((i.label, i.sha256) for i in self.items)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            out[item.label] = out.get(item.label, 0) + 1
        return out

    @property
    def classes(self) -> list[str]:
        return order_classes(self.dataset_classes, self.counts)

    def record(self) -> dict[str, Any]:
        """What the published version records: ``samples_sha256``, ``n_samples``, ``sample_counts``."""
        return {"samples_sha256": self.sha256, "n_samples": len(self.items), "sample_counts": self.counts}


def order_classes(known: Sequence[str], labels: Iterable[str]) -> list[str]:
    """The classes of a sample set: those of ``known`` (the dataset's, in its order) that have
    samples, then the other labels sorted by code point."""
    have = set(labels)
    first = [c for c in known if c in have]
    return first + sorted(have - set(first))


def _read_snapshot(s: Session, task_id: str, tenant_id: str | None = None) -> Snapshot:
    mine = (Sample.tenant_id == tenant_id,) if tenant_id is not None else ()
    rows = s.execute(
        select(Sample.id, Sample.label, Sample.object_key, Sample.sha256, Sample.entry)
        .where(Sample.task_id == task_id, *mine)
        .order_by(Sample.created_at, Sample.ordinal, Sample.id)
    ).all()
    known = s.scalar(select(Dataset.classes).join(Task, Task.dataset_id == Dataset.id).where(Task.id == task_id))
    return Snapshot(
        items=tuple(SnapshotItem(r.id, r.label, r.object_key, r.sha256, r.entry) for r in rows),
        dataset_classes=tuple(str(c) for c in known) if isinstance(known, list) else (),
    )


def take_snapshot(s: Session, task_id: str, attempt: int, *, owner: str) -> Snapshot | None:
    """The job's snapshot of the task's samples for running run ``attempt`` held by ``owner``:
    resets ``samples_since_run`` (a conditional write on the run, taking the task's row first),
    then reads the set, in the caller's transaction. None when the run is not ``owner``'s any
    more (the job stops)."""
    won = s.execute(
        update(Task)
        .where(Task.id == task_id, Task.attempt == attempt, Task.run_status == RUNNING, Task.lease_owner == owner)
        .values(samples_since_run=0)
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    return _read_snapshot(s, task_id) if won else None


def current_snapshot(s: Session, task_id: str, *, tenant_id: str) -> Snapshot:
    """The tenant's task's sample set now (read only), e.g. to compare with a version's."""
    return _read_snapshot(s, task_id, tenant_id)


@dataclasses.dataclass(frozen=True)
class TaskSamples:
    """What the samples routes read of a task: its method and config (the label checks), its
    dataset's classes in their order, and its auto-retrain state."""

    id: str
    tenant_id: str
    method: str
    config: dict[str, Any]
    dataset_classes: tuple[str, ...]
    retrain_after_samples: int | None
    samples_since_run: int


def task_samples(s: Session, task_id: str, *, tenant_id: str) -> TaskSamples | None:
    """The tenant's task as the samples routes need it; None: unknown or foreign."""
    row = s.execute(
        select(Task.id, Task.tenant_id, Task.method, Task.config, Dataset.classes, Task.retrain_after_samples,
               Task.samples_since_run)
        .outerjoin(Dataset, Dataset.id == Task.dataset_id)
        .where(Task.id == task_id, Task.tenant_id == tenant_id)
    ).first()
    if row is None:
        return None
    classes = row.classes if isinstance(row.classes, list) else []
    return TaskSamples(
        id=row.id, tenant_id=row.tenant_id, method=row.method, config=dict(row.config or {}),
        dataset_classes=tuple(str(c) for c in classes), retrain_after_samples=row.retrain_after_samples,
        samples_since_run=int(row.samples_since_run or 0),
    )


def load_images(
    objects: ObjectStore, snapshot: Snapshot, *, max_pixels: int, on_image: Callable[[Any, str], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> bool:
    """Read and decode every image of ``snapshot`` in its order and hand each to
    ``on_image(RGB image, label)`` (which closes it): a dataset zip is read once and its members
    taken from it, uploaded images are read ``IO_THREADS`` at a time. False when
    ``should_stop`` said so (checked every 32 images). SampleError naming a sample whose image
    is gone."""
    items = list(snapshot.items)
    zips: dict[str, zipfile.ZipFile] = {}

    def missing(item: SnapshotItem) -> SampleError:
        where = "its dataset zip is" if item.entry is not None else "its image is"
        return SampleError(
            f"sample {item.id} (class '{item.label}'): {where} missing from the object store; delete that sample "
            "(DELETE /v1/tasks/{id}/samples/{sample_id}) or retrain with a dataset"
        )

    def get(item: SnapshotItem) -> bytes | None:
        try:
            return objects.get(item.object_key)
        except ObjectNotFound:
            return None

    def member(item: SnapshotItem) -> bytes:
        zf = zips.get(item.object_key)
        if zf is None:
            data = get(item)
            if data is None:
                raise missing(item)
            zf = zips[item.object_key] = zipfile.ZipFile(io.BytesIO(data))
        try:
            return zf.read(str(item.entry))
        except (KeyError, zipfile.BadZipFile, OSError, ValueError):
            raise SampleError(f"sample {item.id} (class '{item.label}'): its dataset zip no longer holds "
                              f"'{item.entry}'; retrain with a dataset") from None

    try:
        with ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="promptstore-get") as pool:
            for start in range(0, len(items), 32):
                chunk = items[start : start + 32]
                fetched = {i: pool.submit(get, it) for i, it in enumerate(chunk) if it.entry is None}
                for i, item in enumerate(chunk):
                    data = member(item) if item.entry is not None else fetched[i].result()
                    if data is None:
                        raise missing(item)
                    try:
                        img = decode_image(data, max_pixels=max_pixels, name=f"sample {item.id}")
                    except ImageError as exc:
                        raise DatasetError(str(exc), over_limit=exc.over_limit) from None
                    on_image(img, item.label)
                if should_stop():
                    return False
    finally:
        for zf in zips.values():
            zf.close()
    return True


# --------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class SamplePage:
    items: list[Sample]
    #: Samples matching the filter on every page.
    count: int
    next_cursor: str | None
    #: Samples per label, over the whole set.
    counts: dict[str, int]


SAMPLES = "samples"


def sample_page(
    s: Session, task_id: str, *, tenant_id: str, limit: int | str | None = None, cursor: str | None = None,
    label: str | None = None,
) -> SamplePage:
    """One page of the task's samples, oldest first ((created_at, id)), with the count per label;
    ``label``: only that class. ``store.listing.InvalidListing`` names a bad parameter."""
    from sqlalchemy import and_, or_

    from store.listing import check_limit, decode_cursor, encode_cursor

    n = check_limit(limit)
    conds: list[Any] = [Sample.task_id == task_id, Sample.tenant_id == tenant_id]
    if label is not None:
        conds.append(Sample.label == label)
    total = int(s.scalar(select(func.count()).select_from(Sample).where(*conds)) or 0)
    if cursor:
        created_at, sample_id = decode_cursor(SAMPLES, cursor)
        conds.append(and_(
            Sample.created_at >= created_at,
            or_(Sample.created_at > created_at, and_(Sample.created_at == created_at, Sample.id > sample_id)),
        ))
    rows = list(s.scalars(select(Sample).where(*conds).order_by(Sample.created_at, Sample.id).limit(n + 1)))
    more = len(rows) > n
    rows = rows[:n]
    counts = {
        str(lbl): int(c) for lbl, c in s.execute(
            select(Sample.label, func.count()).where(Sample.task_id == task_id, Sample.tenant_id == tenant_id)
            .group_by(Sample.label).order_by(Sample.label)
        )
    }
    next_cursor = encode_cursor(SAMPLES, rows[-1].created_at, rows[-1].id) if more and rows else None
    return SamplePage(items=rows, count=total, next_cursor=next_cursor, counts=counts)


def get_sample(s: Session, task_id: str, sample_id: str, *, tenant_id: str) -> Sample | None:
    return s.scalar(
        select(Sample).where(Sample.id == sample_id, Sample.task_id == task_id, Sample.tenant_id == tenant_id)
    )


def delete_sample(s: Session, task_id: str, sample_id: str, *, tenant_id: str) -> bool:
    """Remove one sample from the task's set (its object is shared by content: the garbage
    collector deletes it once no row refers to it); False when there is no such sample."""
    result = s.execute(
        delete(Sample).where(Sample.id == sample_id, Sample.task_id == task_id, Sample.tenant_id == tenant_id)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def sample_labels(s: Session, task_id: str, *, tenant_id: str) -> list[str]:
    """The labels of the tenant's task's samples (distinct)."""
    return [str(x) for x in s.scalars(
        select(Sample.label).where(Sample.task_id == task_id, Sample.tenant_id == tenant_id).distinct()
    )]


# --------------------------------------------------------------------------- predictions


def keep_predictions(
    sm: sessionmaker[Session],
    objects: ObjectStore,
    *,
    tenant_id: str,
    task_id: str,
    version: int,
    images: Sequence[bytes],
    tops: Sequence[tuple[str | None, float | None]],
    retention_s: float,
    now: dt.datetime | None = None,
) -> list[str] | None:
    """Store each image of a classify request with ``keep=true`` (original bytes; objects first,
    then the rows in one transaction) until ``now + retention_s``; returns their prediction ids
    in order. None when the task is gone (its objects are deleted again)."""
    ids = [new_id() for _ in images]
    keys: list[str] = []
    now = now or utcnow()
    try:
        for pid, data in zip(ids, images):
            key = prediction_key(tenant_id, task_id, pid)
            objects.put(key, data)
            keys.append(key)
        with session_scope(sm) as s:
            if s.scalar(select(Task.id).where(Task.id == task_id, Task.tenant_id == tenant_id)) is None:
                raise LookupError(task_id)
            s.add_all(
                Prediction(
                    id=pid, task_id=task_id, tenant_id=tenant_id, object_key=key, sha256=sha256_hex(data),
                    size=len(data), version=int(version), label=top[0], score=top[1], created_at=now,
                    expires_at=now + dt.timedelta(seconds=retention_s),
                )
                for pid, key, data, top in zip(ids, keys, images, tops)
            )
    except BaseException as exc:
        for key in keys:  # unique keys no other row can refer to
            try:
                objects.delete(key)
            except Exception:  # the garbage collector takes it
                log.warning("could not delete %s after a failed keep", key)
        if isinstance(exc, (LookupError, IntegrityError)):
            return None
        raise
    return ids


def live_prediction(
    s: Session, task_id: str, prediction_id: str, *, tenant_id: str, now: dt.datetime | None = None,
) -> Prediction:
    """The tenant's kept prediction whose image is still kept; PredictionGone (saying when it
    expired, or that it is unknown) otherwise."""
    p = s.scalar(select(Prediction).where(
        Prediction.id == prediction_id, Prediction.task_id == task_id, Prediction.tenant_id == tenant_id,
    ))
    if p is None:
        raise PredictionGone(
            f"prediction {prediction_id} not found for task {task_id}: only images classified with keep=true are "
            "kept (their ids are the classify answer's prediction_ids)"
        )
    now = now or utcnow()
    if p.object_key is None or p.expires_at <= now:
        kept_s = round((p.expires_at - p.created_at).total_seconds())
        raise PredictionGone(
            f"prediction {prediction_id} expired at {p.expires_at.isoformat(timespec='seconds')}: kept images are "
            f"deleted {kept_s} s after classify (PROMPTSTORE_PREDICTION_RETENTION_S); classify the image again with "
            "keep=true, or add it with POST /v1/tasks/{id}/samples",
            expired_at=p.expires_at,
        )
    return p


def link_prediction(s: Session, prediction: Prediction, sample_id: str) -> bool:
    """Record that a feedback made sample ``sample_id`` of ``prediction`` (as read): one
    conditional write, False when a concurrent feedback linked it first."""
    was = prediction.sample_id
    same = Prediction.sample_id.is_(None) if was is None else Prediction.sample_id == was
    result = s.execute(
        update(Prediction).where(Prediction.id == prediction.id, same).values(sample_id=sample_id)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


@dataclasses.dataclass
class SweepReport:
    #: Keys of the expired images deleted.
    images: list[str] = dataclasses.field(default_factory=list)
    #: Prediction rows deleted (``prediction_record_s`` after their expiry).
    records: int = 0


def sweep_predictions(
    sm: sessionmaker[Session], objects: ObjectStore, *, record_s: float, now: dt.datetime | None = None,
    limit: int = 10_000,
) -> SweepReport:
    """Delete the images of expired predictions (the row's key cleared first, then the object:
    no row points at a missing object; several sweepers at once are fine) and the rows
    ``record_s`` after their expiry. A pass handles at most ``limit`` images."""
    now = now or utcnow()
    report = SweepReport()
    with session_scope(sm) as s:
        rows = s.execute(
            select(Prediction.id, Prediction.object_key)
            .where(Prediction.expires_at <= now, Prediction.object_key.is_not(None))
            .order_by(Prediction.expires_at)
            .limit(limit)
        ).all()
    for i in range(0, len(rows), _CHUNK):
        chunk = rows[i : i + _CHUNK]
        with session_scope(sm) as s:
            s.execute(
                update(Prediction)
                .where(Prediction.id.in_([r.id for r in chunk]), Prediction.object_key.is_not(None))
                .values(object_key=None)
                .execution_options(synchronize_session=False)
            )
        for r in chunk:
            try:
                objects.delete(r.object_key)
                report.images.append(r.object_key)
            except Exception as exc:  # no row refers to it any more: the garbage collector takes it
                log.warning("could not delete expired prediction image %s (%s)", r.object_key, type(exc).__name__)
    with session_scope(sm) as s:
        report.records = int(s.execute(
            delete(Prediction).where(
                Prediction.expires_at <= now - dt.timedelta(seconds=record_s), Prediction.object_key.is_(None),
            )
            .execution_options(synchronize_session=False)
        ).rowcount or 0)
    if report.images or report.records:
        log.info("predictions: deleted %d expired image(s) and %d record(s)", len(report.images), report.records)
    return report
