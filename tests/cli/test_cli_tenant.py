"""The tenant's side of the command line over HTTP (api/cli_tenant.py, api/client.py), run as a
user runs it: subprocesses of the installed console script against one `promptstore serve` (the
embedded defaults, the tiny random backbone) started for this module.

- ``tasks create DIR --wait`` zips the folder, shows a bar, exits 0 on ready; ``tasks list``,
  ``tasks get``, ``classify`` (by id and by name), ``prompt download`` (a readable safetensors),
  ``tasks retrain --wait``, ``tasks cancel``, ``tasks delete``; ``tenant list`` (admin);
  ``--version``.
- Errors are one line naming what to do next, never a traceback: no key, an unreachable server,
  a 4xx's detail, a failed wait.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from procs import free_port, run_cli, settings_env, started
from psdata import image_bytes

TINY = "open_clip:tiny:random"
FAST = '{"epochs": 2, "n_ctx": 2}'


@dataclass
class Server:
    url: str
    cwd: Path  # the server's folder (./var/admin_token is there)
    admin_token: str
    api_key: str
    tenant: str

    def env(self, **extra: str) -> dict[str, str]:
        """A client's environment: the server's URL and the tenant's key."""
        return settings_env(None, PROMPTSTORE_URL=self.url, PROMPTSTORE_API_KEY=self.api_key, **extra)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = settings_env(None, PROMPTSTORE_BACKBONE=TINY, PROMPTSTORE_DEVICE="cpu")
    with started(["serve", "--port", str(port)], env=env, cwd=cwd, name="serve") as proc:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.proc.poll() is None and time.monotonic() < deadline, proc.tail()
            time.sleep(0.2)
        token = (cwd / "var" / "admin_token").read_text().strip()
        r = httpx.post(f"{url}/v1/admin/tenants", json={"name": "cli-user"}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text
        yield Server(url=url, cwd=cwd, admin_token=token, api_key=r.json()["api_key"], tenant="cli-user")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A client folder with a two-class dataset folder (and hidden files the zip must skip)."""
    root = tmp_path / "colours"
    for label, name in enumerate(("red", "green")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"{i}.png").write_bytes(image_bytes(label, seed=i))
    (root / ".DS_Store").write_bytes(b"\x00junk")
    (root / "red" / ".hidden.png").write_bytes(b"not an image")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    return tmp_path


def _json(stdout: str) -> Any:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line of JSON on stdout, got: {stdout!r}"
    return json.loads(lines[0])


def _ok(args: list[str], server: Server, cwd: Path, **extra: str) -> Any:
    r = run_cli(args, env=server.env(**extra), cwd=cwd, timeout=180)
    assert r.returncode == 0, f"{args}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return _json(r.stdout)


def _err(r: Any, code: int = 1) -> str:
    """The one-line error of a refused command (nothing on stdout, no traceback)."""
    assert r.returncode == code, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip() == "" and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_zip_folder_keeps_class_folders_at_the_top_and_skips_hidden_files(workdir: Path) -> None:
    from api.cli_tenant import zip_folder

    names = sorted(zipfile.ZipFile(io.BytesIO(zip_folder(workdir / "colours"))).namelist())
    assert names == [f"{c}/{i}.png" for c in ("green", "red") for i in range(4)]


def test_version() -> None:
    from importlib.metadata import version

    r = run_cli(["--version"], env=settings_env(None), cwd=Path.cwd())
    assert r.returncode == 0 and r.stdout.strip() == f"promptstore {version('promptstore')}"


def test_a_tenants_session_create_wait_list_get_classify_download_retrain_delete(server: Server, workdir: Path) -> None:
    # create from a folder, waiting with a progress bar: the ready task on stdout, exit 0
    r = run_cli(["tasks", "create", "colours", "--method", "coop", "--dataset", "colours", "--config", FAST, "--wait"],
                env=server.env(), cwd=workdir, timeout=180)  # fmt: skip
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    task = _json(r.stdout)
    tid = task["id"]
    assert task["status"] == "ready" and task["version"] == 1 and task["classes"] == ["green", "red"], task
    assert task["warnings"] == [] and task["config"]["epochs"] == 2
    assert "100%" in r.stderr and f"promptstore classify {tid}" in r.stderr, r.stderr

    # list: this tenant's tasks, as a JSON list; --table for people
    items = _ok(["tasks", "list"], server, workdir)
    assert [t["id"] for t in items] == [tid]
    r = run_cli(["tasks", "list", "--table"], env=server.env(), cwd=workdir)
    assert r.returncode == 0 and tid in r.stdout and "ready" in r.stdout

    # get, by id and by name
    assert _ok(["tasks", "get", tid], server, workdir)["metrics"]["epochs"] == 2
    assert _ok(["tasks", "get", "colours"], server, workdir)["id"] == tid

    # classify: several files, --top-k
    out = _ok(["classify", tid, "colours/red/0.png", "colours/green/1.png", "--top-k", "1"], server, workdir)
    assert out["task_id"] == tid and out["version"] == 1
    assert len(out["predictions"]) == 2 and all(len(p) == 1 for p in out["predictions"])
    out = _ok(["classify", "colours", "colours/red/2.png"], server, workdir)
    assert {p["label"] for p in out["predictions"][0]} == {"red", "green"}

    # prompt download: the default file name, a readable safetensors header
    out = _ok(["prompt", "download", tid], server, workdir)
    path = workdir / f"{tid}-v1.safetensors"
    assert out["path"] == path.name and out["version"] == 1 and path.stat().st_size == out["bytes"]
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    assert meta["method"] == "coop" and meta["version"] == "1", meta
    out = _ok(["prompt", "download", "colours", "-o", "p.safetensors"], server, workdir)
    assert (workdir / "p.safetensors").read_bytes() == data

    # retrain with --wait: the next version; the bar follows the training run
    r = run_cli(["tasks", "retrain", tid, "--config", '{"epochs": 1, "n_ctx": 2}', "--wait"], env=server.env(),
                cwd=workdir, timeout=180)  # fmt: skip
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    task = _json(r.stdout)
    assert task["status"] == "ready" and task["version"] == 2 and task["training"]["status"] == "ready", task
    assert task["config"]["epochs"] == 1

    # a file that cannot be read: a usage error before any request
    r = run_cli(["classify", tid, "nope.png"], env=server.env(), cwd=workdir)
    assert "cannot read the image nope.png" in _err(r, 2)
    # a file the server refuses: named by its path, not by its position in the request
    (workdir / "notes.txt").write_text("not an image")
    line = _err(run_cli(["classify", tid, "colours/red/0.png", "notes.txt"], env=server.env(), cwd=workdir))
    assert "'notes.txt' is not a decodable image" in line and "images[1]" not in line and "HTTP 422" in line

    # delete: then the task is gone (404 with the server's detail and what to do next)
    assert _ok(["tasks", "delete", tid], server, workdir) == {"id": tid, "deleted": True}
    line = _err(run_cli(["tasks", "get", tid], env=server.env(), cwd=workdir))
    assert f"task {tid} not found" in line and "HTTP 404" in line and "promptstore tasks list" in line
    assert _ok(["tasks", "list"], server, workdir) == []


def test_versions_serve_evaluate_events_and_min_score(server: Server, workdir: Path) -> None:
    r = run_cli(["tasks", "create", "living", "--method", "linear-probe", "--dataset", "colours",
                 "--config", '{"l2_grid": [1.0]}', "--wait"], env=server.env(), cwd=workdir, timeout=180)  # fmt: skip
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    tid = _json(r.stdout)["id"]
    r = run_cli(["tasks", "retrain", tid, "--config", '{"l2_grid": [0.001]}', "--wait"], env=server.env(),
                cwd=workdir, timeout=180)  # fmt: skip
    assert r.returncode == 0 and _json(r.stdout)["version"] == 2, r.stderr

    versions = _ok(["tasks", "versions", "living"], server, workdir)
    assert [v["version"] for v in versions["items"]] == [2, 1] and versions["served_version"] == 2
    r = run_cli(["tasks", "versions", tid, "--table"], env=server.env(), cwd=workdir)
    assert r.returncode == 0 and "val_accuracy" in r.stdout
    assert _ok(["tasks", "serve", tid, "1"], server, workdir)["version"] == 1
    assert _ok(["classify", tid, "colours/red/0.png"], server, workdir)["version"] == 1
    out = _ok(["prompt", "download", tid, "--version", "2", "-o", "v2.safetensors"], server, workdir)
    assert out["version"] == 2 and (workdir / "v2.safetensors").stat().st_size == out["bytes"]
    assert "no version 7" in _err(run_cli(["tasks", "serve", tid, "7"], env=server.env(), cwd=workdir))

    out = _ok(["classify", tid, "colours/red/0.png", "--min-score", "1"], server, workdir)
    assert out["min_score"] == 1 and all(p["score"] >= 1 for p in out["predictions"][0])

    ev = _ok(["tasks", "evaluate", tid, "--dataset", "colours", "--precision", "0.5", "--wait"], server, workdir)
    assert ev["status"] == "ready" and ev["version"] == 1 and ev["result"]["n_images"] == 8, ev
    assert [c["label"] for c in ev["result"]["per_class"]] == ["green", "red"]

    r = run_cli(["tasks", "events", tid], env=server.env(), cwd=workdir)
    assert r.returncode == 0, r.stderr
    kinds = [json.loads(line)["kind"] for line in r.stdout.splitlines()]
    assert kinds[0] == "created" and kinds.count("published") == 2 and "served" in kinds and kinds[-1] == "evaluated"
    r = run_cli(["tasks", "events", tid, "--follow"], env=server.env(), cwd=workdir, timeout=60)
    assert r.returncode == 0 and [json.loads(line)["kind"] for line in r.stdout.splitlines()] == kinds
    _ok(["tasks", "delete", tid], server, workdir)


def test_cancel_then_wait_says_cancelled_and_how_to_start_again(server: Server, workdir: Path) -> None:
    task = _ok(["tasks", "create", "long", "-m", "coop", "-d", "colours", "-c", '{"epochs": 10000, "n_ctx": 2}'],
               server, workdir)  # fmt: skip
    tid = task["id"]
    assert task["status"] == "queued"
    r = run_cli(["tasks", "cancel", "long"], env=server.env(), cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert _json(r.stdout)["id"] == tid and ("cancel" in r.stderr)
    r = run_cli(["tasks", "get", tid, "--wait", "--timeout", "90"], env=server.env(), cwd=workdir, timeout=120)
    line = _err_with_json(r)
    assert f"task {tid} was cancelled" in line and f"promptstore tasks retrain {tid}" in line
    # a 409 detail: no version to classify yet
    line = _err(run_cli(["classify", tid, "colours/red/0.png"], env=server.env(), cwd=workdir))
    assert "HTTP 409" in line and tid in line
    assert _ok(["tasks", "delete", tid], server, workdir)["deleted"] is True


def _err_with_json(r: Any) -> str:
    """A wait that ended in failed/cancelled: the task on stdout, one error line, exit 1."""
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert _json(r.stdout)["status"] in ("failed", "cancelled") and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_zeroshot_with_repeated_class_and_a_4xx_detail(server: Server, workdir: Path) -> None:
    r = run_cli(["tasks", "create", "pets", "-m", "zeroshot", "--class", "cat", "--class", "dog", "--wait"],
                env=server.env(), cwd=workdir, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    task = _json(r.stdout)
    assert task["classes"] == ["cat", "dog"] and task["status"] == "ready"
    (workdir / "cfg.json").write_text('{"epochs": 1, "bogus": 3}')
    line = _err(run_cli(["tasks", "create", "x", "-m", "coop", "-d", "colours", "-c", "@cfg.json"], env=server.env(),
                        cwd=workdir))  # fmt: skip
    assert "bogus" in line and "HTTP 422" in line
    assert _ok(["tasks", "delete", "pets"], server, workdir)["deleted"] is True


def test_tenant_list_is_admin_over_http(server: Server, tmp_path: Path) -> None:
    env = settings_env(None, PROMPTSTORE_URL=server.url)
    # from the server's folder the kept ./var/admin_token is used
    r = run_cli(["tenant", "list"], env=env, cwd=server.cwd)
    assert r.returncode == 0, r.stderr
    assert server.tenant in [t["name"] for t in _json(r.stdout)]
    r = run_cli(["tenant", "list", "--admin-token", server.admin_token], env=env, cwd=tmp_path)
    assert r.returncode == 0 and server.tenant in [t["name"] for t in _json(r.stdout)]
    line = _err(run_cli(["tenant", "list"], env=env, cwd=tmp_path), 2)
    assert "PROMPTSTORE_ADMIN_TOKEN" in line
    line = _err(run_cli(["tenant", "list", "--admin-token", "wrong"], env=env, cwd=tmp_path))
    assert "HTTP 401" in line and "PROMPTSTORE_ADMIN_TOKEN" in line


def test_missing_key_unreachable_server_and_wrong_key_messages(server: Server, tmp_path: Path) -> None:
    line = _err(run_cli(["tasks", "list"], env=settings_env(None, PROMPTSTORE_URL=server.url), cwd=tmp_path), 2)
    assert "no API key" in line and "export PROMPTSTORE_API_KEY=" in line and "promptstore tenant create NAME" in line

    dead = f"http://127.0.0.1:{free_port()}"
    line = _err(run_cli(["tasks", "list", "--url", dead], env=server.env(), cwd=tmp_path))
    assert f"cannot reach the Promptstore server at {dead}" in line and "promptstore serve" in line

    line = _err(run_cli(["tasks", "list", "--api-key", "not-a-key"], env=server.env(), cwd=tmp_path))
    assert "HTTP 401" in line and "PROMPTSTORE_API_KEY" in line

    line = _err(run_cli(["tasks", "create", "x", "-m", "coop"], env=server.env(), cwd=tmp_path), 2)
    assert "--dataset" in line
    line = _err(run_cli(["tasks", "get", "no-such-name"], env=server.env(), cwd=tmp_path))
    assert "no task with the id or name 'no-such-name'" in line and "promptstore tasks list" in line


def test_every_command_is_in_the_docs_command_line_table() -> None:
    import typer.main

    from api.cli import app

    def paths(cmd: Any, prefix: str) -> Iterator[str]:
        subs = getattr(cmd, "commands", None)
        if not subs:
            yield prefix
            return
        for name, sub in subs.items():
            yield from paths(sub, f"{prefix} {name}")

    docs = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = docs.split("## Command line", 1)[1]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `promptstore ")]
    missing = [p for p in paths(typer.main.get_command(app), "promptstore")
               if p.split()[1] != "bench" and not any(f"`{p} " in r or f"`{p}`" in r for r in rows)]  # fmt: skip
    assert not missing, f"docs/api.md's Command line table lacks {missing}"
    assert any("`promptstore --version`" in r for r in rows)
