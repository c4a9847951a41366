"""The ``promptstore`` command line: serve, worker, migrate, tenant create, bench.

Logs go to stderr; only a command's result (the tenant JSON, a generated admin token)
goes to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    name="promptstore",
    help="Promptstore: a multi-tenant store of visual prompts on one frozen CLIP/ViT backbone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tenant_app = typer.Typer(help="Manage tenants.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print a table and write JSON).", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
app.add_typer(bench_app, name="bench")

log = logging.getLogger("promptstore")

#: Where a generated admin token is kept so that restarts reuse it.
ADMIN_TOKEN_FILE = Path("var") / "admin_token"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # request/tenant/task ids bound by the API middleware, its dependencies and the jobs
        from store import logcontext

        out.update(logcontext.current())
        for key in logcontext.FIELDS:  # logged with extra={"task_id": ...}
            value = getattr(record, key, None)
            if value:
                out[key] = str(value)
        http = getattr(record, "http", None)  # the access log's fields (api.middleware)
        if isinstance(http, dict):
            out["http"] = http
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _OwnNames(logging.Filter):
    """Libraries that log through the root logger (open_clip calls ``logging.info``) get their
    package's name on the line instead of ``root``; their routine INFO lines (model config
    parsing, tokenizer choice) are dropped unless the level is DEBUG: the service logs what
    matters of them itself (the backbone loaded, random weights)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root":
            parts = Path(record.pathname).parts
            if "site-packages" in parts:
                i = parts.index("site-packages")
                record.name = ".".join([*parts[i + 1:-1], Path(record.pathname).stem])
                if record.levelno <= logging.INFO and self.level > logging.DEBUG:
                    return False
        return True


def setup_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_OwnNames(level))
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level > logging.DEBUG:  # alembic announces each of its plugins at INFO on every start
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _settings():  # noqa: ANN202 - Settings, imported lazily so --help stays fast
    from pydantic import ValidationError

    from store.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        msgs = "; ".join(str(e.get("msg", "")) for e in exc.errors())
        _fail(f"invalid settings: {msgs}")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _migrate(database_url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from store.migrate import upgrade

    try:
        upgrade(database_url)
    except OperationalError as exc:
        where = make_url(database_url).render_as_string(hide_password=True)
        reason = str(exc.orig or exc).strip().splitlines()[0]
        _fail(f"cannot migrate the database {where}: {reason}", 1)


def ensure_admin_token(token: str | None, path: Path = ADMIN_TOKEN_FILE) -> tuple[str, bool]:
    """``(token, generated)``: the configured token, else the one kept in ``path``, else a
    new one written there (mode 0600)."""
    if token:
        return token, False
    if path.is_file():
        saved = path.read_text().strip()
        if saved:
            return saved, False
    path.parent.mkdir(parents=True, exist_ok=True)
    new = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new + "\n")
    return new, True


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Run the HTTP API and the inference engine. With no broker configured, tuning jobs
    run in this process too. Applies migrations first on the embedded SQLite database."""
    settings = _settings()
    setup_logging(settings.log_format)
    if settings.is_embedded_db:
        log.info("applying migrations to the embedded database")
        _migrate(settings.database_url)
    token, generated = ensure_admin_token(settings.admin_token)
    if generated:
        typer.echo(f"Generated admin token (kept in {ADMIN_TOKEN_FILE}; set PROMPTSTORE_ADMIN_TOKEN to choose one):")
        typer.echo(token)
    elif settings.admin_token:
        log.info("admin token: from PROMPTSTORE_ADMIN_TOKEN")
    else:
        log.info("admin token: kept in %s (set PROMPTSTORE_ADMIN_TOKEN to choose one)", ADMIN_TOKEN_FILE.resolve())
    settings = settings.model_copy(update={"admin_token": token})
    if not settings.broker_url:
        log.info("no PROMPTSTORE_BROKER_URL: tuning jobs run in this process (%d thread(s))", settings.job_threads)

    import uvicorn

    from api.app import create_app

    # access_log off: api.middleware logs each request itself, with its request/tenant/task ids
    uvicorn.run(
        create_app(settings), host=host, port=port, log_config=None, proxy_headers=True, access_log=False,
        **http_options(settings),
    )


def http_options(settings: Any) -> dict[str, Any]:
    """The HTTP layer's limits (uvicorn with h11), from settings; docs/operations.md "Hostile input
    and the error contract" says what it answers past them."""
    return {"http": "h11", "h11_max_incomplete_event_size": settings.http_max_header_bytes}


@app.command()
def worker(
    concurrency: int = typer.Option(1, help="Jobs run at once (each process loads the backbone once)."),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
) -> None:
    """Run a Celery worker that tunes prompts (needs PROMPTSTORE_BROKER_URL)."""
    settings = _settings()
    if not settings.broker_url:
        _fail(
            "PROMPTSTORE_BROKER_URL is not set; a worker needs a broker, e.g. "
            "PROMPTSTORE_BROKER_URL=redis://localhost:6379/0 (without one, `promptstore serve` runs jobs itself)"
        )
    setup_logging(settings.log_format)
    from worker.dispatch import run_celery_worker

    run_celery_worker(settings, concurrency=concurrency, loglevel=loglevel)


