"""``promptstore bench serve``: the whole service under load, against what it replaces.

Starts the service in this process (uvicorn on a free port, embedded SQLite and file://
objects in a temporary folder), publishes ``--tasks`` ready tasks of mixed methods across
``--tenants`` tenants straight through the store (each prompt is its method's own
initialisation plus noise, ``api.bench.seeding.random_prompt``: serving cost does not depend
on how well a prompt was tuned), then drives ``--clients`` concurrent HTTP clients (from a
process of their own: raw keep-alive HTTP/1.1, a fraction of a millisecond of CPU per
request) for ``--seconds`` seconds per scenario, each request classifying ``--images``
image(s) of a random task.

Two scenarios, each with its own N tasks:
  features  zeroshot, coop, linear-probe: the image path is untouched, so the reference
            is (a) the bare image tower at the mean batch size the engine formed;
  mixed     every method (VPT and padding included): the reference is (a') the one-task
            prompted forward, each method's images through one task of that method at the
            same batch size (same prompt lengths, no mixing), weighted by the served mix.
On the mixed tasks also, through the same HTTP service and clients:
  (b) one request one forward: the service built with ``max_batch = 1`` (no batching), an
      app of its own on the same store (``api.bench.baselines``);
  (c) a naive server: one request at a time, and on every task switch it loads the task's
      model state (the backbone weights from a checkpoint into a backbone of its own, the
      prompt from the object store, prepared on the device), as a model-per-tenant server
      does; the service's routes with it as inference, an app of its own too. It serves one
      request at a time, so its images/s is images over the time it was busy (its answers
      over HTTP are in the JSON too).
The in-process references run on residents the bench builds itself from the store; nothing
of the service under test is changed by a baseline.
The engine's seconds are split into ``--rounds`` windows, each followed by its in-process
reference (at the mean batch size formed so far), so that a drift of the machine's speed
hits both alike; the reference is the mean over rounds. Served images/s is the steady
state: the images of the batches that ended inside a window after its first two, over the
time they took (a window opens on an idle service, and its first batches fill the
pipeline); the whole-window figure (answers over the time to the last of them) is printed
and written too.
Prints a table and writes JSON; ratios are measured in the one run.

    promptstore bench serve                              # ViT-B-32 random, CPU, 100 tasks, 32 clients
    promptstore bench serve --backbone open_clip:tiny:random --tasks 6 --clients 4 --seconds 2
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from api.bench.harness import ServerThread, machine_info
from api.bench.loadgen import ClientProcess, percentiles
from api.bench.seeding import SERVE_CONFIGS, TEXT_METHODS, SeededTask, make_images, seed_tasks

if TYPE_CHECKING:
    from fastapi import FastAPI

    from api.engine import Engine, ServingRef
    from backbone import Backbone, ResidentPrompt
    from store.settings import Settings

DEFAULT_BACKBONE = "open_clip:ViT-B-32:random"
DEFAULT_OUT = "bench-results/serve.json"
FEATURE_METHODS = ("zeroshot", "coop", "linear-probe")
TARGETS = {"features_vs_tower": 0.9, "mixed_vs_one_task": 0.9, "vs_one_request_one_forward": 1.5, "vs_naive_reload": 20.0}


# --------------------------------------------------------------------------- measuring windows


def steady_state(batch_log: list[tuple[float, int]], window_end: float, skip: int = 2) -> dict[str, Any]:
    """Served images/s once the pipeline is full: the images of the batches that ended inside
    the window after the first ``skip`` (a window opens on an idle service: its first batch
    closes on the few requests already decoded, the next on what queued meanwhile), over the
    time from the end of batch ``skip`` to the end of the last one. Each batch's answers go
    out over HTTP as it ends."""
    ends = [(t, n) for t, n in batch_log if t <= window_end]
    if len(ends) < skip + 2:
        return {"steady_images_per_s": None, "steady_images": 0, "steady_s": 0.0}
    images, secs = sum(n for _, n in ends[skip + 1:]), ends[-1][0] - ends[skip][0]
    return {"steady_images_per_s": images / secs if secs > 0 else None, "steady_images": images, "steady_s": secs}


def served_rate(d: dict[str, Any]) -> float:
    """The served images/s the ratios use: steady state where the window had enough batches."""
    return d.get("steady_images_per_s") or d["images_per_s"]


def merge_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One result of several ``_drive`` windows: images over the summed serving time,
    percentiles over every latency; each window kept under ``windows`` (without latencies)."""
    lat = [x for w in windows for x in w.pop("latencies_s")]
    secs = sum(w["seconds"] for w in windows)
    errors: dict[str, int] = {}
    for w in windows:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    images = sum(w["images"] for w in windows)
    forward_s = sum(w.get("forward_s", 0.0) for w in windows)
    batches, rows = sum(w.get("batches", 0) for w in windows), sum(w.get("rows", 0) for w in windows)
    steady_images, steady_s = sum(w.get("steady_images", 0) for w in windows), sum(w.get("steady_s", 0.0) for w in windows)
    return {
        "images_per_s": images / secs if secs > 0 else 0.0,
        "requests": sum(w["requests"] for w in windows),
        "images": images,
        "seconds": secs,
        "window_s": sum(w["window_s"] for w in windows),
        "errors": errors,
        "client_cpu_s": sum(w["client_cpu_s"] for w in windows),
        "server_cpu_s": sum(w.get("server_cpu_s", 0.0) for w in windows),
        "batches": batches,
        "rows": rows,
        "mean_batch": rows / batches if batches else None,
        "steady_images_per_s": steady_images / steady_s if steady_s > 0 else None,
        "steady_images": steady_images,
        "steady_s": steady_s,
        "forward_s": forward_s,
        "forward_images_per_s": rows / forward_s if forward_s > 0 else None,
        **percentiles(lat),
        "windows": windows,
    }


