"""Evaluations through HTTP (``POST /v1/tasks/{id}/evaluate``, ``GET .../evaluations[/{eid}]``)
on SQLite + file:// and on Postgres + SeaweedFS S3, with jobs in the in-process ThreadDispatcher:
the figures equal references computed here (scikit-learn, the direct ECE formula, brute-force
thresholds) from the probabilities classify answers for the same images; the refusals (unknown
task or version 404, no version or another backbone 409, classes not the version's 422, bad zip
or fields 4xx); events, the zip's life cycle and the garbage collector; a broker that does not
take the job (503) and the reconciler that sends it again."""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from psdata import dataset_zip, image_bytes, make_zip
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, top_k_accuracy_score

from backbone.methods import get_method

CLASSES = ("bird", "cat", "dog")  # sorted: dataset classes follow the folder order
PROBE = get_method("linear-probe").smoke_config
CLOSE = {"rel": 1e-12, "abs": 1e-12}
#: sklearn warns that k >= the number of classes makes a perfect top-k score: so it does, and so it is checked
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")


def _settings(settings_factory: Any, backend: str, **overrides: Any) -> Any:
    if backend == "postgres":
        return settings_factory(db="postgres", objects="s3", **overrides)
    return settings_factory(db="sqlite", objects="local", **overrides)


def object_keys(settings: Any, prefix: str) -> set[str]:
    """The keys under ``prefix`` in the app's object store, read around the store's own code."""
    url = settings.object_store_url
    if url.startswith("file://"):
        root = Path(url[len("file://"):])
        found = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()
        return {k for k in found if k.startswith(prefix)}
    from store.objects import S3ObjectStore

    store = S3ObjectStore.from_url(url, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key)
    if not store.client.bucket_exists(store.bucket):
        return set()
    return {o.object_name for o in store.client.list_objects(store.bucket, prefix=prefix, recursive=True)}


def labelled_images(classes: tuple[str, ...], per_class: int, seed: int) -> list[tuple[str, int, bytes]]:
    """``(zip entry name, class index in CLASSES, image bytes)`` in the zip's order."""
    out = []
    for name in classes:
        label = CLASSES.index(name)
        for i in range(per_class):
            fmt = "JPEG" if i % 2 else "PNG"
            # a little of another class's colour now and then, so that not every answer is right
            colour = label if i % 3 else (label + 1) % len(CLASSES)
            data = image_bytes(colour, seed=seed + 31 * label + i, fmt=fmt)
            out.append((f"{name}/{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", label, data))
    return out


def zip_of(items: list[tuple[str, int, bytes]]) -> bytes:
    return make_zip({name: data for name, _, data in items})


def evaluate(api: Any, headers: dict[str, str], task_id: str, data: bytes, **fields: Any) -> Any:
    form = {k: str(v) for k, v in fields.items()}
    return api.client.post(
        f"/v1/tasks/{task_id}/evaluate", data=form, files={"dataset": ("eval.zip", data, "application/zip")},
        headers=headers,
    )


