"""The tenant's side of the ``promptstore`` command line, over HTTP (``api.client``):
``tasks create/list/get/retrain/cancel/delete/versions/serve/evaluate/events``, ``classify``,
``prompt download``, and the admin's ``tenant list``; ``--version`` on the top-level app.

Each command prints its result as JSON on stdout (one object; ``tasks list`` and ``tenant
list`` one list) and everything else (progress, what to do next, errors) on stderr. Errors are
one line, never a traceback: exit 1 for a refused call, an unreachable server or a task that
failed or was cancelled while waiting; exit 2 for bad arguments (a missing key, a bad file).
Registered on the app by ``register`` (called from ``api.cli``).
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from api.client import PromptstoreClient

DEFAULT_URL = "http://127.0.0.1:8000"  # = api.client.DEFAULT_URL (not imported: keeps --help fast)
ADMIN_TOKEN_FILE = Path("var") / "admin_token"  # = api.cli.ADMIN_TOKEN_FILE, where `serve` keeps a generated one
POLL_SECONDS = 0.5
ACTIVE = ("queued", "running")

tasks_app = typer.Typer(
    help="Your tasks: create, list, get, retrain, cancel, delete; their versions, evaluations and events.",
    no_args_is_help=True,
)
prompt_app = typer.Typer(help="Your tasks' prompts.", no_args_is_help=True)

# --------------------------------------------------------------------------- shared options

Url = Annotated[
    str, typer.Option("--url", envvar="PROMPTSTORE_URL", help="Server URL.", rich_help_panel="Connection")
]
ApiKey = Annotated[
    Optional[str],
    typer.Option("--api-key", envvar="PROMPTSTORE_API_KEY", help="Tenant API key.", show_default=False,
                 rich_help_panel="Connection"),  # fmt: skip
]
AdminToken = Annotated[
    Optional[str],
    typer.Option("--admin-token", envvar="PROMPTSTORE_ADMIN_TOKEN",
                 help="Admin token (default: ./var/admin_token if there).", show_default=False,
                 rich_help_panel="Connection"),  # fmt: skip
]
TaskRef = Annotated[str, typer.Argument(help="Task id, or a name unique among your tasks.", show_default=False)]
Wait = Annotated[bool, typer.Option("--wait", help="Wait for the run to finish, with a progress bar.")]
Timeout = Annotated[
    Optional[float], typer.Option("--timeout", min=0, help="With --wait: give up after this many seconds.")
]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _note(message: str) -> None:
    typer.echo(message, err=True)


def _emit(obj: Any) -> None:
    """The command's result: JSON on stdout (indented on a terminal, one line otherwise)."""
    typer.echo(json.dumps(obj, indent=2 if sys.stdout.isatty() else None))


def _hint(status: int, retry_after: str | None, *, admin: bool) -> str:
    if status == 401:
        if admin:
            return ("check --admin-token / PROMPTSTORE_ADMIN_TOKEN (the server prints a generated one at its "
                    "first start and keeps it in ./var/admin_token)")  # fmt: skip
        return "check --api-key / PROMPTSTORE_API_KEY (`promptstore tenant create NAME` prints a new key)"
    if status == 404:
        return "`promptstore tasks list` shows your tasks"
    if status in (429, 503):
        return f"retry in {retry_after or 'a few'} s"
    if status >= 500:
        return "retry later; if it persists, the server's log says why"
    return ""