def wait_idle(server: Any, timeout: float = 300.0) -> float:
    """Until ``server`` (the engine or a NaiveServer) has finished the requests the clients
    left open at the end of a window (so they do not slow the next one); seconds waited."""
    t0 = time.perf_counter()
    quiet_since = None
    while time.perf_counter() - t0 < timeout:
        if server.idle:
            quiet_since = quiet_since or time.perf_counter()
            if time.perf_counter() - quiet_since > 0.3:
                break
        else:
            quiet_since = None
        time.sleep(0.02)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- the run


def _serving_refs(settings: "Settings", tasks: list[SeededTask]) -> list["ServingRef"]:
    """Each task's served version, read from the store as the classify route reads it."""
    from api.engine import ServingRef
    from store import repo
    from store.db import session_scope
    from store.db import get_sessionmaker

    sm = get_sessionmaker(settings.database_url)
    refs = []
    with session_scope(sm) as s:
        for t in tasks:
            task = repo.get_task_for_job(s, t.task_id)
            pv = repo.get_served_version(s, t.task_id, tenant_id=task.tenant_id)  # type: ignore[union-attr]
            refs.append(ServingRef(t.task_id, pv.version, pv.object_key, pv.fingerprint, tuple(task.classes), task.method))  # type: ignore[union-attr]
    return refs


def warm(url: str, engine: "Engine", settings: "Settings", tasks: list[SeededTask], images: list[bytes]) -> None:
    """Load every task's prompt into the engine's cache (as the first request of each task
    would, without its forward), then one request over HTTP for one task of each method (the
    engine windows skip their first batches anyway; this checks that every method answers)."""
    import httpx

    futures = [engine.cache.get(ref) for ref in _serving_refs(settings, tasks)]
    for f in futures:
        f.result()

    async def go() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600.0) as http:

            async def one(t: SeededTask) -> None:
                r = await http.post(
                    f"/v1/tasks/{t.task_id}/classify", files=[("images", ("w.jpg", images[0], "image/jpeg"))],
                    headers=t.headers,
                )
                if r.status_code != 200:
                    raise RuntimeError(f"warm-up classify of task {t.task_id} ({t.method}) failed: {r.text}")

            first = {t.method: t for t in reversed(tasks)}  # the first task of each method
            await asyncio.gather(*(one(t) for t in first.values()))

    asyncio.run(go())