def wait_evaluation(api: Any, headers: dict[str, str], task_id: str, eid: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = api.client.get(f"/v1/tasks/{task_id}/evaluations/{eid}", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in ("ready", "failed"):
            return body
        assert time.monotonic() < deadline, f"evaluation {eid} still {body['status']}"
        time.sleep(0.05)


def classify_probs(api: Any, headers: dict[str, str], task_id: str, images: list[bytes], classes: list[str]) -> np.ndarray:
    """(N, C) softmax scores as classify answers them, in the version's class order."""
    r = api.classify_files(headers, task_id, images)
    assert r.status_code == 200, r.text
    rows = []
    for preds in r.json()["predictions"]:
        score = {p["label"]: p["score"] for p in preds}
        rows.append([score[c] for c in classes])
    return np.array(rows, dtype=np.float64)


# --------------------------------------------------------------------------- references


def reference(p: np.ndarray, y: np.ndarray, classes: list[str], *, k: int, target: float) -> dict[str, Any]:
    """The figures of an evaluation computed here from the probabilities: sklearn's metrics, the
    ECE by its definition and the thresholds by trying every score."""
    n, c = p.shape
    pred = np.argmax(p, axis=1)
    conf = p[np.arange(n), pred]
    labels = list(range(c))
    if c == 2:
        top_k = top_k_accuracy_score(y, p[:, 1], k=k, labels=labels)
    else:  # ties (none expected here) toward the class listed first, as the service ranks them
        top_k = top_k_accuracy_score(y, p - 1e-12 * np.arange(c)[None, :], k=k, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=np.nan)

    def brute(scores: list[float], right: list[bool]) -> tuple[float | None, int]:
        best: tuple[float | None, int] = (None, 0)
        for t in sorted(set(scores), reverse=True):
            answered = [r for s, r in zip(scores, right) if s >= t]
            if sum(answered) / len(answered) >= target:
                best = (t, len(answered))
        return best

    per_class = []
    for cls in range(c):
        mine = pred == cls
        per_class.append({
            "label": classes[cls],
            "precision": None if math.isnan(prec[cls]) else float(prec[cls]),
            "recall": None if math.isnan(rec[cls]) else float(rec[cls]),
            "f1": None if math.isnan(f1[cls]) else float(f1[cls]),
            "support": int(support[cls]),
            "threshold": brute(conf[mine].tolist(), (y[mine] == cls).tolist())[0],
        })
    ece, bins = 0.0, []
    for m in range(1, 16):
        lo, hi = (m - 1) / 15, m / 15
        idx = [i for i in range(n) if lo < conf[i] <= hi]
        if idx:
            acc = sum(bool(pred[i] == y[i]) for i in idx) / len(idx)
            mean = sum(float(conf[i]) for i in idx) / len(idx)
            ece += len(idx) / n * abs(acc - mean)
            bins.append({"lower": lo, "upper": hi, "confidence": mean, "accuracy": acc, "count": len(idx)})
        else:
            bins.append({"lower": lo, "upper": hi, "confidence": None, "accuracy": None, "count": 0})
    suggested, answered = brute(conf.tolist(), (pred == y).tolist())
    return {
        "n_images": n,
        "classes": classes,
        "accuracy": float(accuracy_score(y, pred)),
        "top_k_accuracy": {"k": k, "accuracy": float(top_k)},
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "per_class": per_class,
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
        "ece": ece,
        "reliability": bins,
        "suggested_min_score": suggested,
        "coverage_at_suggested": None if suggested is None else answered / n,
    }


def assert_same_figures(got: Any, want: Any, path: str = "result") -> None:
    """Equal: counts, labels, thresholds (scores) exactly; averages to the last bits of a sum."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, got, want)
        for key in want:
            assert_same_figures(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (path, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_figures(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not path.endswith(("threshold", "suggested_min_score")):
        assert got == pytest.approx(want, **CLOSE), (path, got, want)
    else:
        assert got == want, (path, got, want)


# --------------------------------------------------------------------------- the flow


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_evaluation_end_to_end(backend: str, settings_factory: Any, make_api: Any) -> None:
    from store import evaluations as evals
    from store.db import session_scope
    from store.events import list_events

    settings = _settings(settings_factory, backend)
    api = make_api(settings)
    tenant = api.tenant()
    created = api.create_task(tenant, "linear-probe", dataset=dataset_zip(CLASSES, per_class=4), config=PROBE).json()
    tid = created["id"]
    task = api.wait_ready(tenant, tid)
    classes = task["classes"]
    assert classes == list(CLASSES)
    # tuning's validation metrics carry the per-class figures too (shown with include=per_class)
    full = api.client.get(f"/v1/tasks/{tid}?include=per_class", headers=tenant).json()
    assert isinstance(full["metrics"]["macro_f1"], float)
    assert [r["label"] for r in full["metrics"]["per_class"]] == classes
    assert set(full["metrics"]["per_class"][0]) == {"label", "precision", "recall", "f1", "support"}
    assert sum(r["support"] for r in full["metrics"]["per_class"]) == full["metrics"]["n_val"]

    items = labelled_images(CLASSES, per_class=5, seed=300)
    r = evaluate(api, tenant, tid, zip_of(items), top_k=2, precision=0.6)
    assert r.status_code == 202, r.text
    queued = r.json()
    eid = queued["id"]
    assert queued["task_id"] == tid and queued["version"] == 1 and queued["status"] in ("queued", "running", "ready")
    assert queued["params"] == {"top_k": 2, "precision": 0.6}
    assert queued["finished_at"] is None or queued["status"] == "ready"

    done = wait_evaluation(api, tenant, tid, eid)
    assert done["status"] == "ready", done["error"]
    assert done["error"] is None and done["finished_at"] is not None
    assert dt.datetime.fromisoformat(done["finished_at"]) >= dt.datetime.fromisoformat(done["created_at"])

    # the same images through classify: the figures are the ones computed from its scores
    p = classify_probs(api, tenant, tid, [data for _, _, data in items], classes)
    y = np.array([label for _, label, _ in items])
    want = reference(p, y, classes, k=2, target=0.6)
    assert_same_figures(done["result"], want)

    # a subset of the classes, defaults for top_k and precision
    subset = labelled_images(("bird", "dog"), per_class=3, seed=700)
    r = evaluate(api, tenant, tid, zip_of(subset))
    assert r.status_code == 202, r.text
    sub = wait_evaluation(api, tenant, tid, r.json()["id"])
    assert sub["status"] == "ready", sub["error"]
    assert sub["params"] == {"top_k": 3, "precision": 0.9}  # min(5, 3 classes)
    p2 = classify_probs(api, tenant, tid, [d for _, _, d in subset], classes)
    want2 = reference(p2, np.array([label for _, label, _ in subset]), classes, k=3, target=0.9)
    assert_same_figures(sub["result"], want2)
    assert sub["result"]["per_class"][1]["support"] == 0  # "cat" has no image here

    # the list: newest first, slim
    listed = api.client.get(f"/v1/tasks/{tid}/evaluations", headers=tenant).json()
    assert listed["count"] == 2 and [e["id"] for e in listed["items"]] == [sub["id"], eid]
    slim = listed["items"][1]["result"]
    assert not {"per_class", "confusion", "reliability"} & set(slim)
    assert slim["accuracy"] == done["result"]["accuracy"] and slim["ece"] == done["result"]["ece"]

    # events, and the zips are gone once the results are stored
    with session_scope(api.state.sessionmaker) as s:
        events = [(e.kind, e.data) for e in list_events(s, tid, tenant_id=_tenant_id(api, tenant))]
        rows = evals.list_evaluations(s, tid, tenant_id=_tenant_id(api, tenant))
        assert all(row.object_key is None for row in rows)
    kinds = [k for k, _ in events]
    assert kinds.count("evaluation_queued") == 2 and kinds.count("evaluated") == 2
    first_done = next(d for k, d in events if k == "evaluated" and d["evaluation_id"] == eid)
    assert first_done == {"evaluation_id": eid, "version": 1, "accuracy": done["result"]["accuracy"]}
    assert kinds.index("evaluation_queued") < kinds.index("evaluated")
    assert object_keys(settings, "evaluations/") == set()

    # a retrain makes version 2; version 1 can still be evaluated, and says so
    r = api.client.post(f"/v1/tasks/{tid}/retrain", headers=tenant)
    assert r.status_code == 202, r.text
    api.wait(tenant, tid, lambda t: t["version"] == 2 and t["training"]["status"] == "ready")
    r = evaluate(api, tenant, tid, zip_of(items), version=1, top_k=2, precision=0.6)
    assert r.status_code == 202, r.text
    again = wait_evaluation(api, tenant, tid, r.json()["id"])
    assert again["status"] == "ready" and again["version"] == 1
    assert again["result"] == done["result"]  # the same version on the same images
    r = evaluate(api, tenant, tid, zip_of(items))
    assert r.status_code == 202 and r.json()["version"] == 2  # default: the served version

    # deleting the task takes its evaluations along
    assert api.client.delete(f"/v1/tasks/{tid}", headers=tenant).status_code == 204
    assert api.client.get(f"/v1/tasks/{tid}/evaluations", headers=tenant).status_code == 404
    assert api.client.get(f"/v1/tasks/{tid}/evaluations/{eid}", headers=tenant).status_code == 404


def _tenant_id(api: Any, headers: dict[str, str]) -> str:
    from store import repo
    from store.db import session_scope

    with session_scope(api.state.sessionmaker) as s:
        owner = repo.tenant_by_api_key(s, headers["Authorization"].split(" ", 1)[1])
        assert owner is not None
        return owner.id


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_refusals(backend: str, settings_factory: Any, make_api: Any) -> None:
    from store import repo
    from store.db import session_scope
    from store.models import PromptVersion

    api = make_api(_settings(settings_factory, backend))
    tenant = api.tenant()
    tid = api.create_task(tenant, "zeroshot", classes=list(CLASSES)).json()["id"]
    api.wait_ready(tenant, tid)
    good = zip_of(labelled_images(CLASSES, per_class=2, seed=11))

    def refused(status: int, *needles: str, task_id: str = tid, data: bytes = good, **fields: Any) -> str:
        r = evaluate(api, tenant, task_id, data, **fields)
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        for needle in needles:
            assert needle in detail, detail
        return detail

    refused(404, "not found", task_id="0" * 32)
    refused(404, "no version 7", "versions kept: 1", version=7)
    # classes that are not the task's: 422 naming them (and only them)
    strange = zip_of([("cat/1.png", 1, image_bytes(1, seed=1)), ("zebra/1.png", 0, image_bytes(0, seed=2)),
                      ("yak/1.png", 2, image_bytes(2, seed=3))])
    detail = refused(422, "'zebra'", "'yak'", data=strange)
    assert "not among version 1's classes" in detail and detail.index("'yak'") < detail.index("not among")
    refused(422, "invalid dataset", data=b"this is not a zip")
    refused(422, "does not take the field(s) 'name'", name="x")
    refused(422, "precision", precision=0)
    refused(422, "precision", precision=1.5)
    refused(422, "precision", precision="nan")
    refused(422, "top_k", top_k=0)
    refused(404, "no version 0", "versions kept: 1", version=0)
    for bad in (-1, 2**31, "99999999999999999999", "x"):
        refused(422, "version", version=bad)
    r = api.client.post(f"/v1/tasks/{tid}/evaluate", headers=tenant)
    assert r.status_code in (415, 422), r.text
    r = api.client.post(f"/v1/tasks/{tid}/evaluate", json={}, headers=tenant)
    assert r.status_code == 415 and "-F dataset=@data.zip -F version=" in r.json()["detail"], r.text
    assert "name=" not in r.json()["detail"]
    # a field sent twice would have one of its values ignored: refused
    r = api.client.post(f"/v1/tasks/{tid}/evaluate", data={"version": ["1", "2"]},
                        files={"dataset": ("d.zip", good, "application/zip")}, headers=tenant)  # fmt: skip
    assert r.status_code == 422 and "'version' were sent more than once" in r.json()["detail"], r.text

    # a task without a version yet: 409
    with session_scope(api.state.sessionmaker) as s:
        pending = repo.create_task(s, tenant_id=_tenant_id(api, tenant), name="later", method="zeroshot", config={},
                                   classes=list(CLASSES)).id  # committed, never sent: stays queued
    refused(409, "no prompt version yet", task_id=pending)
    refused(409, "no prompt version yet", task_id=pending, version=1)

    # a version made on another backbone: 409
    with session_scope(api.state.sessionmaker) as s:
        v1 = repo.get_version(s, tid, 1, tenant_id=_tenant_id(api, tenant))
        s.add(PromptVersion(task_id=tid, tenant_id=v1.tenant_id, version=2, object_key=v1.object_key, sha256=v1.sha256,
                            size=v1.size, fingerprint="open_clip:tiny:random@1#" + "0" * 64, method=v1.method,
                            classes=v1.classes))
    refused(409, "tuned on backbone open_clip:tiny:random@1", "cannot be evaluated here", version=2)

    # another tenant sees nothing
    other = api.tenant()
    r = evaluate(api, other, tid, good)
    assert r.status_code == 404
    r = evaluate(api, tenant, tid, good)
    assert r.status_code == 202, r.text
    eid = r.json()["id"]
    assert api.client.get(f"/v1/tasks/{tid}/evaluations/{eid}", headers=other).status_code == 404
    assert api.client.get(f"/v1/tasks/{tid}/evaluations", headers=other).status_code == 404
    r = api.client.get(f"/v1/tasks/{tid}/evaluations/{'f' * 32}", headers=tenant)
    assert r.status_code == 404 and "no evaluation" in r.json()["detail"]
    assert wait_evaluation(api, tenant, tid, eid)["status"] == "ready"
    assert api.client.get(f"/v1/tasks/{tid}/evaluations/{eid}").status_code == 401
    # nothing stored by a refused request lingers under evaluations/ (only the accepted one, now gone)
    assert object_keys(api.state.settings, "evaluations/") == set()


# --------------------------------------------------------------------------- zips, GC, broker


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_zip_of_a_deleted_task_is_collected(backend: str, settings_factory: Any, make_api: Any) -> None:
    """A queued evaluation's zip is referenced (fsck and the collector keep it); once its task is
    deleted (the rows go by ON DELETE CASCADE) the collector deletes it."""
    from store import evaluations as evals
    from store.consistency import check, collect
    from store.db import session_scope
    from store.objects import evaluation_key

    settings = _settings(settings_factory, backend)
    api = make_api(settings)
    tenant = api.tenant()
    tid = api.create_task(tenant, "zeroshot", classes=list(CLASSES)).json()["id"]
    api.wait_ready(tenant, tid)
    tenant_id = _tenant_id(api, tenant)
    eid = evals.new_evaluation_id()
    key = evaluation_key(tenant_id, tid, eid)
    api.state.objects.put(key, b"zip bytes")
    with session_scope(api.state.sessionmaker) as s:  # committed, never sent (as if the API died)
        evals.create_evaluation(s, evaluation_id=eid, task_id=tid, tenant_id=tenant_id, version=1, object_key=key,
                                sha256="0" * 64, size=9, params={"top_k": 1, "precision": 0.9})
    report = collect(api.state.sessionmaker, api.state.objects, grace_s=0)
    assert key not in report.collected and api.state.objects.exists(key)
    listed = api.client.get(f"/v1/tasks/{tid}/evaluations", headers=tenant).json()
    assert listed["items"][0]["status"] == "queued" and listed["items"][0]["result"] is None

    api.state.objects.delete(key)  # fsck names the row whose zip is missing
    missing = check(api.state.sessionmaker, api.state.objects, grace_s=0).missing  # (Postgres: other tests' rows too)
    assert [(m.table, m.id, m.object_key) for m in missing if m.task_id == tid] == [("evaluations", eid, key)]
    api.state.objects.put(key, b"zip bytes")

    assert api.client.delete(f"/v1/tasks/{tid}", headers=tenant).status_code == 204
    with session_scope(api.state.sessionmaker) as s:
        assert evals.get_evaluation_for_job(s, eid) is None
    report = collect(api.state.sessionmaker, api.state.objects, grace_s=0)
    assert key in report.collected and not api.state.objects.exists(key)
    assert check(api.state.sessionmaker, api.state.objects, grace_s=0).orphans == []


def test_broker_down_503_then_the_reconciler_sends_it(settings_factory: Any, make_api: Any) -> None:
    """An API whose broker does not answer keeps the evaluation queued and answers 503 naming
    it; a runner's reconciler (here the in-process one) sends it again and it completes."""
    from procs import free_port

    settings = _settings(settings_factory, "sqlite")
    runner = make_api(settings.model_copy(update={"reconcile_interval_s": 0.2, "requeue_queued_after_s": 0.5}))
    tenant = runner.tenant()
    tid = runner.create_task(tenant, "zeroshot", classes=list(CLASSES)).json()["id"]
    runner.wait_ready(tenant, tid)

    cut_off = make_api(settings.model_copy(update={
        "broker_url": f"redis://127.0.0.1:{free_port()}/0", "broker_timeout": 0.2, "broker_deadline": 1.0,
    }))
    r = evaluate(cut_off, tenant, tid, zip_of(labelled_images(CLASSES, per_class=2, seed=5)))
    assert r.status_code == 503, r.text
    assert r.headers.get("Retry-After")
    detail = r.json()["detail"]
    assert "stays queued" in detail and "do not submit it again" in detail
    listed = runner.client.get(f"/v1/tasks/{tid}/evaluations", headers=tenant).json()
    assert listed["count"] == 1
    eid = listed["items"][0]["id"]
    assert eid in detail
    done = wait_evaluation(runner, tenant, tid, eid)
    assert done["status"] == "ready" and done["result"]["n_images"] == 6
