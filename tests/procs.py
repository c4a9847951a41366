"""Running ``promptstore`` commands as real subprocesses in tests (tests/worker, tests/cli):
a clean environment, a log file to wait on, and a process group that is always stopped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def promptstore_exe() -> str:
    """The installed ``promptstore`` console script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "promptstore"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("promptstore")
    if found is None:
        raise RuntimeError("the `promptstore` console script is not installed (pip install -e .)")
    return found


def settings_env(settings: Any = None, **extra: str) -> dict[str, str]:
    """This process's environment without any ``PROMPTSTORE_*`` variable, plus the
    PROMPTSTORE_ variables (docs/settings.md) for ``settings`` (those that are set) and ``extra``; one torch
    thread, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSTORE_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if settings is not None:
        for field in ("database_url", "object_store_url", "s3_access_key", "s3_secret_key", "broker_url",
                      "redis_url", "backbone", "device", "admin_token"):  # fmt: skip
            value = getattr(settings, field)
            if value is not None:
                env[f"PROMPTSTORE_{field.upper()}"] = str(value)
    env.update(extra)
    return env


def run_cli(args: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``promptstore ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [promptstore_exe(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A started command whose stdout and stderr go to files."""

    def __init__(self, proc: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> None:
        self.proc = proc
        self.stdout_path = stdout
        self.stderr_path = stderr

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return f"--- stdout:\n{self.stdout()[-n:]}\n--- stderr:\n{self.stderr()[-n:]}"

    def wait_for(self, needle: str, *, timeout: float = 90, stream: str = "stderr", count: int = 1) -> str:
        """Until ``needle`` appears (``count`` times) in the stream's output; fails with the
        output's tail if the process exits or time runs out first."""
        read = self.stderr if stream == "stderr" else self.stdout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = read()
            if text.count(needle) >= count:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited with {self.proc.returncode} before {needle!r}\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not seen after {timeout:.0f}s\n{self.tail()}")


def stop_process_group(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@contextmanager
def started(args: list[str], *, env: dict[str, str], cwd: Path, name: str = "proc", raw: bool = False) -> Iterator[Process]:
    """``promptstore ARGS`` (or the command ``ARGS`` itself with ``raw``) in its own process
    group, stopped with its children on exit; output in ``cwd/NAME.stdout|stderr``."""
    out, err = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
    cmd = list(args) if raw else [promptstore_exe(), *args]
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fo, stderr=fe, start_new_session=True)
    try:
        yield Process(proc, out, err)
    finally:
        stop_process_group(proc)


def production_settings(pg_url: str, redis_url: str, s3_server: Any, name: str, **overrides: Any) -> Any:
    """Migrated settings on the parts production runs: the session's Postgres, a fresh bucket
    ``pstest-{name}-<random>`` on the S3 server, Redis as the broker, the tiny backbone on the
    CPU and the tests' admin token; ``overrides`` win. For tests that start real workers."""
    import uuid

    from apiclient import TEST_ADMIN_TOKEN
    from store.migrate import upgrade
    from store.settings import Settings

    values: dict[str, Any] = dict(
        database_url=pg_url,
        object_store_url=s3_server.url_for(f"pstest-{name}-{uuid.uuid4().hex[:12]}"),
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        broker_url=redis_url,
        backbone="open_clip:tiny:random",
        device="cpu",
        admin_token=TEST_ADMIN_TOKEN,
    )
    settings = Settings(**{**values, **overrides})
    upgrade(settings.database_url)
    return settings
