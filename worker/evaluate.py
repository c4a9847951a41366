"""The evaluation job: one body, run by Celery (``worker.tasks``, ``promptstore.evaluate``) and
by the in-process runner of ``promptstore serve`` (``worker.dispatch.ThreadDispatcher``).

``run_evaluation_job(evaluation_id, settings=...)`` receives an id only. It

1. claims the evaluation as a unique owner with a lease (``store.evaluations``): a finished or
   deleted evaluation, or one running under another owner's live lease, is a no-op, so a
   duplicate delivery does nothing; a heartbeat thread renews the lease every quarter of
   ``settings.run_lease_s``, and the lease is released when the job stops without finishing
   (shutdown, transient error) so that a retry can claim it at once;
2. loads the evaluated version's prompt from the object store onto the process's backbone
   exactly as the serving engine does (``load_prompt`` + ``prepare_resident``);
3. decodes the labelled zip with ``store.archive`` (the checks of an upload), preprocesses the
   images with the backbone and runs them in batches of ``EVAL_BATCH`` through
   ``forward_mixed``, the serving engine's forward, taking the softmax of each image's logits
   as classify does (``api.engine.batcher.top_predictions``);
4. computes the figures (``backbone.evaluation.evaluate``) and stores them (status ready), or
   fails the evaluation with a readable reason (never a traceback); either way the zip's key
   is cleared in that transaction and the zip deleted after the commit.

Errors: a transient infrastructure error is re-raised as ``TransientJobError`` so that the
caller retries the job; anything else fails the evaluation.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from backbone.holder import get_backbone
from store import evaluations as evals
from store import logcontext, repo
from store.archive import ArchiveLimits, DatasetError, iter_archive_images
from store.db import get_sessionmaker, session_scope
from store.objects import ObjectNotFound, ObjectStoreError, get_object_store
from worker.jobs import JobInterrupted, TransientJobError, _brief, _jsonable, is_transient
from worker.lease import JobLease

if TYPE_CHECKING:
    from store.settings import Settings

log = logging.getLogger("promptstore.worker")

#: Images per forward.
EVAL_BATCH = 64

#: Logged when a job finds its evaluation taken over (lease expired, re-queued, claimed again).
LOST_LEASE = "evaluation %s: lost its lease (re-queued and taken over); stopping without storing a result"


class EvaluationFailed(Exception):
    """An expected failure; the message is the tenant-facing reason."""


def run_evaluation_job(evaluation_id: str, *, settings: "Settings", stop_event: threading.Event | None = None) -> str:
    """Run the evaluation; returns what happened (``"ready"``, ``"failed"``, ``"skipped"``,
    ``"lost"``). Raises ``TransientJobError`` for errors worth a retry, ``JobInterrupted`` when
    ``stop_event`` is set (process shutting down)."""
    try:
        return _run(evaluation_id, settings, stop_event)
    except (TransientJobError, JobInterrupted):
        raise
    except Exception as exc:
        if is_transient(exc):
            log.warning("evaluation %s: transient error, will retry: %s", evaluation_id, _brief(exc))
            raise TransientJobError(f"{type(exc).__name__}: {_brief(exc)}") from exc
        raise


class _Input:
    def __init__(self, ev: Any, prompt_key: str | None) -> None:
        self.id: str = ev.id
        self.task_id: str = ev.task_id
        self.tenant_id: str = ev.tenant_id
        self.version: int = ev.version
        self.zip_key: str | None = ev.object_key
        self.params: dict[str, Any] = dict(ev.params or {})
        self.prompt_key = prompt_key


def _run(evaluation_id: str, settings: "Settings", stop_event: threading.Event | None) -> str:
    sm = get_sessionmaker(settings.database_url)
    owner = repo.new_lease_owner()
    with session_scope(sm) as s:
        ev = evals.claim_evaluation(s, evaluation_id, owner=owner, lease_s=settings.run_lease_s)
        if ev is None:
            log.info("evaluation %s: nothing to do (finished, deleted or running under another worker's live "
                     "lease)", evaluation_id)
            return "skipped"
        pv = repo.get_version(s, ev.task_id, ev.version, tenant_id=ev.tenant_id)
        inp = _Input(ev, pv.object_key if pv is not None else None)
    with logcontext.bind(task_id=inp.task_id, tenant_id=inp.tenant_id):
        log.info("evaluation %s: evaluating version %s of task %s", inp.id, inp.version, inp.task_id)
        lease = JobLease(
            sm, owner=owner, lease_s=settings.run_lease_s, label=f"evaluation {inp.id}",
            renew=lambda s: evals.renew_evaluation_lease(s, inp.id, owner=owner, lease_s=settings.run_lease_s),
            release=lambda s: evals.release_evaluation_lease(s, inp.id, owner=owner),
        )
        lease.start()
        try:
            return _evaluate_and_store(inp, settings, sm, owner, lease, stop_event)
        finally:
            lease.stop()
            lease.release()  # a no-op once finished; else a retry may claim it at once


def _evaluate_and_store(
    inp: "_Input", settings: "Settings", sm: Any, owner: str, lease: JobLease, stop_event: threading.Event | None
) -> str:
    try:
        result = _evaluate(inp, settings, lease, stop_event)
    except (TransientJobError, JobInterrupted):
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        reason = _failure_reason(exc, inp)
        if reason is None:
            log.exception("evaluation %s: failed", inp.id)
            reason = f"evaluation failed: internal error ({type(exc).__name__}); the service log has the details"
        else:
            log.info("evaluation %s: failed: %s", inp.id, reason)
        with session_scope(sm) as s:
            won, key = evals.fail_evaluation(s, inp.id, error=reason, owner=owner)
        if not won:
            return _not_ours(sm, settings, inp)
        _delete_zip(settings, key)
        return "failed"
    if result is None:  # the lease was lost: taken over, or the row went with its task
        return _not_ours(sm, settings, inp)
    with session_scope(sm) as s:
        won, key = evals.finish_evaluation(s, inp.id, owner=owner, result=result)
    if not won:
        return _not_ours(sm, settings, inp)
    _delete_zip(settings, key)
    log.info("evaluation %s: ready (version %s, %d images, accuracy %s)", inp.id, inp.version,
             result["n_images"], result["accuracy"])
    return "ready"


def _not_ours(sm: Any, settings: "Settings", inp: _Input) -> str:
    """The finishing write lost: the row is gone (its task was deleted: drop the zip now, no row
    can refer to it any more) or another execution holds it."""
    with session_scope(sm) as s:
        gone = evals.get_evaluation_for_job(s, inp.id) is None
    if gone:
        log.info("evaluation %s: deleted meanwhile (with its task); nothing stored", inp.id)
        _delete_zip(settings, inp.zip_key)
        return "skipped"
    log.warning(LOST_LEASE, inp.id)
    return "lost"


def _delete_zip(settings: "Settings", key: str | None) -> None:
    if key is None:
        return
    try:
        get_object_store(settings).delete(key)
    except Exception as exc:  # no row refers to it any more: the garbage collector takes it
        log.warning("evaluation zip %s could not be deleted (the garbage collector will): %s", key, _brief(exc))


def _failure_reason(exc: BaseException, inp: _Input) -> str | None:
    """A tenant-facing reason for an expected failure, or None for an unexpected one."""
    from backbone import BackboneError, PromptFormatError, PromptMismatch

    if isinstance(exc, EvaluationFailed):
        return str(exc)
    if isinstance(exc, DatasetError):
        return f"invalid dataset: {exc}"
    if isinstance(exc, PromptMismatch):
        return f"version {inp.version} cannot be evaluated on this service: {exc}"
    if isinstance(exc, PromptFormatError):
        return f"prompt error: {exc}"
    if isinstance(exc, ObjectNotFound):
        return ("a stored object the evaluation needs (its zip or the version's prompt) is missing from the object "
                "store; submit the evaluation again")
    if isinstance(exc, BackboneError):
        return "the backbone could not be loaded; the service operator must fix PROMPTSTORE_BACKBONE"
    if isinstance(exc, ObjectStoreError):
        return "the object store refused the request; the service log has the details"
    return None


def _evaluate(
    inp: _Input, settings: "Settings", lease: JobLease, stop_event: threading.Event | None
) -> dict[str, Any] | None:
    """The figures, or None when the lease was lost (another execution took over)."""
    import torch

    from backbone import forward_mixed, load_prompt, prepare_resident
    from backbone.artifacts import non_finite_tensor
    from backbone.evaluation import evaluate

    if inp.prompt_key is None:
        raise EvaluationFailed(
            f"version {inp.version} of the task is no longer kept (pruned); evaluate a version the task keeps"
        )
    if inp.zip_key is None:
        raise EvaluationFailed("the evaluation's zip is gone; submit the evaluation again")
    objects = get_object_store(settings)
    bb = get_backbone(settings.backbone, settings.device)
    prompt = load_prompt(objects.get(inp.prompt_key), bb)
    bad = non_finite_tensor(prompt.tensors)
    if bad is not None:
        raise EvaluationFailed(
            f"version {inp.version}'s prompt is unusable: its tensor {bad!r} holds NaN or infinite values (its "
            "training diverged); retrain the task with a lower learning rate"
        )
    resident = prepare_resident(bb, prompt)
    classes = list(prompt.classes)
    index = {c: i for i, c in enumerate(classes)}

    data = objects.get(inp.zip_key)
    manifest, decoded = iter_archive_images(data, ArchiveLimits.from_settings(settings))
    del data
    unknown = [c for c in manifest.classes if c not in index]
    if unknown:
        decoded.close()  # type: ignore[attr-defined]
        raise EvaluationFailed(
            f"the zip's class(es) {', '.join(map(repr, unknown))} are not among version {inp.version}'s classes "
            f"({', '.join(map(repr, classes))})"
        )
    to_version = [index[c] for c in manifest.classes]

    probs: list[torch.Tensor] = []
    labels: list[int] = []
    batch: list[Any] = []

    def flush() -> None:
        images = bb.preprocess_batch(batch)  # (B, 3, S, S), as the serving engine preprocesses
        for img in batch:
            img.close()
        batch.clear()
        owner = torch.zeros(images.shape[0], dtype=torch.long)
        with torch.inference_mode():
            logits = forward_mixed(bb, [resident], images, owner)  # B x (C,)
            for row in logits:  # each row as classify scores it (api.engine.batcher.top_predictions)
                p = torch.softmax(row.float(), dim=-1)
                if not bool(torch.isfinite(row).all() and torch.isfinite(p).all()):
                    raise EvaluationFailed(
                        f"version {inp.version}'s prompt produced non-finite scores (NaN or infinite logits) for "
                        f"image {len(probs)}; retrain the task (with a lower learning rate if its training was "
                        "unstable)"
                    )
                probs.append(p)

    try:
        for img, label in decoded:
            batch.append(img)
            labels.append(to_version[label])
            if len(batch) == EVAL_BATCH:
                flush()
                if stop_event is not None and stop_event.is_set():
                    raise JobInterrupted()
                if lease.lost.is_set():
                    return None
        if batch:
            flush()
    finally:
        for img in batch:
            img.close()
        decoded.close()  # type: ignore[attr-defined]
    if lease.lost.is_set():
        return None
    if not probs:
        raise EvaluationFailed("the zip holds no image")
    params = inp.params
    k = int(params.get("top_k") or min(5, len(classes)))
    target = float(params.get("precision") or 0.9)
    matrix = torch.stack(probs).numpy()  # (N, C) float32, the scores classify answers
    return _jsonable(evaluate(matrix, labels, classes, top_k=k, precision=target))


def mark_evaluation_failed_after_retries(
    evaluation_id: str, *, settings: "Settings", exc: BaseException | None
) -> None:
    """Best effort: the job gave up after its retries; say so on the evaluation."""
    what = type(exc).__name__ if exc is not None else "a transient error"
    try:
        sm = get_sessionmaker(settings.database_url)
        with session_scope(sm) as s:
            won, key = evals.fail_evaluation(
                s, evaluation_id,
                error=f"evaluation failed: the service's storage stayed unreachable ({what}); submit it again",
            )
        if won:
            _delete_zip(settings, key)
    except Exception:  # the database itself may be what is down
        log.exception("evaluation %s: could not record the failure", evaluation_id)