@contextmanager
def _client(url: str, *, api_key: str | None = None, admin_token: str | None = None,
            admin: bool = False) -> Iterator[PromptstoreClient]:  # fmt: skip
    """A client for ``url``; a refused call, an unreachable server or Ctrl-C ends the command
    with one line on stderr."""
    from api.client import PromptstoreClient, PromptstoreError, ServerUnreachable

    if "://" not in url:
        _fail(f"--url {url!r} is not a URL; give the server's address with its scheme, such as {DEFAULT_URL}", 2)
    if admin:
        admin_token = admin_token or _saved_admin_token()
        if not admin_token:
            _fail("no admin token: pass --admin-token or export PROMPTSTORE_ADMIN_TOKEN=... (a server on the "
                  "embedded defaults keeps it in ./var/admin_token)", 2)  # fmt: skip
    elif not api_key:
        _fail("no API key: export PROMPTSTORE_API_KEY=... or pass --api-key (an operator creates a tenant and "
              "its key with `promptstore tenant create NAME`, which prints it)", 2)  # fmt: skip
    try:
        with PromptstoreClient(url, api_key=api_key, admin_token=admin_token) as client:
            yield client
    except ServerUnreachable as exc:
        _fail(f"cannot reach the Promptstore server at {exc.url} ({exc.reason}); start one with `promptstore "
              "serve`, or point --url / PROMPTSTORE_URL at it")  # fmt: skip
    except PromptstoreError as exc:
        hint = _hint(exc.status, exc.retry_after, admin=admin)
        if exc.status == 404 and "versions kept" in exc.detail:  # the task exists; its version does not
            hint = "`promptstore tasks versions TASK` lists the kept versions"
        detail = exc.detail.rstrip(".")
        _fail(f"{detail} (HTTP {exc.status})" + (f"; {hint}" if hint else ""))
    except KeyboardInterrupt:
        _fail("interrupted; a run already started goes on on the server (`promptstore tasks list` shows it)", 130)


def _saved_admin_token() -> str | None:
    try:
        return ADMIN_TOKEN_FILE.read_text().strip() or None
    except OSError:
        return None


def _resolve(client: PromptstoreClient, ref: str) -> str:
    """A task id as is; else the id of the one task with that name."""
    ref = ref.strip()
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return ref
    named = [t["id"] for t in client.list_tasks(name_prefix=ref[:200]) if t.get("name") == ref]
    if not named:
        _fail(f"no task with the id or name {ref!r}; `promptstore tasks list` shows your tasks")
    if len(named) > 1:
        _fail(f"{len(named)} tasks are named {ref!r}; use its id (`promptstore tasks list` shows them)")
    return named[0]


# --------------------------------------------------------------------------- inputs


