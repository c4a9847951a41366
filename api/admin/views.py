"""The admin dashboard: server-rendered pages under ``/admin``, the small JSON feed the list
pages' script polls for live progress (``/admin/api/...``) and the task page's Server-Sent
Events feed (``/admin/tasks/{id}/events``, ``api.admin.feed``).

Without the admin token there is no page and no data: pages answer 401 with the login form
in their place, JSON and POST routes 401 ``{"detail"}``. POST forms need the session's CSRF token.
Handlers are thin: who may call them is their ``Annotated`` dependencies (``api.admin.deps``:
``AdminPage``, ``AdminApi``, ``AdminForm``), what they change goes through ``api.services`` (as
the tenant routes do), queries are ``store.overview`` / ``store.repo``, serving-side numbers
``api.admin.panels``, pictures ``api.admin.charts``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import anyio
from fastapi import APIRouter, Form, Header, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import services
from api.admin import auth, charts, feed, panels
from api.admin.deps import AdminApi, AdminEntryPage, AdminForm, AdminPage, AdminState, MaybeAdmin
from api.deps import DbSession, admin_attempt
from api.errors import ApiError
from api.ratelimit import RateLimited
from api.state import ServiceState
from store import evaluations, logcontext, overview, repo
from store.db import session_scope
from store.models import TASK_STATUSES, Evaluation, PromptVersion, Task

log = logging.getLogger("promptstore.admin")

router = APIRouter(prefix="/admin", include_in_schema=False)

PAGE_SIZE = 100
LIVE_POLL_MS = 1000
#: Evaluations the task page shows (the newest).
EVALUATIONS_SHOWN = 20

#: Security headers of every admin response: no framing, no third-party anything, no caching.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STATIC = {"admin.css": "text/css; charset=utf-8", "admin.js": "text/javascript; charset=utf-8"}
_NOTICES = {
    "cancelled": "Cancel requested: a queued run stops at once, a running one at its next step.",
    "retried": "A new run was queued.",
    "deleted": "The task and its prompt objects were deleted.",
    "idle": "Nothing to cancel: the task has no run in progress.",
    "served": "The chosen version is now served: classify requests use it from now on.",
}


def _fmt_time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def _fmt_pct(value: Any) -> str:
    return f"{100 * float(value):.1f} %" if isinstance(value, (int, float)) else "—"


def _fmt_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    v = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"  # pragma: no cover


def _fmt_num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _fmt_dec(value: Any) -> str:
    """A score in [0, 1] with three decimals (precision, recall, F1, ECE, a threshold)."""
    return f"{float(value):.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


env = Environment(
    loader=PackageLoader("api.admin", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters.update(time=_fmt_time, pct=_fmt_pct, bytes=_fmt_bytes, num=_fmt_num, dec=_fmt_dec,
                   backbone=repo.fingerprint_label)


# --------------------------------------------------------------------------- plumbing


def login_required(request: Request, *, basic: bool = False) -> HTMLResponse:
    """401 with the login form (and nothing else); after logging in it returns here. With
    ``basic`` (the dashboard's entry page, /admin) the challenge offers Basic first, so a
    browser shows its own login dialog (user admin, password the token); the form in the body
    is there when the dialog is dismissed. Other pages challenge Bearer only, so a link into
    the dashboard lands on the form."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    resp = _render(
        "login.html", time.perf_counter(), status=401, next=_safe_next(target), error=None,
        disabled=not request.app.state.ps.settings.admin_token,
    )
    realm = 'realm="promptstore admin"'
    resp.headers["WWW-Authenticate"] = f"Basic {realm}, Bearer {realm}" if basic else f"Bearer {realm}"
    return resp


def _render(name: str, started: float, *, status: int = 200, **ctx: Any) -> HTMLResponse:
    html = env.get_template(name).render(live_poll_ms=LIVE_POLL_MS, **ctx)
    headers = {**_HEADERS, "Server-Timing": f"render;dur={1000 * (time.perf_counter() - started):.1f}"}
    return HTMLResponse(html, status_code=status, headers=headers)


def _json(data: Any, started: float) -> JSONResponse:
    headers = {**_HEADERS, "Server-Timing": f"render;dur={1000 * (time.perf_counter() - started):.1f}"}
    return JSONResponse(data, headers=headers)