def own_residents(bb: "Backbone", settings: "Settings", tasks: list[SeededTask]) -> dict[str, "ResidentPrompt"]:
    """The first task of each method as a resident prompt of the bench's own, loaded from the
    store and prepared on ``bb`` as the engine does (for the in-process references)."""
    from backbone import load_prompt, prepare_resident
    from store.objects import get_object_store

    objects = get_object_store(settings)
    out: dict[str, ResidentPrompt] = {}
    for ref in _serving_refs(settings, tasks):
        if ref.method not in out:
            out[ref.method] = prepare_resident(bb, load_prompt(objects.get(ref.object_key), bb))
    return out


def served(
    name: str, url: str, engine: "Engine", clients_proc: ClientProcess, task_list: list[SeededTask], secs: float,
    log: Callable[[str], None], **drive: Any,
) -> dict[str, Any]:
    """One window of ``clients_proc`` driving ``url`` for ``secs``, with what ``engine`` did in it:
    its batches (through ``engine.on_batch``), their mean size, its seconds in forwards, the
    steady state; what is still queued at the end is shed and waited for."""
    before, c0 = engine.totals(), time.process_time()
    batch_log: list[tuple[float, int]] = []
    stop_listening = engine.on_batch(lambda b: batch_log.append((b.ended, b.images)))
    window_end = time.perf_counter() + secs  # the clients' window ends a little later
    try:
        out = clients_proc.drive(url, task_list, seconds=secs, **drive)
    finally:
        stop_listening()
    out.update(steady_state(batch_log, window_end))
    done = engine.totals() - before
    nb, nr = done.batches, done.images
    out["server_cpu_s"] = time.process_time() - c0
    out["mean_batch"] = nr / nb if nb else None
    out["batches"] = nb
    out["rows"] = nr
    # rows over seconds inside forwards: the forward's own speed under the HTTP load
    # (the rest of the gap to the reference is time the forward thread waited)
    out["forward_s"] = done.forward_s
    out["forward_images_per_s"] = nr / out["forward_s"] if out["forward_s"] > 0 else None
    out["shed_after_window"] = engine.shed()  # answered after the window: not waited for
    out["drain_s"] = wait_idle(engine)
    log(f"{name}: {out['images_per_s']:.2f} img/s, p50 {out['p50_ms'] or 0:.0f} ms, "
        f"p99 {out['p99_ms'] or 0:.0f} ms, mean batch {out['mean_batch'] or 0:.1f}, errors {out['errors']}")
    return out


def _started(app: "FastAPI") -> "Engine":
    """The app's engine once its backbone has loaded."""
    state = app.state.ps
    if not state.backbone.wait(600) or state.backbone.error:
        raise RuntimeError(f"backbone did not load: {state.backbone.error}")
    return state.inference  # type: ignore[no-any-return]