@app.command()
def migrate() -> None:
    """Apply the database migrations (alembic upgrade head) to PROMPTSTORE_DATABASE_URL."""
    settings = _settings()
    setup_logging(settings.log_format)
    _migrate(settings.database_url)
    log.info("database is at the latest revision")


def _require_index(database_url: str) -> None:
    """Refuse, naming where it looked, unless ``database_url`` is an existing database migrated
    to the code's revision. Only ``serve`` (on the embedded default) and ``migrate`` create one:
    a command run from the wrong folder must not quietly make a new, empty index."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from store.migrate import current_revision, head_revision

    url = make_url(database_url)
    where = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database).resolve()
        where = str(path)
        if not path.is_file():
            _fail(
                f"no database at {path} (PROMPTSTORE_DATABASE_URL={database_url}); run this command in the "
                "folder where `promptstore serve` runs, or set PROMPTSTORE_DATABASE_URL to its database",
                1,
            )
    try:
        current = current_revision(database_url)
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        _fail(f"cannot reach the database {where}: {reason}", 1)
    head = head_revision()
    if current != head:
        state = "is not migrated" if current is None else f"is at revision {current}, the code needs {head}"
        _fail(f"the database {where} {state}; run `promptstore migrate` first", 1)


@app.command()
def fsck(
    gc: bool = typer.Option(False, "--gc", help="Delete the orphans older than the grace period."),
    grace: float = typer.Option(
        None, min=0, help="Grace period in seconds (default PROMPTSTORE_GC_GRACE): younger orphans are kept."
    ),
) -> None:
    """Check that objects and rows agree: prints {"orphans", "missing", "collected", ...} as one
    JSON object. Orphans are objects no row refers to (young ones may be uploads in flight),
    missing are rows whose object is gone. Exit status 1 when an object is missing."""
    settings = _settings()
    setup_logging(settings.log_format, logging.WARNING)
    from store.consistency import check, collect
    from store.db import make_engine, make_sessionmaker
    from store.objects import ObjectStoreError, open_object_store

    _require_index(settings.database_url)
    grace_s = settings.gc_grace if grace is None else grace
    engine = make_engine(settings.database_url)
    try:
        objects = open_object_store(settings)
        sm = make_sessionmaker(engine)
        report = collect(sm, objects, grace_s=grace_s) if gc else check(sm, objects, grace_s=grace_s)
    except ObjectStoreError as exc:
        _fail(str(exc), 1)
    finally:
        engine.dispose()
    typer.echo(json.dumps(report.as_json()))
    if report.missing:
        _fail(f"{len(report.missing)} row(s) point at an object that is not in {objects.location}", 1)


@app.command()
def methods(name: str = typer.Argument(None, help="One method (default: all).")) -> None:
    """Print each method's config fields: default, accepted values, description (Markdown)."""
    from api.methods_doc import all_blocks, config_table

    if name is None:
        typer.echo(all_blocks())
        return
    from backbone import ConfigError

    try:
        typer.echo(config_table(name))
    except ConfigError as exc:
        _fail(str(exc))