def _safe_next(target: str | None) -> str:
    """Only a path under /admin (no open redirect to another site)."""
    if target and target.startswith("/admin") and not target.startswith("//") and "\\" not in target:
        return target
    return "/admin"


_row_json = feed.row_json


# --------------------------------------------------------------------------- static and login


@router.get("/static/{name}")
def static(name: str) -> Response:
    media = _STATIC.get(name)
    if media is None:
        raise ApiError(404, f"no static file {name!r}")
    body = resources.files("api.admin").joinpath("static", name).read_bytes()
    return Response(body, media_type=media, headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})


@router.get("/login", response_class=HTMLResponse)
def login_form(admin: MaybeAdmin, state: AdminState, next: str | None = None) -> Response:
    started = time.perf_counter()
    if admin is not None:
        return RedirectResponse(_safe_next(next), status_code=303, headers=_HEADERS)
    disabled = not state.settings.admin_token
    return _render("login.html", started, next=_safe_next(next), error=None, disabled=disabled)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, state: AdminState, token: str = Form(""), next: str = Form("/admin")) -> Response:
    started = time.perf_counter()
    configured = state.settings.admin_token
    try:
        ok = bool(configured) and admin_attempt(state, request, lambda: auth.token_matches(configured, token.strip()))
    except RateLimited as exc:
        resp = _render(
            "login.html", started, status=429, next=_safe_next(next), disabled=False,
            error=f"Too many wrong tokens from this address: try again in {exc.retry_after} s.",
        )
        resp.headers.update(exc.headers)
        return resp
    if not ok:
        return _render(
            "login.html", started, status=401, next=_safe_next(next), disabled=not configured,
            error="That is not the admin token." if configured else "The admin dashboard is disabled: no admin token is configured.",
        )
    resp = RedirectResponse(_safe_next(next), status_code=303, headers=_HEADERS)
    resp.set_cookie(
        auth.COOKIE,
        auth.new_session(configured or ""),
        max_age=auth.SESSION_TTL_S,
        path=auth.COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    log.info("admin logged in")
    return resp


@router.post("/logout")
def logout(_: AdminForm) -> Response:
    resp = RedirectResponse("/admin/login", status_code=303, headers=_HEADERS)
    resp.delete_cookie(auth.COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="strict")
    return resp


# --------------------------------------------------------------------------- overview


def _overview_data(request: Request, state: ServiceState) -> dict[str, Any]:
    app_state = request.app.state
    with session_scope(state.sessionmaker) as s:  # closed before the broker and serving probes
        by_status = repo.task_status_counts(s)
        runs = overview.active_run_count(s)
        tenants = overview.tenant_count(s)
        per_method = overview.tasks_per_method(s)
        tenant_requests = overview.total_tenant_requests(s)
        failed, _ = overview.list_task_rows(s, status="failed", sort="updated", limit=5)
        recent, _ = overview.list_task_rows(s, sort="updated", limit=8)
    probe = getattr(app_state, "admin_probe", None)
    if probe is None and state.dispatcher.kind == "celery":
        probe = panels.BrokerProbe(state.dispatcher)
        app_state.admin_probe = probe
    meter = getattr(app_state, "admin_rate", None)
    if meter is None:
        meter = app_state.admin_rate = panels.RateMeter()
    served = panels.served_requests(state)
    return {
        "tenants": tenants,
        "tasks": {st: int(by_status.get(st, 0)) for st in TASK_STATUSES},
        "tasks_total": sum(by_status.values()),
        "methods": dict(sorted(per_method.items())),
        "jobs": panels.jobs_info(state, runs, probe),
        "backbone": panels.backbone_info(state),
        "cache": panels.cache_info(state.inference),
        "requests": {"served": int(served), "rate": meter.rate(served), "tenant_requests": tenant_requests},
        "failed": failed,
        "recent": recent,
    }


@router.get("", response_class=HTMLResponse)
def overview_page(request: Request, admin: AdminEntryPage, state: AdminState) -> Response:
    started = time.perf_counter()
    return _render("overview.html", started, admin=admin, nav="overview", o=_overview_data(request, state))


@router.get("/api/overview")
def overview_json(request: Request, _: AdminApi, state: AdminState) -> JSONResponse:
    started = time.perf_counter()
    data = _overview_data(request, state)
    data["failed"] = [_row_json(r) for r in data["failed"]]
    data["recent"] = [_row_json(r) for r in data["recent"]]
    return _json(data, started)


# --------------------------------------------------------------------------- tasks


def _check_choice(name: str, value: str | None, allowed: Any) -> str | None:
    if value in (None, ""):
        return None
    if value not in allowed:
        raise ApiError(422, f"{name}={value!r} is not one of: {', '.join(allowed)}")
    return value


@router.get("/tasks", response_class=HTMLResponse)
def tasks_page(
    admin: AdminPage,
    s: DbSession,
    tenant: str | None = None,
    status: str | None = None,
    method: str | None = None,
    sort: str = "created",
    order: str = "desc",
    page: int = Query(1, ge=1, le=100_000),
    done: str | None = None,
) -> Response:
    started = time.perf_counter()
    status = _check_choice("status", status, TASK_STATUSES)
    sort = _check_choice("sort", sort, list(overview.TASK_SORTS)) or "created"
    order = _check_choice("order", order, ("asc", "desc")) or "desc"
    rows, total = overview.list_task_rows(
        s, tenant_id=tenant or None, status=status, method=method or None, sort=sort,
        descending=order == "desc", limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE,
    )
    tenants = overview.tenant_names(s)
    methods = overview.task_methods(s)
    filters = {k: v for k, v in (("tenant", tenant), ("status", status), ("method", method)) if v}

    def link(**changes: Any) -> str:
        q = {**filters, "sort": sort, "order": order, "page": page, **changes}
        return "/admin/tasks?" + urlencode({k: v for k, v in q.items() if v not in (None, "")})

    def sort_link(key: str) -> str:
        flip = "asc" if (sort == key and order == "desc") else "desc"
        return link(sort=key, order=flip, page=1)

    pages = max(1, -(-total // PAGE_SIZE))
    return _render(
        "tasks.html", started, admin=admin, nav="tasks", rows=rows, total=total, page=page, pages=pages,
        tenants=tenants, methods=methods, statuses=TASK_STATUSES, filters=filters, sort=sort, order=order,
        sort_link=sort_link, link=link, notice=_NOTICES.get(done or ""),
    )


@router.get("/api/tasks")
def tasks_json(_: AdminApi, s: DbSession, ids: str = Query("", max_length=100 * 40)) -> JSONResponse:
    """Live state of the listed tasks (comma-separated ids, at most 200)."""
    started = time.perf_counter()
    wanted = [i for i in ids.split(",") if i][:200]
    rows = overview.task_rows_by_id(s, wanted)
    return _json({"items": [_row_json(r) for r in rows], "count": len(rows)}, started)


def _detail(s: Session, task_id: str) -> overview.TaskDetail:
    d = overview.task_detail(s, task_id)
    if d is None:
        raise ApiError(404, f"task {task_id} not found")
    logcontext.set_ids(tenant_id=d.task.tenant_id, task_id=d.task.id)
    return d


@dataclass(frozen=True)
class EvaluationView:
    """One evaluation as the task page shows it: its row, and for a ready one its numbers,
    per-class table, reliability diagram and confusion matrix."""

    id: str
    version: int
    status: str
    params: dict[str, Any]
    error: str | None
    created_at: dt.datetime | None
    finished_at: dt.datetime | None
    result: dict[str, Any]
    top_k: dict[str, Any] | None
    per_class: list[dict[str, Any]]
    reliability: charts.Reliability | None
    cm: charts.Confusion | None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def _evaluation_view(e: Evaluation) -> EvaluationView:
    result = e.result if isinstance(e.result, dict) and e.status == "ready" else {}
    classes = [str(c) for c in result.get("classes") or []] if isinstance(result.get("classes"), list) else []
    top_k = result.get("top_k_accuracy")
    return EvaluationView(
        id=e.id, version=e.version, status=e.status, params=e.params if isinstance(e.params, dict) else {},
        error=e.error, created_at=e.created_at, finished_at=e.finished_at, result=result,
        top_k=top_k if isinstance(top_k, dict) else None,
        per_class=_dicts(result.get("per_class")),
        reliability=charts.reliability(result.get("reliability")),
        cm=charts.confusion(result.get("confusion"), classes),
    )


def _evaluations(s: Session, t: Task) -> tuple[list[EvaluationView], bool]:
    """The task's newest ``EVALUATIONS_SHOWN`` evaluations, newest first, and whether it has more."""
    rows = evaluations.list_evaluations(s, t.id, tenant_id=t.tenant_id, limit=EVALUATIONS_SHOWN + 1)
    return [_evaluation_view(e) for e in rows[:EVALUATIONS_SHOWN]], len(rows) > EVALUATIONS_SHOWN


def _metric_items(metrics: Any) -> list[tuple[str, Any]]:
    """A version's scalar metrics for the key/value table (``per_class`` has a table of its own)."""
    return sorted((k, v) for k, v in (metrics or {}).items() if k != "per_class") if isinstance(metrics, dict) else []


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
def task_page(
    admin: AdminPage, state: AdminState, s: DbSession, task_id: str, done: str | None = None, problem: str | None = None
) -> Response:
    started = time.perf_counter()
    d = _detail(s, task_id)
    t = d.task
    run = t.run
    # A retrain in progress shows its own curve until it publishes; otherwise the served one.
    live_history = run.history if run.is_retrain and run.active else None
    classes = [str(c) for c in (t.classes or [])]
    evals, more_evals = _evaluations(s, t)
    events = feed.recent_events(s, t.id, tenant_id=t.tenant_id)
    return _render(
        "task.html", started, admin=admin, nav="tasks", d=d, t=t, classes=classes,
        run_status=run.status, run_progress=run.progress, run_error=run.error,
        live=run.active,
        curve=charts.training_curve(live_history or t.history),
        curve_is_retrain=bool(live_history),
        cm=charts.confusion(t.confusion, classes),
        metric_items=_metric_items(t.metrics),
        per_class=_dicts((t.metrics or {}).get("per_class") if isinstance(t.metrics, dict) else None),
        serving_fp=panels.serving_fingerprint(state),
        evaluations=evals, more_evaluations=more_evals,
        events=events, events_after=events[-1]["id"] if events else 0, event_kinds=feed.EVENT_KINDS,
        notice=_NOTICES.get(done or ""), problem=problem,
    )


def _tenant_of(state: ServiceState, task_id: str) -> str | None:
    with session_scope(state.sessionmaker) as s:
        return s.scalar(select(Task.tenant_id).where(Task.id == task_id))


@router.get("/tasks/{task_id}/events")
async def task_events(
    request: Request,
    _: AdminApi,
    state: AdminState,
    task_id: str,
    after: int = Query(0, ge=0, le=2**62, description="the last event the page has; Last-Event-ID wins"),
    last_event_id: str | None = Header(None),
) -> Response:
    """The task's events as Server-Sent Events, with its live state (``api.admin.feed``)."""
    tenant_id = await anyio.to_thread.run_sync(_tenant_of, state, task_id)
    if tenant_id is None:
        raise ApiError(404, f"task {task_id} not found")
    logcontext.set_ids(tenant_id=tenant_id, task_id=task_id)
    body = feed.stream(request, state.sessionmaker, task_id, tenant_id, feed.cursor(last_event_id, after))
    return StreamingResponse(body, media_type="text/event-stream", headers={**_HEADERS, "X-Accel-Buffering": "no"})


def _version_of(d: overview.TaskDetail, version: int) -> PromptVersion:
    pv = next((v for v in d.versions if v.version == version), None)
    if pv is None:
        raise ApiError(404, repo.no_such_version(d.task.id, version, [v.version for v in d.versions]))
    return pv


@router.get("/tasks/{task_id}/versions/{version}/serve", response_class=HTMLResponse)
def confirm_serve_page(
    admin: AdminPage, state: AdminState, s: DbSession, task_id: str, version: int = Path(ge=1, le=2**31)
) -> Response:
    started = time.perf_counter()
    d = _detail(s, task_id)
    v = _version_of(d, version)
    served = next((pv for pv in d.versions if pv.version == d.task.version), None)
    fp = panels.serving_fingerprint(state)
    return _render(
        "confirm_serve.html", started, admin=admin, nav="tasks", d=d, t=d.task, v=v, served=served,
        serving_fp=fp, incompatible=fp is not None and v.fingerprint != fp,
        classes_differ=served is not None and v.classes is not None and list(v.classes) != list(served.classes or []),
    )


@router.post("/tasks/{task_id}/versions/{version}/serve")
def serve_version(
    _: AdminForm, state: AdminState, s: DbSession, task_id: str, version: int = Path(ge=1, le=2**31)
) -> Response:
    tenant_id = _task_tenant(s, task_id)
    try:
        services.serve_version(state, s, task_id, version, tenant_id=tenant_id)
    except ApiError as exc:
        # 409: made on another backbone, or the served version changed meanwhile; 503: the
        # backbone is still loading. Shown on the task page; 404 and the rest answer as errors.
        if exc.status_code not in (409, 503):
            raise
        log.info("admin serve of version %s of task %s refused: %s", version, task_id, exc.detail)
        return _back(task_id, problem=exc.detail)
    log.info("admin served version %s of task %s", version, task_id)
    return _back(task_id, done="served")


@router.get("/tasks/{task_id}/delete", response_class=HTMLResponse)
def confirm_delete_page(admin: AdminPage, s: DbSession, task_id: str) -> Response:
    started = time.perf_counter()
    d = _detail(s, task_id)
    return _render("confirm_delete.html", started, admin=admin, nav="tasks", d=d, t=d.task)


def _task_tenant(s: Session, task_id: str) -> str:
    return _detail(s, task_id).task.tenant_id


def _back(task_id: str, **q: str) -> RedirectResponse:
    return RedirectResponse(f"/admin/tasks/{quote(task_id)}?{urlencode(q)}", status_code=303, headers=_HEADERS)


@router.post("/tasks/{task_id}/cancel")
def cancel_task(_: AdminForm, s: DbSession, task_id: str) -> Response:
    try:
        services.cancel_run(s, task_id, tenant_id=_task_tenant(s, task_id))
    except ApiError as exc:
        if exc.status_code != 409:
            raise
        log.info("admin cancel of task %s: %s", task_id, exc.detail)
        return _back(task_id, done="idle")
    log.info("admin cancelled task %s", task_id)
    return _back(task_id, done="cancelled")


@router.post("/tasks/{task_id}/retry")
def retry_task(_: AdminForm, state: AdminState, s: DbSession, task_id: str) -> Response:
    try:
        services.retry(state, s, task_id, tenant_id=_task_tenant(s, task_id))
    except ApiError as exc:
        if exc.status_code not in (409, 503):  # a run in progress; the broker down (the run stays queued)
            raise
        return _back(task_id, problem=exc.detail)
    log.info("admin queued a new run of task %s", task_id)
    return _back(task_id, done="retried")


@router.post("/tasks/{task_id}/delete")
def delete_task(_: AdminForm, state: AdminState, s: DbSession, task_id: str, confirm: str = Form("")) -> Response:
    tenant_id = _task_tenant(s, task_id)
    if confirm != task_id:
        raise ApiError(422, "confirm must repeat the task id: delete from the confirmation page")
    services.delete_task_and_objects(state, s, task_id, tenant_id=tenant_id)
    log.info("admin deleted task %s", task_id)
    return RedirectResponse("/admin/tasks?" + urlencode({"done": "deleted"}), status_code=303, headers=_HEADERS)


# --------------------------------------------------------------------------- tenants


def _tenants_page(state: ServiceState, admin: auth.Admin, started: float, **extra: Any) -> HTMLResponse:
    with session_scope(state.sessionmaker) as s:
        tenants = repo.list_tenants(s)
    return _render("tenants.html", started, admin=admin, nav="tenants", tenants=tenants, **extra)


@router.get("/tenants", response_class=HTMLResponse)
def tenants_page(admin: AdminPage, state: AdminState) -> Response:
    started = time.perf_counter()
    return _tenants_page(state, admin, started, created=None, problem=None)


@router.post("/tenants", response_class=HTMLResponse)
def create_tenant(admin: AdminForm, state: AdminState, name: str = Form("")) -> Response:
    """Creates the tenant and shows its API key on this one response (never again)."""
    started = time.perf_counter()
    name = name.strip()
    if not name or len(name) > 200:
        return _tenants_page(state, admin, started, created=None, problem="A tenant name is 1 to 200 characters.")
    try:
        with session_scope(state.sessionmaker) as s:
            tenant, key = repo.create_tenant(s, name)
            created = {"id": tenant.id, "name": tenant.name, "api_key": key}
    except repo.StoreError as exc:
        return _tenants_page(state, admin, started, created=None, problem=str(exc))
    logcontext.set_ids(tenant_id=created["id"])
    log.info("admin created tenant %s", created["id"])
    return _tenants_page(state, admin, started, created=created, problem=None)