def _read_config(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    text = raw
    if raw.startswith("@"):
        path = Path(raw[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            _fail(f"cannot read the config file {path}: {exc.strerror or exc}", 2)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--config is not valid JSON ({exc.msg}); pass an object such as '{{\"epochs\": 5}}' or @file.json", 2)
    if not isinstance(value, dict):
        _fail("--config must be a JSON object of method hyperparameters, such as '{\"epochs\": 5}'", 2)
    return value


def _read_classes(classes_json: str | None, class_names: list[str] | None) -> list[str] | None:
    if classes_json is not None and class_names:
        _fail("give the classes once: either --classes '[\"a\", \"b\"]' or repeated --class", 2)
    if class_names:
        return list(class_names)
    if classes_json is None:
        return None
    try:
        value = json.loads(classes_json)
    except json.JSONDecodeError as exc:
        _fail(f"--classes is not valid JSON ({exc.msg}); pass a list such as '[\"cat\", \"dog\"]' or use --class", 2)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        _fail("--classes must be a JSON list of strings, such as '[\"cat\", \"dog\"]'", 2)
    return value


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def zip_folder(folder: Path) -> bytes:
    """The folder as an in-memory zip whose top-level entries are its class folders (hidden
    files and folders skipped)."""
    buf = io.BytesIO()
    count = 0
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if _is_hidden(rel) or not path.is_file():
                continue
            zf.write(path, rel.as_posix())
            count += 1
    if count == 0:
        _fail(f"{folder} holds no files; a dataset is one folder per class with its images inside", 2)
    return buf.getvalue()


def _read_dataset(path: Path) -> tuple[bytes, str]:
    """``(zip bytes, file name)`` from a folder of class folders or a zip file."""
    if path.is_dir():
        return zip_folder(path), f"{path.resolve().name or 'dataset'}.zip"
    if not path.is_file():
        _fail(f"no such file or folder: {path}; --dataset takes a folder of class folders or a .zip", 2)
    if not zipfile.is_zipfile(path):
        _fail(f"{path} is not a zip archive; --dataset takes a folder of class folders or a .zip", 2)
    return path.read_bytes(), path.name


def _read_images(paths: list[Path]) -> list[tuple[str, bytes]]:
    out = []
    for p in paths:
        try:
            out.append((p.name, p.read_bytes()))
        except OSError as exc:
            _fail(f"cannot read the image {p}: {exc.strerror or exc}", 2)
    return out


# --------------------------------------------------------------------------- waiting


def _wait(client: PromptstoreClient, task: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Poll the task until its current run is no longer queued or running; a progress bar on
    stderr meanwhile. Returns the task then, read once more with its per-epoch history."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from api.client import run_state

    tid, name = task["id"], task.get("name") or task["id"]
    status, progress, _ = run_state(task)
    deadline = None if timeout is None else time.monotonic() + timeout
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        job = bar.add_task(f"{name}: {status}", total=1.0, completed=progress)
        while status in ACTIVE:
            if deadline is not None and time.monotonic() >= deadline:
                bar.stop()
                _fail(f"task {tid} is still {status} after {timeout:g} s; it goes on on the server "
                      f"(`promptstore tasks get {tid} --wait` waits again)")  # fmt: skip
            time.sleep(POLL_SECONDS)
            task = client.get_task(tid)
            status, progress, _ = run_state(task)
            bar.update(job, completed=progress, description=f"{name}: {status}")
    return client.get_task(tid, include=("history",))  # the finished run's epochs, once


def _finish(task: dict[str, Any]) -> None:
    """Print the task and say what to do next; exit 1 when its run failed or was cancelled."""
    from api.client import run_state

    tid = task["id"]
    status, _, error = run_state(task)
    _emit(task)
    if status == "ready":
        acc = (task.get("metrics") or {}).get("val_accuracy")
        accuracy = f", val_accuracy {acc:.3f}" if isinstance(acc, (int, float)) else ""
        _note(f"task {tid} is ready (version {task.get('version')}{accuracy}); "
              f"classify with `promptstore classify {tid} IMAGE...`")  # fmt: skip
    elif status == "failed":
        _fail(f"task {tid} failed: {error or 'no reason given'}; fix the dataset or config and run "
              f"`promptstore tasks retrain {tid}`")  # fmt: skip
    elif status == "cancelled":
        _fail(f"task {tid} was cancelled; `promptstore tasks retrain {tid}` starts a new run")
    else:  # pragma: no cover - _wait returns only finished runs
        _note(f"task {tid} is {status}")


def _queued_note(task: dict[str, Any], verb: str) -> None:
    tid = task["id"]
    _note(f"task {tid} {verb}; `promptstore tasks get {tid} --wait` waits for it with a progress bar")


# --------------------------------------------------------------------------- tasks


def _submitted(client: PromptstoreClient, task: dict[str, Any], *, wait: bool, timeout: float | None, queued: str) -> None:
    """After a create or retrain: print the task and what to do next, or follow its run to the
    end (``--wait``) and finish as ``tasks get --wait`` does."""
    if not wait:
        _emit(task)
        _queued_note(task, queued)
        return
    _finish(_wait(client, task, timeout))


@tasks_app.command("create")
def tasks_create(
    name: Annotated[str, typer.Argument(help="Task name.", show_default=False)],
    method: Annotated[str, typer.Option("--method", "-m", help="zeroshot, coop, cocoop, vpt-shallow, vpt-deep, padding or linear-probe.", show_default=False)],
    dataset: Annotated[Optional[Path], typer.Option("--dataset", "-d", help="Folder of class folders, or a .zip (not for zeroshot).", show_default=False)] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help='Zeroshot classes as JSON, e.g. \'["cat", "dog"]\'.', show_default=False)] = None,
    class_: Annotated[Optional[list[str]], typer.Option("--class", help="A zeroshot class (repeat it).", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="Hyperparameters as JSON, or @file.json.", show_default=False)] = None,
    wait: Wait = False,
    timeout: Timeout = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Create a task and queue its tuning; prints the task."""
    cfg = _read_config(config)
    names = _read_classes(classes, class_)
    if method.strip() == "zeroshot":
        if dataset is not None:
            _fail("zeroshot takes no --dataset; give its classes with --class (repeated) or --classes", 2)
        if names is None:
            _fail("zeroshot needs its classes: --class cat --class dog, or --classes '[\"cat\", \"dog\"]'", 2)
        data, filename = None, "dataset.zip"
    else:
        if names is not None:
            _fail(f"--class/--classes are for zeroshot only; {method} takes its classes from the dataset's folders", 2)
        if dataset is None:
            _fail(f"{method} needs --dataset: a folder with one sub-folder of images per class, or a .zip of it", 2)
        data, filename = _read_dataset(dataset)
    with _client(url, api_key=api_key) as client:
        task = client.create_task(name, method.strip(), dataset=data, classes=names, config=cfg,
                                  dataset_filename=filename)  # fmt: skip
        for warning in task.get("warnings") or []:
            _note(f"warning: {warning}")
        _submitted(client, task, wait=wait, timeout=timeout, queued="is queued")


@tasks_app.command("list")
def tasks_list(
    table: Annotated[bool, typer.Option("--table", help="A table for people instead of JSON.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List your tasks; prints a JSON list."""
    with _client(url, api_key=api_key) as client:
        items = client.list_tasks()
    if not table:
        _emit(items)
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table("id", "name", "method", "status", "progress", "version", box=None)
        for task in items:
            t.add_row(task["id"], task["name"], task["method"], task["status"], f"{task['progress']:.0%}",
                      str(task["version"] if task["version"] is not None else "-"))  # fmt: skip
        Console(width=200).print(t)
    if not items:
        _note("no tasks yet; create one with `promptstore tasks create NAME --method coop --dataset DIR --wait`")


@tasks_app.command("get")
def tasks_get(
    task: TaskRef,
    wait: Wait = False,
    timeout: Timeout = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a task: status, progress, metrics, history."""
    with _client(url, api_key=api_key) as client:
        out = client.get_task(_resolve(client, task), include=("history",))
        if not wait:
            _emit(out)
            return
        out = _wait(client, out, timeout)
    _finish(out)


@tasks_app.command("retrain")
def tasks_retrain(
    task: TaskRef,
    dataset: Annotated[Optional[Path], typer.Option("--dataset", "-d", help="A new folder or .zip (default: keep).", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="New hyperparameters as JSON or @file.json (default: keep).", show_default=False)] = None,
    wait: Wait = False,
    timeout: Timeout = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Start a new run, the next prompt version; the current one keeps serving."""
    cfg = _read_config(config)
    data, filename = _read_dataset(dataset) if dataset is not None else (None, "dataset.zip")
    with _client(url, api_key=api_key) as client:
        out = client.retrain_task(_resolve(client, task), dataset=data, config=cfg, dataset_filename=filename)
        _submitted(client, out, wait=wait, timeout=timeout, queued="has a new run queued")


@tasks_app.command("cancel")
def tasks_cancel(task: TaskRef, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a task's queued or running run."""
    from api.client import run_state

    with _client(url, api_key=api_key) as client:
        out = client.cancel_task(_resolve(client, task))
    _emit(out)
    tid = out["id"]
    status, _, _ = run_state(out)
    if status == "running":
        _note(f"cancel requested: the run stops at its next step (`promptstore tasks get {tid} --wait` follows it)")
    elif status == "cancelled":
        _note(f"task {tid} run cancelled; `promptstore tasks retrain {tid}` starts a new one")
    else:
        _note(f"task {tid} had no run in progress (it is {status}); nothing to cancel")


@tasks_app.command("delete")
def tasks_delete(task: TaskRef, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Delete a task, its prompts and its dataset."""
    with _client(url, api_key=api_key) as client:
        tid = _resolve(client, task)
        client.delete_task(tid)
    _emit({"id": tid, "deleted": True})


@tasks_app.command("versions")
def tasks_versions(
    task: TaskRef,
    table: Annotated[bool, typer.Option("--table", help="A table for people instead of JSON.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List a task's kept prompt versions (newest first) and which one is served."""
    with _client(url, api_key=api_key) as client:
        out = client.list_versions(_resolve(client, task))
    if not table:
        _emit(out)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("version", "served", "method", "val_accuracy", "created", "bytes", box=None)
    for v in out["items"]:
        acc = (v.get("metrics") or {}).get("val_accuracy")
        t.add_row(str(v["version"]), "*" if v["served"] else "", v["method"],
                  f"{acc:.3f}" if isinstance(acc, (int, float)) else "-", str(v["created_at"]), str(v["size"]))  # fmt: skip
    Console(width=200).print(t)


@tasks_app.command("serve")
def tasks_serve(
    task: TaskRef,
    version: Annotated[int, typer.Argument(min=1, help="The version to serve from now on.", show_default=False)],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Serve another kept version (a rollback or a roll-forward), at once on every replica."""
    with _client(url, api_key=api_key) as client:
        out = client.serve_version(_resolve(client, task), version)
    _emit(out)
    _note(f"task {out['id']} serves version {out['version']} from now on")


@tasks_app.command("evaluate")
def tasks_evaluate(
    task: TaskRef,
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="A labelled folder of class folders or a .zip.", show_default=False)],
    version: Annotated[Optional[int], typer.Option("--version", min=1, help="The version to evaluate (default: the served one).", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="The k of the top-k accuracy (default 5).", show_default=False)] = None,
    precision: Annotated[Optional[float], typer.Option("--precision", min=0.0, max=1.0, help="Target precision of the thresholds (default 0.9).", show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    timeout: Timeout = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Evaluate a version on a held-out labelled set: accuracy, per-class figures, calibration."""
    data, filename = _read_dataset(dataset)
    with _client(url, api_key=api_key) as client:
        tid = _resolve(client, task)
        out = client.evaluate(tid, data, version=version, top_k=top_k, precision=precision, dataset_filename=filename)
        deadline = None if timeout is None else time.monotonic() + timeout
        while wait and out["status"] in ACTIVE:
            if deadline is not None and time.monotonic() >= deadline:
                _fail(f"evaluation {out['id']} is still {out['status']} after {timeout:g} s; it goes on on the server")
            time.sleep(POLL_SECONDS)
            out = client.get_evaluation(tid, out["id"])
    _emit(out)
    if out["status"] == "failed":
        _fail(f"evaluation {out['id']} failed: {out.get('error') or 'no reason given'}")
    if out["status"] == "ready":
        result = out.get("result") or {}
        _note(f"version {out['version']}: accuracy {result.get('accuracy')}, macro F1 {result.get('macro_f1')}, "
              f"ECE {result.get('ece')}, suggested min_score {result.get('suggested_min_score')}")  # fmt: skip
    else:
        _note(f"evaluation {out['id']} is {out['status']}; `promptstore tasks evaluate ... --wait` waits for it")


@tasks_app.command("events")
def tasks_events(
    task: TaskRef,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print new events as they happen until the task is idle.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """What happened to a task, oldest first, one JSON object per line; --follow streams them."""
    with _client(url, api_key=api_key) as client:
        tid = _resolve(client, task)
        if follow:
            for event in client.follow_events(tid):
                typer.echo(json.dumps(event))
            return
        after = 0
        while True:
            page = client.events(tid, after=after)
            for event in page["items"]:
                typer.echo(json.dumps(event))
            if not page["items"]:
                return
            after = page["next_after"]


# --------------------------------------------------------------------------- classify, prompt


def classify(
    task: TaskRef,
    images: Annotated[list[Path], typer.Argument(help="Image files.", show_default=False)],
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="Labels per image (default: all).", show_default=False)] = None,
    min_score: Annotated[Optional[float], typer.Option("--min-score", min=0.0, max=1.0, help="Leave out labels scoring below this (default: the task's).", show_default=False)] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Classify images with a ready task; prints the predictions."""
    import re

    from api.client import PromptstoreError

    files = _read_images(images)
    with _client(url, api_key=api_key) as client:
        try:
            out = client.classify(_resolve(client, task), files, top_k=top_k, min_score=min_score)
        except PromptstoreError as exc:  # the server names images by position: name the file
            exc.detail = re.sub(
                r"images\[(\d+)\]",
                lambda m: f"'{images[int(m.group(1))]}'" if int(m.group(1)) < len(images) else m.group(0),
                exc.detail,
            )
            raise
    _emit(out)


@prompt_app.command("download")
def prompt_download(
    task: TaskRef,
    raw_output: Annotated[Optional[str], typer.Option("--output", "-o", help="File or folder (default: TASK-vN.safetensors here).", show_default=False)] = None,
    version: Annotated[Optional[int], typer.Option("--version", min=1, help="A kept version (default: the served one).", show_default=False)] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a task's served prompt (or a kept version) as safetensors."""
    output = Path(raw_output) if raw_output is not None else None
    with _client(url, api_key=api_key) as client:
        tid = _resolve(client, task)
        prompt = client.download_prompt(tid, version=version)
    default = prompt.filename or f"{tid}-v{prompt.version}.safetensors"
    default = Path(default).name  # never a path from the server
    path = output if output is not None else Path(default)
    if raw_output is not None and raw_output.endswith(("/", "\\")) and not path.is_dir():  # meant a folder
        _fail(f"the folder {output} does not exist; create it or give a file name with -o", 2)
    if path.is_dir():
        path = path / default
    try:
        path.write_bytes(prompt.data)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}; choose another file with -o", 2)
    _emit({"task_id": tid, "version": prompt.version, "path": str(path), "bytes": len(prompt.data),
           "sha256": prompt.sha256})  # fmt: skip
    _note(f"wrote {path}; its safetensors header metadata says the method, backbone, classes and version")


# --------------------------------------------------------------------------- admin, version


def tenant_list(
    table: Annotated[bool, typer.Option("--table", help="A table for people instead of JSON.")] = False,
    url: Url = DEFAULT_URL,
    admin_token: AdminToken = None,
) -> None:
    """List the tenants of a running server (admin); prints a JSON list."""
    with _client(url, admin_token=admin_token, admin=True) as client:
        items = client.list_tenants()
    if not table:
        _emit(items)
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table("id", "name", "tasks", "requests", "last request", box=None)
        for x in items:
            t.add_row(x["id"], x["name"], str(x.get("task_count", "")), str(x.get("request_count", "")),
                      str(x.get("last_request_at") or "-"))  # fmt: skip
        Console(width=200).print(t)
    if not items:
        _note("no tenants yet; create one with `promptstore tenant create NAME`")


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"promptstore {version('promptstore')}")
        except PackageNotFoundError:  # pragma: no cover - run from a checkout that is not installed
            typer.echo("promptstore (not installed; `pip install -e .`)")
        raise typer.Exit()


def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Promptstore: a multi-tenant store of visual prompts on one frozen CLIP/ViT backbone."""


def register(app: typer.Typer, tenant_app: typer.Typer) -> None:
    """Add the tenant-side commands, ``tenant list`` and ``--version`` to the ``promptstore`` app."""
    app.callback()(main)
    app.add_typer(tasks_app, name="tasks")
    app.command("classify")(classify)
    app.add_typer(prompt_app, name="prompt")
    tenant_app.command("list")(tenant_list)
