"""``promptstore bench dashboard``: server render time of every admin page with a full index.

Fills a database (a fresh SQLite file by default, or ``--database-url``) with tenants and
``--tasks`` tasks in every status (ready ones with a per-epoch history, a confusion matrix
and a prompt version row; failed ones with a reason; running ones mid-way), then requests
each page ``--repeat`` times through the real app (in-process ASGI client, admin token in a
Bearer header) and reports the handler's own time (its ``Server-Timing`` header: queries
plus template rendering) and the round trip, against the 300 ms target. Prints a table and
writes JSON.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_MS = 300.0
METHODS = ("coop", "cocoop", "vpt-shallow", "vpt-deep", "padding", "linear-probe", "zeroshot")


def fill_index(database_url: str, *, tasks: int, tenants: int, epochs: int, classes: int, seed: int = 0) -> dict[str, Any]:
    """Insert the synthetic index; returns ids the pages are requested with."""
    from store import repo
    from store.db import make_engine, make_sessionmaker, session_scope, utcnow
    from store.models import PromptVersion, Task

    rnd = random.Random(seed)
    engine = make_engine(database_url)
    sm = make_sessionmaker(engine)
    names = [f"class-{i}" for i in range(classes)]
    ready_ids: list[str] = []
    all_ids: list[str] = []
    try:
        with session_scope(sm) as s:
            tenant_ids, dataset_ids = [], []
            for n in range(tenants):
                t, _ = repo.create_tenant(s, f"bench-tenant-{n:03d}")
                t.request_count = rnd.randrange(100_000)
                tenant_ids.append(t.id)
                ds = repo.create_dataset(
                    s, tenant_id=t.id, object_key=f"datasets/{t.id}/{n:064x}.zip", sha256=f"{n:064x}", size=1 << 20,
                    classes=names, counts={c: 16 for c in names},
                )
                dataset_ids.append(ds.id)
            rows, versions = [], []
            for i in range(tasks):
                k = i % tenants
                roll = rnd.random()
                status = "ready" if roll < 0.7 else "failed" if roll < 0.8 else "running" if roll < 0.9 else "queued" if roll < 0.95 else "cancelled"
                method = METHODS[i % len(METHODS)]
                task = Task(
                    tenant_id=tenant_ids[k], name=f"task-{i:05d}", method=method, config={"epochs": epochs, "seed": i},
                    classes=names, dataset_id=None if method == "zeroshot" else dataset_ids[k], status=status,
                    progress={"ready": 1.0, "running": rnd.random(), "queued": 0.0}.get(status, rnd.random()),
                    attempt=1, cancel_requested=False,
                )
                if status in ("ready", "running"):
                    done = epochs if status == "ready" else max(1, int(epochs * task.progress))
                    task.history = [
                        {"epoch": e, "loss": 2.3 * 0.93**e + rnd.random() * 0.05, "val_accuracy": min(1.0, 0.1 + e / epochs)}
                        for e in range(1, done + 1)
                    ]
                if status == "ready":
                    task.version = 1
                    n_val = 4 * classes
                    matrix = [[0] * classes for _ in range(classes)]
                    for r in range(classes):
                        for _ in range(4):
                            matrix[r][r if rnd.random() < 0.8 else rnd.randrange(classes)] += 1
                    task.confusion = matrix
                    task.metrics = {
                        "val_accuracy": sum(matrix[r][r] for r in range(classes)) / n_val, "train_accuracy": 1.0,
                        "train_seconds": round(rnd.uniform(5, 500), 3), "n_train": 12 * classes, "n_val": n_val,
                        "epochs": epochs,
                    }
                if status == "failed":
                    task.error = f"invalid config: pad={i} leaves no image: 2 * pad must be smaller than the image size 32"
                rows.append(task)
            s.add_all(rows)
            s.flush()
            now = utcnow()
            for task in rows:
                all_ids.append(task.id)
                if task.version is not None:
                    ready_ids.append(task.id)
                    versions.append(PromptVersion(
                        task_id=task.id, tenant_id=task.tenant_id, version=1,
                        object_key=f"prompts/{task.tenant_id}/{task.id}/{'0' * 64}.safetensors", sha256="0" * 64,
                        size=50_000, fingerprint="open_clip:tiny:random@0#0123456789abcdef", created_at=now,
                    ))
            s.add_all(versions)
    finally:
        engine.dispose()
    return {"ready": ready_ids, "all": all_ids, "tenants": tenant_ids}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_dashboard_bench(
    out: str,
    *,
    tasks: int = 1000,
    tenants: int = 20,
    epochs: int = 50,
    classes: int = 10,
    repeat: int = 20,
    database_url: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.migrate import upgrade
    from store.settings import Settings

    tmp = tempfile.TemporaryDirectory(prefix="promptstore-bench-dashboard-")
    try:
        url = database_url or f"sqlite:///{Path(tmp.name) / 'index.db'}"
        upgrade(url)
        t0 = time.perf_counter()
        ids = fill_index(url, tasks=tasks, tenants=tenants, epochs=epochs, classes=classes)
        fill_s = time.perf_counter() - t0
        token = "bench-admin-token-" + "z" * 24
        settings = Settings(
            database_url=url, object_store_url=f"file://{Path(tmp.name) / 'objects'}", backbone="open_clip:tiny:random",
            device="cpu", admin_token=token, broker_url=None, redis_url=None,
        )
        app = create_app(settings)
        # No lifespan: the synthetic queued/running runs must not be picked up by job threads.
        # The backbone loads as at a normal start, so the overview shows it.
        app.state.ps.backbone.start()
        app.state.ps.backbone.wait(120)
        detail = ids["ready"][len(ids["ready"]) // 2]
        pages = [
            ("overview", "/admin"),
            ("tasks (first page)", "/admin/tasks"),
            ("tasks (sort tenant, page 5)", "/admin/tasks?sort=tenant&order=asc&page=5"),
            ("tasks (filter ready+coop)", "/admin/tasks?status=ready&method=coop"),
            ("task detail", f"/admin/tasks/{detail}"),
            ("delete confirmation", f"/admin/tasks/{detail}/delete"),
            ("tenants", "/admin/tenants"),
            ("feed: overview", "/admin/api/overview"),
            ("feed: 100 tasks", "/admin/api/tasks?ids=" + ",".join(ids["all"][:100])),
        ]
        results = []
        client = TestClient(app)  # not entered: no lifespan
        try:
            headers = {"Authorization": f"Bearer {token}"}
            for label, path in pages:
                server, client_ms, size = [], [], 0
                for n in range(repeat + 2):
                    start = time.perf_counter()
                    r = client.get(path, headers=headers)
                    wall = 1000 * (time.perf_counter() - start)
                    if r.status_code != 200:
                        raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:200]}")
                    if n < 2:  # warm-up (template compile, caches)
                        continue
                    server.append(float(r.headers["server-timing"].split("dur=")[1]))
                    client_ms.append(wall)
                    size = len(r.content)
                results.append({
                    "page": label, "path": path.split("?ids=")[0] + ("?ids=<100 ids>" if "?ids=" in path else ""),
                    "server_ms_p50": round(statistics.median(server), 2), "server_ms_p95": round(_pct(server, 0.95), 2),
                    "server_ms_max": round(max(server), 2), "roundtrip_ms_p50": round(statistics.median(client_ms), 2),
                    "bytes": size, "under_target": _pct(server, 0.95) < TARGET_MS,
                })
        finally:
            client.close()
        report = {
            "bench": "dashboard",
            "target_ms": TARGET_MS,
            "database": url.split(":", 1)[0],
            "tasks": tasks, "tenants": tenants, "epochs_per_history": epochs, "classes": classes, "repeat": repeat,
            "fill_seconds": round(fill_s, 2),
            "python": platform.python_version(), "machine": platform.machine(),
            "results": results,
            "all_under_target": all(r["under_target"] for r in results),
        }
    finally:
        tmp.cleanup()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if not quiet:
        _print_table(report, path)
    return report


def _print_table(report: dict[str, Any], path: Path) -> None:
    print(
        f"admin dashboard render time: {report['tasks']} tasks, {report['tenants']} tenants, "
        f"{report['database']}, {report['repeat']} requests per page (target p95 < {report['target_ms']:.0f} ms)"
    )
    head = f"{'page':30} {'server p50':>11} {'p95':>8} {'max':>8} {'round trip':>11} {'bytes':>8}  ok"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        print(
            f"{r['page']:30} {r['server_ms_p50']:>8.1f} ms {r['server_ms_p95']:>5.1f} ms {r['server_ms_max']:>5.1f} ms "
            f"{r['roundtrip_ms_p50']:>8.1f} ms {r['bytes']:>8}  {'yes' if r['under_target'] else 'NO'}"
        )
    print(f"wrote {path}")
