"""The scale-out test (issue 6): the deployment's shape on one machine, without Docker.

Two API replicas (``promptstore serve``, A and B) and two Celery workers (``promptstore
worker``, solo pool) run as separate processes sharing one Postgres database, one Redis
(Celery broker and ``PROMPTSTORE_REDIS_URL``) and one SeaweedFS S3 bucket, on
``open_clip:tiny:random`` and the CPU. Checked:

- a task uploaded through A is tuned by a worker and classified through B, and both
  replicas give the same scores (one prompt, one backbone fingerprint);
- a task retrained through B is answered with its new version by both replicas, which
  had served the old version before;
- SIGKILL of the worker that is tuning a task (its whole process group), mid-run: the
  job was never acknowledged (``acks_late``), the broker re-delivers it after
  ``PROMPTSTORE_BROKER_VISIBILITY_TIMEOUT`` and the other worker finishes the task.

Every process logs to ``<name>.log``, copied to ``<test-output>/scale/`` at the end; a
failing test carries the tails of those logs in its report (tests/deploy/conftest.py). Every process group is
killed at the end, pass or fail.

Run only this: ``pytest -m scale``; leave it out: ``pytest -m 'not scale'``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from psdata import dataset_zip, image_bytes

pytestmark = [pytest.mark.scale, pytest.mark.timeout(300)]

ADMIN_TOKEN = "scale-test-admin-token-" + uuid.uuid4().hex
BACKBONE = "open_clip:tiny:random"
#: Seconds after which Redis re-delivers an unacknowledged job. Short so that the killed
#: worker's job comes back quickly; the fixture has every worker load the backbone first,
#: so every other job of the tests ends well within it (and a duplicate delivery would be
#: harmless anyway: only one run publishes).
VISIBILITY_TIMEOUT_S = 12
STARTUP_TIMEOUT_S = 120
JOB_TIMEOUT_S = 90

CLASSES = ("cat", "dog", "owl")


# --------------------------------------------------------------------------- processes


def _promptstore() -> list[str]:
    """The installed console script next to this interpreter (what the images run)."""
    script = Path(sys.executable).with_name("promptstore")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "api.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None  # API replicas only

    @property
    def pgid(self) -> int:
        return self.popen.pid  # started with start_new_session: leader of its own group

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group (no warm shutdown, nothing acknowledged)."""
        _killpg(self.pgid, signal.SIGKILL)
        self.popen.wait(timeout=15)

    def stop(self, grace: float = 5.0) -> None:
        if self.alive():
            _killpg(self.pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        _killpg(self.pgid, signal.SIGKILL)  # and any child left in the group
        if self.alive():
            self.popen.wait(timeout=15)


@dataclass
class Cluster:
    env: dict[str, str]
    workdir: Path
    logdir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    _logs: list[Any] = field(default_factory=list)

    def start(self, name: str, *args: str, port: int | None = None) -> Proc:
        log_path = self.logdir / f"{name}.log"
        log = open(log_path, "wb")
        self._logs.append(log)
        popen = subprocess.Popen(
            [*_promptstore(), *args],
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path, f"http://127.0.0.1:{port}" if port else None)
        self.procs[name] = proc
        return proc

    def api(self, name: str) -> httpx.Client:
        return httpx.Client(base_url=self.procs[name].url, timeout=60)

    @property
    def workers(self) -> list[Proc]:
        return [p for n, p in self.procs.items() if n.startswith("worker")]

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for proc in self.procs.values():
            state = "running" if proc.alive() else f"exited {proc.popen.returncode}"
            tail = "\n".join(proc.log().splitlines()[-lines:])
            out.append(f"----- {proc.name} ({state}; {proc.log_path}) -----\n{tail}")
        return "\n".join(out)

    def fail(self, message: str) -> None:
        pytest.fail(f"{message}\n{self.log_tails()}", pytrace=False)

    def stop_all(self) -> None:
        for proc in self.procs.values():  # SIGTERM all first: they shut down in parallel
            if proc.alive():
                _killpg(proc.pgid, signal.SIGTERM)
        for proc in self.procs.values():
            proc.stop()
        for log in self._logs:
            log.close()


def _clear_broker(redis_url: str) -> None:
    """Drop Celery's queue and unacknowledged messages left in this Redis database by
    earlier tests of the session (their tasks are not ours)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    keys = [k for pattern in ("promptstore", "unacked*", "_kombu.*") for k in r.scan_iter(match=pattern)]
    if keys:
        r.delete(*keys)
    r.close()


def _wait_api_ready(cluster: Cluster, proc: Proc, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            cluster.fail(f"{proc.name} exited with {proc.popen.returncode} before /readyz answered 200")
        try:
            r = httpx.get(f"{proc.url}/readyz", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.25)
    cluster.fail(f"{proc.name}: /readyz not 200 after {timeout:.0f}s (last: {last})")
    raise AssertionError  # unreachable


def _wait_worker_ready(cluster: Cluster, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            cluster.fail(f"{proc.name} exited with {proc.popen.returncode} before it was ready")
        if re.search(r"celery@\S+ ready\.", proc.log()):
            return
        time.sleep(0.25)
    cluster.fail(f"{proc.name}: no 'ready.' line in its log after {timeout:.0f}s")


@pytest.fixture(scope="module")
def scale_cluster(
    pg_url: str, redis_url: str, s3_server: Any, test_output_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Migrate, then start replicas A and B and workers 1 and 2; all stopped at the end.

    The logs are written in this run's own folder (the tests read them while it runs) and
    copied to ``<test-output>/scale/`` at the end."""
    workdir = tmp_path_factory.mktemp("scale")
    logdir = workdir / "logs"
    logdir.mkdir()

    bucket = f"pscale-{uuid.uuid4().hex[:12]}"
    s3_server.client().make_bucket(bucket)  # what minio-init does in compose
    _clear_broker(redis_url)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSTORE_")}
    env.update(
        PROMPTSTORE_DATABASE_URL=pg_url,
        PROMPTSTORE_OBJECT_STORE_URL=s3_server.url_for(bucket),
        PROMPTSTORE_S3_ACCESS_KEY=s3_server.access_key,
        PROMPTSTORE_S3_SECRET_KEY=s3_server.secret_key,
        PROMPTSTORE_BROKER_URL=redis_url,
        PROMPTSTORE_REDIS_URL=redis_url,
        PROMPTSTORE_BROKER_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT_S),
        PROMPTSTORE_BACKBONE=BACKBONE,
        PROMPTSTORE_DEVICE="cpu",
        PROMPTSTORE_ADMIN_TOKEN=ADMIN_TOKEN,
        PROMPTSTORE_LOG_FORMAT="text",
        # Four processes on a small machine: one intra-op thread each.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    cluster = Cluster(env=env, workdir=workdir, logdir=logdir)
    try:
        # The migrate job, before anything else starts (as compose and the k8s Job do).
        migrate = subprocess.run(
            [*_promptstore(), "migrate"], cwd=workdir, env=env, capture_output=True, text=True, timeout=180
        )
        (logdir / "migrate.log").write_text(migrate.stdout + migrate.stderr)
        assert migrate.returncode == 0, f"promptstore migrate failed:\n{migrate.stdout}\n{migrate.stderr}"

        for name in ("api-a", "api-b"):
            port = _free_port()
            cluster.start(name, "serve", "--host", "127.0.0.1", "--port", str(port), port=port)
        for name in ("worker-1", "worker-2"):
            cluster.start(name, "worker")
        for name in ("api-a", "api-b"):
            ready = _wait_api_ready(cluster, cluster.procs[name], STARTUP_TIMEOUT_S)
            assert ready["jobs"] == "celery", f"{name} runs jobs in-process: {ready}"
            assert ready["backbone"]["id"].startswith(BACKBONE), ready  # normalised: ...:random@0
        for proc in cluster.workers:
            _wait_worker_ready(cluster, proc, STARTUP_TIMEOUT_S)
        _warm_up_workers(cluster, STARTUP_TIMEOUT_S)
        yield cluster
    finally:
        cluster.stop_all()
        kept = test_output_dir / "scale"
        kept.mkdir(parents=True, exist_ok=True)
        for old in kept.glob("*.log"):
            old.unlink()
        for log in logdir.glob("*.log"):
            shutil.copy2(log, kept / log.name)


_BACKBONE_LOADED = re.compile(r"backbone \S+ (runs with RANDOM weights|loaded on)")


def _warm_up_workers(cluster: Cluster, timeout: float) -> None:
    """Zero-shot tasks until every worker has loaded the backbone (a worker process loads
    it on its first job). Afterwards every job of the tests is short, well within the
    visibility timeout, so only the killed worker's job is delivered twice. Idle workers
    wait in BRPOP and Redis serves the longest waiting first, so one job per worker
    normally reaches them all; more are sent only while a worker has received none."""
    deadline = time.monotonic() + timeout
    with cluster.api("api-a") as a:
        key = _tenant(a)
        pending: list[str] = []
        while True:
            pending = [i for i in pending if _task(a, key, i)["status"] not in ("ready", "failed")]
            if not pending and all(_BACKBONE_LOADED.search(p.log()) for p in cluster.workers):
                return
            if time.monotonic() > deadline:
                cluster.fail(f"the workers did not all load the backbone within {timeout:.0f}s")
            if not pending and any("] received" not in p.log() for p in cluster.workers):
                for _ in cluster.workers:
                    r = a.post(
                        "/v1/tasks",
                        data={"name": "warm-up", "method": "zeroshot", "classes": json.dumps(list(CLASSES))},
                        headers=key,
                    )
                    assert r.status_code == 202, r.text
                    pending.append(r.json()["id"])
            time.sleep(0.2)


# --------------------------------------------------------------------------- HTTP helpers

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _tenant(client: httpx.Client) -> dict[str, str]:
    r = client.post("/v1/admin/tenants", json={"name": f"scale-{uuid.uuid4().hex[:10]}"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def _create_task(client: httpx.Client, headers: dict[str, str], method: str, dataset: bytes, config: dict) -> str:
    r = client.post(
        "/v1/tasks",
        data={"name": f"{method}-task", "method": method, "config": json.dumps(config)},
        files={"dataset": ("data.zip", dataset, "application/zip")},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    return r.json()["id"]


def _task(client: httpx.Client, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/tasks/{task_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(
    cluster: Cluster,
    client: httpx.Client,
    headers: dict[str, str],
    task_id: str,
    until: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = JOB_TIMEOUT_S,
    interval: float = 0.1,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        t = _task(client, headers, task_id)
        if until(t):
            return t
        if t["status"] == "failed" or (t.get("training") or {}).get("status") == "failed":
            cluster.fail(f"task {task_id} failed while waiting for {what}: {t}")
        if time.monotonic() > deadline:
            cluster.fail(f"task {task_id}: not {what} after {timeout:.0f}s: {t}")
        time.sleep(interval)


IMAGES = [image_bytes(0, seed=101), image_bytes(1, seed=102, fmt="JPEG"), image_bytes(2, seed=103)]


def _classify(client: httpx.Client, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    files = [("images", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(IMAGES)]
    r = client.post(f"/v1/tasks/{task_id}/classify", files=files, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task_id"] == task_id
    assert len(body["predictions"]) == len(IMAGES)
    for preds in body["predictions"]:
        assert sorted(p["label"] for p in preds) == sorted(CLASSES)
        assert abs(sum(p["score"] for p in preds) - 1.0) < 1e-3
    return body


def _scores(body: dict[str, Any]) -> list[dict[str, float]]:
    return [{p["label"]: p["score"] for p in preds} for preds in body["predictions"]]


def _same_scores(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-4) -> bool:
    return all(abs(x[k] - y[k]) <= tol for x, y in zip(_scores(a), _scores(b)) for k in x)


def _tuned_by(cluster: Cluster, task_id: str, attempt: int = 1) -> list[str]:
    """Workers whose log shows they started tuning this run."""
    line = f"task {task_id} attempt {attempt}: tuning"
    return [p.name for p in cluster.workers if line in p.log()]


def _published_by(cluster: Cluster, task_id: str, version: int) -> list[str]:
    """Workers whose log shows they published this version of the task."""
    line = re.compile(rf"task {re.escape(task_id)} attempt \d+: published version {version}\b")
    return [p.name for p in cluster.workers if line.search(p.log())]


# --------------------------------------------------------------------------- tests


def test_task_created_on_one_replica_is_classified_on_the_other(scale_cluster: Cluster) -> None:
    cluster = scale_cluster
    with cluster.api("api-a") as a, cluster.api("api-b") as b:
        key = _tenant(a)
        # The tenant made on A authenticates on B (one database).
        assert b.get("/v1/tasks", headers=key).json()["count"] == 0

        task_id = _create_task(a, key, "coop", dataset_zip(CLASSES, per_class=4, seed=1), {"epochs": 3})
        t = _wait(cluster, b, key, task_id, lambda t: t["status"] == "ready", "ready")
        assert t["version"] == 1 and t["metrics"]["n_train"] > 0

        # A Celery worker tuned it (the API processes run no jobs: readyz said "celery").
        assert len(_published_by(cluster, task_id, 1)) == 1, "no worker log shows the publish"

        on_b = _classify(b, key, task_id)
        assert on_b["version"] == 1
        on_a = _classify(a, key, task_id)
        assert on_a["version"] == 1
        # One prompt in the shared store, one backbone fingerprint: the same answer.
        assert _same_scores(on_a, on_b), (on_a, on_b)

        # Another tenant's key on the other replica: unknown id, as everywhere.
        other = _tenant(b)
        assert a.post(f"/v1/tasks/{task_id}/classify", json={"images": []}, headers=other).status_code == 404


def test_retrained_task_is_served_in_its_new_version_by_both_replicas(scale_cluster: Cluster) -> None:
    cluster = scale_cluster
    with cluster.api("api-a") as a, cluster.api("api-b") as b:
        key = _tenant(b)
        task_id = _create_task(b, key, "coop", dataset_zip(CLASSES, per_class=4, seed=2), {"epochs": 3})
        _wait(cluster, a, key, task_id, lambda t: t["status"] == "ready", "ready")
        # Both replicas serve (and so hold) version 1 before the retrain.
        v1_a, v1_b = _classify(a, key, task_id), _classify(b, key, task_id)
        assert v1_a["version"] == v1_b["version"] == 1

        r = b.post(
            f"/v1/tasks/{task_id}/retrain",
            data={"config": json.dumps({"epochs": 6, "n_ctx": 8})},
            files={"dataset": ("data.zip", dataset_zip(CLASSES, per_class=6, seed=40), "application/zip")},
            headers=key,
        )
        assert r.status_code == 202, r.text

        t = _wait(cluster, a, key, task_id, lambda t: t["version"] == 2, "serving version 2")
        assert t["status"] == "ready"
        assert len(_published_by(cluster, task_id, 2)) == 1, "no worker log shows the publish"

        v2_a, v2_b = _classify(a, key, task_id), _classify(b, key, task_id)
        assert v2_a["version"] == 2, f"replica A still answers with version {v2_a['version']}"
        assert v2_b["version"] == 2, f"replica B still answers with version {v2_b['version']}"
        assert _same_scores(v2_a, v2_b), (v2_a, v2_b)
        assert not _same_scores(v2_a, v1_a, tol=1e-6), "version 2 answers exactly like version 1"

        prompt = a.get(f"/v1/tasks/{task_id}/prompt", headers=key)
        assert prompt.status_code == 200 and prompt.headers["X-Prompt-Version"] == "2"


def test_killed_worker_job_is_finished_by_the_other_worker(scale_cluster: Cluster) -> None:
    cluster = scale_cluster
    workers = cluster.workers
    assert len(workers) == 2 and all(p.alive() for p in workers), "both workers must be up"
    with cluster.api("api-a") as a, cluster.api("api-b") as b:
        key = _tenant(a)
        # A run of several seconds: long enough to be caught mid-tuning.
        task_id = _create_task(a, key, "vpt-shallow", dataset_zip(CLASSES, per_class=16, seed=3), {"epochs": 80})

        def running(t: dict[str, Any]) -> bool:
            assert t["status"] != "ready", "the run ended before it could be killed; make it longer (epochs)"
            return t["status"] == "running" and t["progress"] > 0 and bool(_tuned_by(cluster, task_id))

        t = _wait(cluster, b, key, task_id, running, "running on a worker", interval=0.05)
        tuning = _tuned_by(cluster, task_id)
        assert len(tuning) == 1, f"the job was delivered to {tuning} before the kill"
        victim = cluster.procs[tuning[0]]
        (survivor,) = [p for p in workers if p is not victim]
        assert t["progress"] < 1.0

        victim.kill()
        killed_at = time.monotonic()
        progress_at_kill = _task(b, key, task_id)["progress"]
        assert not victim.alive()
        # The survivor had not started the job before the kill: it gets it only through the
        # broker's re-delivery of the unacknowledged message.
        assert survivor.name not in _tuned_by(cluster, task_id), "the job ran twice before the kill"
        assert 0 < progress_at_kill < 1, progress_at_kill

        t = _wait(cluster, b, key, task_id, lambda t: t["status"] == "ready", "ready after the kill")
        assert t["version"] == 1 and t["progress"] == 1.0
        assert _tuned_by(cluster, task_id) == sorted([victim.name, survivor.name])
        assert _published_by(cluster, task_id, 1) == [survivor.name]
        print(f"job re-delivered and finished {time.monotonic() - killed_at:.1f}s after the kill")

        body = _classify(a, key, task_id)
        assert body["version"] == 1