@tenant_app.command("create")
def tenant_create(name: str = typer.Argument(..., help="Unique tenant name.")) -> None:
    """Create a tenant; prints {"id", "name", "api_key"} as one JSON object. The key is shown
    only here and stored only as a hash. Needs the service's migrated database."""
    settings = _settings()
    setup_logging(settings.log_format, logging.WARNING)
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from store import repo
    from store.db import make_engine, make_sessionmaker, session_scope

    _require_index(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            tenant, key = repo.create_tenant(s, name)
            out = {"id": tenant.id, "name": tenant.name, "api_key": key}
    except repo.StoreError as exc:
        _fail(str(exc), 1)
    except (OperationalError, ProgrammingError) as exc:
        _fail(f"database error ({type(exc).__name__}); is it reachable and migrated (`promptstore migrate`)?", 1)
    finally:
        engine.dispose()
    typer.echo(json.dumps(out))


@bench_app.command(
    "engine",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def bench_engine(ctx: typer.Context) -> None:
    """The mixed-tenant forward benchmark (api.bench.engine); options are passed through,
    see `promptstore bench engine --help`."""
    from api.bench.engine import run_engine_bench

    run_engine_bench(list(ctx.args))


@bench_app.command("serve")
def bench_serve(
    backbone: str = typer.Option("open_clip:ViT-B-32:random", help="Backbone spec."),
    device: str = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    tasks: int = typer.Option(100, min=1, help="Tasks per scenario (features-only and mixed)."),
    tenants: int = typer.Option(10, min=1, help="Tenants the tasks are spread over."),
    clients: int = typer.Option(32, min=1, help="Concurrent HTTP clients."),
    seconds: float = typer.Option(
        24.0, min=0.1,
        help="Engine seconds per scenario, split into --rounds windows: long enough for many batches in each "
        "(a CPU batch takes about a second, and the steady state skips each window's first two).",
    ),
    rounds: int = typer.Option(
        2, min=1, help="Engine windows per scenario, each followed by its in-process reference (a drift of the "
        "machine's speed hits both alike)."
    ),
    baseline_seconds: float = typer.Option(
        None, help="Seconds per baseline run (default: seconds / 2, between 2 and 3)."
    ),
    images: int = typer.Option(1, min=1, help="Images per request."),
    max_batch: int = typer.Option(None, help="Engine max_batch (default 16 on CPU, 256 on GPU)."),
    max_wait_ms: float = typer.Option(5.0, min=0.0, help="Engine max_wait_ms."),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    out: str = typer.Option("bench-results/serve.json", help="JSON result path."),
) -> None:
    """The service under load (in-process, embedded defaults): served images/s and latency
    against the bare tower, the one-task forward, one request one forward and a naive
    reload-per-switch server. Prints a table and writes JSON."""
    setup_logging("text", logging.WARNING)
    from api.bench.serve import run_serve_bench

    run_serve_bench(
        out, backbone=backbone, device=device, tasks=tasks, tenants=tenants, clients=clients, seconds=seconds,
        rounds=rounds, baseline_seconds=baseline_seconds, images_per_request=images, max_batch=max_batch, max_wait_ms=max_wait_ms,
        threads=threads,
    )


@bench_app.command("dashboard")
def bench_dashboard(
    tasks: int = typer.Option(1000, min=1, help="Tasks in the index."),
    tenants: int = typer.Option(20, min=1, help="Tenants the tasks are spread over."),
    epochs: int = typer.Option(50, min=1, help="Epochs in each task's training history."),
    classes: int = typer.Option(10, min=2, help="Classes per task (confusion matrix size)."),
    repeat: int = typer.Option(20, min=1, help="Requests per page (after 2 warm-ups)."),
    database_url: str = typer.Option(None, help="Database to fill (default: a fresh SQLite file); it must be empty."),
    out: str = typer.Option("bench-results/dashboard.json", help="JSON result path."),
) -> None:
    """Server render time of each admin page with a full index (target: under 300 ms).
    Prints a table and writes JSON."""
    setup_logging("text", logging.WARNING)
    from api.bench.dashboard import run_dashboard_bench

    run_dashboard_bench(
        out, tasks=tasks, tenants=tenants, epochs=epochs, classes=classes, repeat=repeat, database_url=database_url
    )


@bench_app.command("accuracy")
def bench_accuracy(
    backbone: list[str] = typer.Option(
        ["open_clip:tiny:random"], "--backbone", help="Backbone spec (repeat the option for several)."
    ),
    shots: str = typer.Option("1,4,16", help="Training images per class, comma-separated (nested sets)."),
    methods: list[str] = typer.Option(
        None, "--methods",
        help="Comma-separated prompt methods to tune alone and give auto as candidates (default: zeroshot, "
        "linear-probe, coop, cocoop, vpt-shallow, padding); SPEC=LIST for one backbone (repeatable).",
    ),
    test_per_class: int = typer.Option(30, min=1, help="Held-out test images per class."),
    max_epochs: list[str] = typer.Option(
        None, "--max-epochs",
        help="Cap on the gradient-trained methods' epochs (default: their papers' schedules); SPEC=N for one "
        "backbone (repeatable).",
    ),
    budget: list[str] = typer.Option(
        None, "--budget", help="auto's budget_s in seconds (default 120); SPEC=S for one backbone (repeatable)."
    ),
    unshared: list[str] = typer.Option(
        None, "--unshared", help="Backbone spec on which auto also runs with share_features false (repeatable)."
    ),
    seed: int = typer.Option(0, help="Seed of the few-shot and test samples."),
    data: str = typer.Option(
        "/usr/share/datasets/fashion-mnist", help="Folder of the Fashion-MNIST idx files (Debian's dataset-fashion-mnist)."
    ),
    device: str = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    out: str = typer.Option("bench-results/accuracy.json", help="JSON result path."),
) -> None:
    """Held-out accuracy on Fashion-MNIST of every method with its default config and of auto, by
    shots per class, with tuning seconds and whether features are cached. Prints a table and
    writes JSON."""
    setup_logging("text", logging.WARNING)
    from api.bench.accuracy import run_accuracy_bench
    from backbone import ConfigError

    try:
        counts = [int(x) for x in shots.split(",") if x.strip()]
    except ValueError:
        _fail(f"--shots must be comma-separated integers, got {shots!r}")
    if not counts or min(counts) < 1:
        _fail("--shots needs at least one count, each >= 1")
    try:
        run_accuracy_bench(
            out, backbones=list(backbone), shots=counts, methods=methods, test_per_class=test_per_class,
            max_epochs=max_epochs, budget=budget, unshared=unshared, seed=seed, data=data, device=device,
            threads=threads,
        )
    except (FileNotFoundError, ValueError, ConfigError) as exc:
        _fail(str(exc), 1)


# The tenant's side over HTTP (tasks, classify, prompt), `tenant list` and --version: api.cli_tenant.
from api.cli_tenant import register as _register_http_commands  # noqa: E402

_register_http_commands(app, tenant_app)


if __name__ == "__main__":  # pragma: no cover
    app()