def run(
    *,
    backbone: str = DEFAULT_BACKBONE,
    device: str | None = None,
    tasks: int = 100,
    tenants: int = 10,
    clients: int = 32,
    seconds: float = 24.0,
    rounds: int = 2,
    baseline_seconds: float | None = None,
    images_per_request: int = 1,
    max_batch: int | None = None,
    max_wait_ms: float = 5.0,
    classes: int = 4,
    threads: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    import torch

    from api.app import create_app
    from api.bench.baselines import naive_app, one_request_one_forward_app, time_forward
    from backbone import forward_mixed
    from store.migrate import upgrade
    from store.settings import Settings
    from backbone.holder import get_backbone

    if threads:
        torch.set_num_threads(threads)
    # The engine's time per scenario is split into ``rounds`` windows, each followed by its
    # reference; the batch-1 and naive baselines reach their steady state at once (and sit
    # far from their targets), so a few seconds do.
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    base_s = baseline_seconds if baseline_seconds is not None else max(2.0, min(3.0, seconds / 2))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="promptstore-bench-serve-") as tmp:
        root = Path(tmp)
        bb = get_backbone(backbone, device)
        dev = bb.device
        if max_batch is None:  # on a CPU, images/s barely grows past 16: shorter batches, finer timing
            max_batch = 256 if dev.type == "cuda" else 16
        settings = Settings(
            database_url=f"sqlite:///{root / 'promptstore.db'}",
            object_store_url=f"file://{root / 'objects'}",
            backbone=backbone,
            device=device,
            admin_token=secrets.token_urlsafe(16),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            queue_size=max(1024, 4 * clients * images_per_request),
            max_classify_images=max(64, images_per_request),
            classify_rate=0,  # the bench measures the engine, not the per-tenant limit
        )
        upgrade(settings.database_url)
        log(f"backbone {bb.fingerprint} on {dev} ({bb.dtype}); seeding 2 x {tasks} tasks across {tenants} tenants ...")
        features = [m for m in FEATURE_METHODS if bb.has_text or m not in TEXT_METHODS]
        every = [m for m in SERVE_CONFIGS if bb.has_text or m not in TEXT_METHODS]
        t0 = time.perf_counter()
        feat_tasks = seed_tasks(settings, bb, n_tasks=tasks, n_tenants=tenants, methods=features, n_classes=classes, seed=seed)
        # The mixed scenario takes its feature-path tasks from the first scenario (already
        # resident) and adds tasks of the other methods: N tasks, methods round-robin.
        plan = [every[t % len(every)] for t in range(tasks)]
        reuse = {m: [t for t in feat_tasks if t.method == m] for m in features}
        others = [m for m in plan if m not in reuse]
        fresh = iter(seed_tasks(
            settings, bb, n_tasks=len(others), n_tenants=tenants, methods=others, n_classes=classes, seed=seed + tasks
        )) if others else iter(())
        mixed_tasks = [reuse[m].pop(0) if m in reuse and reuse[m] else next(fresh) for m in plan]
        seed_s = time.perf_counter() - t0
        images = make_images(bb.image_size + bb.image_size // 8, seed=seed)
        drive_kw: dict[str, Any] = {"clients": clients, "images": images, "per_request": images_per_request}
        res: dict[str, Any] = {
            "benchmark": "serve",
            "backbone": bb.fingerprint,
            "dtype": str(bb.dtype).replace("torch.", ""),
            "machine": machine_info(bb.device),
            "params": {
                "tasks_per_scenario": tasks, "tenants": tenants, "clients": clients, "seconds": seconds, "rounds": rounds,
                "baseline_seconds": base_s, "images_per_request": images_per_request, "max_batch": max_batch,
                "max_wait_ms": max_wait_ms, "classes_per_task": classes, "seed": seed,
                "features_methods": features, "mixed_methods": [m for m in every if m in plan],  # with fewer tasks than methods, the first ones
            },
            "setup_s": {"seed_tasks": seed_s},
        }
        with closing(ClientProcess()) as clients_proc:
            app = create_app(settings)
            with ServerThread(app) as server:
                engine = _started(app)

                def alternate(
                    name: str, task_list: list[SeededTask], reference: Callable[[int], dict[str, Any]]
                ) -> tuple[dict[str, Any], dict[str, Any]]:
                    """``rounds`` engine windows of ``seconds / rounds``, each followed by its in-process
                    reference at the mean batch size the engine formed so far. The speed of a shared
                    machine drifts (on a 2-core VM the same forward varied by a third within a minute):
                    a reference timed beside each window drifts with it."""
                    windows, refs = [], []
                    for i in range(rounds):
                        windows.append(served(
                            f"{name} {i + 1}/{rounds}", server.url, engine, clients_proc, task_list, seconds / rounds,
                            log, seed=seed * 100 + i, **drive_kw,
                        ))
                        nb, nr = sum(w["batches"] for w in windows), sum(w["rows"] for w in windows)
                        refs.append(reference(max(1, round(nr / nb)) if nb else 1))
                    out = merge_windows(windows)
                    ref = {
                        "images_per_s": statistics.fmean(r["images_per_s"] for r in refs),
                        "batch": refs[-1]["batch"],
                        "each_round": refs,
                    }
                    out["round_ratios"] = [
                        served_rate(w) / r["images_per_s"] if r["images_per_s"] else None for w, r in zip(windows, refs)
                    ]
                    log(f"{name}: {served_rate(out):.2f} img/s in steady state over {rounds} windows "
                        f"({out['images_per_s']:.2f} over whole windows); reference {ref['images_per_s']:.2f} img/s")
                    return out, ref

                def tower_at(b: int) -> dict[str, Any]:
                    return time_forward(bb, lambda x: bb.vision.forward(x).embeds.float().cpu(), b, base_s / 2, 2)

                t0 = time.perf_counter()
                warm(server.url, engine, settings, feat_tasks, images)
                res["setup_s"]["warm_features"] = time.perf_counter() - t0
                feat, tower = alternate("features: engine", feat_tasks, tower_at)
                log(f"(a) bare image tower at batch {tower['batch']}: {tower['images_per_s']:.2f} img/s")

                t0 = time.perf_counter()
                warm(server.url, engine, settings, mixed_tasks, images)
                res["setup_s"]["warm_mixed"] = time.perf_counter() - t0
                residents = own_residents(bb, settings, mixed_tasks)
                share = {m: sum(1 for t in mixed_tasks if t.method == m) / len(mixed_tasks) for m in residents}

                def one_task_at(b: int) -> dict[str, Any]:
                    per_method = {
                        m: time_forward(
                            bb, lambda x, r=r: forward_mixed(bb, [r], x, torch.zeros(x.shape[0], dtype=torch.long)),
                            b, max(0.5, base_s / (2 * len(residents))),
                        )
                        for m, r in residents.items()
                    }
                    ips = 1.0 / sum(share[m] / per_method[m]["images_per_s"] for m in residents)
                    return {"images_per_s": ips, "batch": b, "per_method": per_method}

                mixed, one_task = alternate("mixed: engine", mixed_tasks, one_task_at)
                one_task["share"] = share
                one_task["per_method"] = {
                    m: statistics.fmean(r["per_method"][m]["images_per_s"] for r in one_task["each_round"])
                    for m in residents
                }
                log(f"(a') one-task prompted forward at batch {one_task['batch']}, weighted by the mix: "
                    f"{one_task['images_per_s']:.2f} img/s")

            # (b) an app of its own: the same store, an engine that never batches
            batch1_app = one_request_one_forward_app(settings)
            with ServerThread(batch1_app) as server:
                engine1 = _started(batch1_app)
                t0 = time.perf_counter()
                warm(server.url, engine1, settings, mixed_tasks, images)
                res["setup_s"]["warm_one_request_one_forward"] = time.perf_counter() - t0
                batch1 = served(
                    "mixed: one request one forward", server.url, engine1, clients_proc, mixed_tasks, base_s, log,
                    seed=seed, **drive_kw,
                )
                batch1.pop("latencies_s")

            # (c) an app of its own: the service's routes, a naive server with its own backbone
            t0 = time.perf_counter()
            nv_app, naive_server = naive_app(settings, root / "backbone.safetensors")
            res["setup_s"]["naive_backbone"] = time.perf_counter() - t0
            with ServerThread(nv_app) as server:
                _started(nv_app)
                naive = clients_proc.drive(server.url, mixed_tasks, seconds=base_s, seed=seed + 1, **drive_kw)
                naive.pop("latencies_s")
                naive["task_switches"] = naive_server.switches
                naive_server.closing = True
                naive["drain_s"] = wait_idle(naive_server)
                # It serves one request at a time, so its capacity is images over busy time:
                # more precise than the few answers that fit in a short window on a CPU.
                naive["http_images_per_s"] = naive["images_per_s"]
                naive["busy_s"] = naive_server.busy_s
                naive["images_per_s"] = naive_server.served / naive_server.busy_s if naive_server.busy_s else 0.0
                log(f"mixed: naive reload-per-switch: {naive['images_per_s']:.2f} img/s, "
                    f"p50 {naive['p50_ms'] or 0:.0f} ms, {naive_server.switches} switches")

        res["features"] = {"engine": feat, "bare_tower": tower}
        res["mixed"] = {
            "engine": mixed,
            "one_task_prompted": one_task,
            "one_request_one_forward": batch1,
            "naive_reload_per_switch": naive,
        }
        served_mixed = served_rate(mixed)
        ratios = {
            "features_vs_tower": served_rate(feat) / tower["images_per_s"],
            "mixed_vs_one_task": served_mixed / one_task["images_per_s"],
            "vs_one_request_one_forward": served_mixed / served_rate(batch1) if served_rate(batch1) else None,
            "vs_naive_reload": served_mixed / naive["images_per_s"] if naive["images_per_s"] else None,
        }
        res["ratios_whole_windows"] = {
            "features_vs_tower": feat["images_per_s"] / tower["images_per_s"],
            "mixed_vs_one_task": mixed["images_per_s"] / one_task["images_per_s"],
        }
        res["ratios"] = ratios
        res["targets"] = {k: {"min": v, "met": ratios[k] is not None and ratios[k] >= v} for k, v in TARGETS.items()}
        res["total_s"] = time.perf_counter() - t_start
    return res

def format_table(res: dict[str, Any]) -> str:
    p, m = res["params"], res["machine"]
    f, x, r = res["features"], res["mixed"], res["ratios"]

    def row(label: str, d: dict[str, Any], batch: Any = "", ips: float | None = None) -> str:
        def ms(k: str) -> str:
            return f"{d[k]:>8.0f}" if d.get(k) is not None else f"{'-':>8}"

        ips = d["images_per_s"] if ips is None else ips
        return f"{label:<46}{ips:>10.2f}{ms('p50_ms')}{ms('p95_ms')}{ms('p99_ms')}{str(batch):>8}"

    def steady(label: str, d: dict[str, Any]) -> str:
        return f"{label:<46}{served_rate(d):>10.2f}"

    mb = lambda d: f"{d['mean_batch']:.1f}" if d.get("mean_batch") else "-"  # noqa: E731
    lines = [
        f"serve bench: {res['backbone']} {res['dtype']} on {m['device']} ({m['device_name']}), torch {m['torch']}, "
        f"{m['torch_threads']} threads / {m['cpu_count']} cpus",
        f"{p['tasks_per_scenario']} tasks per scenario across {p['tenants']} tenants, {p['clients']} clients x "
        f"{p['images_per_request']} image(s)/request, {p['seconds']:g}s per engine run in {p['rounds']} windows, "
        f"max_batch {p['max_batch']}, "
        f"max_wait {p['max_wait_ms']:g} ms",
        "",
        f"{'':<46}{'images/s':>10}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'batch':>8}",
        f"features ({', '.join(p['features_methods'])})",
        row("  engine over HTTP, whole windows", f["engine"], mb(f["engine"])),
        steady("  engine over HTTP, steady state", f["engine"]),
        row("  (a) bare image tower, in-process", f["bare_tower"], f["bare_tower"]["batch"]),
        f"mixed ({', '.join(p['mixed_methods'])})",
        row("  engine over HTTP, whole windows", x["engine"], mb(x["engine"])),
        steady("  engine over HTTP, steady state", x["engine"]),
        row("  (a') one-task prompted forward, in-process", x["one_task_prompted"], x["one_task_prompted"]["batch"]),
        row("  (b) one request one forward, HTTP, steady", x["one_request_one_forward"], mb(x["one_request_one_forward"]),
            served_rate(x["one_request_one_forward"])),
        row("  (c) naive reload per task switch, HTTP", x["naive_reload_per_switch"], 1),
        "",
    ]
    names = {
        "features_vs_tower": "features engine / (a) bare tower",
        "mixed_vs_one_task": "mixed engine / (a') one-task prompted",
        "vs_one_request_one_forward": "mixed engine / (b) one request one forward",
        "vs_naive_reload": "mixed engine / (c) naive reload per switch",
    }
    for k, label in names.items():
        t = res["targets"][k]
        v = r[k]
        lines.append(
            f"{label:<46}{(f'{v:.3f}' if v is not None else '-'):>10}   target >= {t['min']:g}: "
            f"{'met' if t['met'] else 'NOT met'}"
        )
    w = res["ratios_whole_windows"]
    lines.append(
        f"(over whole windows, fill included: features {w['features_vs_tower']:.3f}, mixed {w['mixed_vs_one_task']:.3f}; "
        f"per round: features {', '.join(f'{v:.2f}' for v in f['engine']['round_ratios'])}, "
        f"mixed {', '.join(f'{v:.2f}' for v in x['engine']['round_ratios'])})"
    )
    lines.append(f"\ntotal {res['total_s']:.0f}s")
    return "\n".join(lines)


def run_serve_bench(out: str = DEFAULT_OUT, **kw: Any) -> dict[str, Any]:
    """Entry point of ``promptstore bench serve``: run, print the table, write JSON."""
    res = run(**kw)
    print(format_table(res), flush=True)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {path}", flush=True)
    return res
