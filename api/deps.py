"""FastAPI dependencies: service state (settings: ``state.settings``), session, tenant, admin."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.ratelimit import Limit, client_address
from api.state import ServiceState
from store import logcontext, repo
from store.db import session_scope

__all__ = [
    "CurrentTenant", "DbSession", "admin_attempt", "authenticate", "bearer", "current_tenant", "get_session",
    "get_state", "job_submitter", "require_admin", "take_classify",
]

log = logging.getLogger("promptstore.api")
T = TypeVar("T")

bearer = HTTPBearer(auto_error=False, description="Tenant API key or admin token.")
_AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


def get_state(request: Request) -> ServiceState:
    return request.app.state.ps


def get_session(state: ServiceState = Depends(get_state)) -> Iterator[Session]:
    """One session (and transaction) per request; committed when the handler returns
    normally. Use it through ``DbSession``. Handlers that enqueue work commit explicitly
    first, so that a worker finds the row."""
    with session_scope(state.sessionmaker) as s:
        yield s


#: The request's session, committed before the response is sent: the default scope of a
#: yield dependency closes it afterwards, and a client could act on a 201 (use a new key on
#: another replica, say) before its row is visible.
DbSession = Annotated[Session, Depends(get_session, scope="function")]


@dataclass(frozen=True)
class CurrentTenant:
    id: str
    name: str


def current_tenant(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(bearer),
    state: ServiceState = Depends(get_state),
) -> CurrentTenant:
    """The tenant owning the Bearer API key, else 401. Uses a short session of its own so
    that no connection is held while a request waits on inference."""
    with session_scope(state.sessionmaker) as s:
        return authenticate(s, request, creds)


def authenticate(s: Session, request: Request, creds: HTTPAuthorizationCredentials | None) -> CurrentTenant:
    """``current_tenant`` inside a caller's session (classify looks its task up in the same one)."""
    if creds is None or not creds.credentials:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <api_key>'", _AUTH_HEADERS)
    tenant = repo.tenant_by_api_key(s, creds.credentials)
    if tenant is None:
        raise ApiError(401, "invalid API key: it is unknown or has been revoked", _AUTH_HEADERS)
    logcontext.set_ids(tenant_id=tenant.id, task_id=request.path_params.get("task_id"))
    return CurrentTenant(id=tenant.id, name=tenant.name)


def job_submitter(
    tenant: CurrentTenant = Depends(current_tenant), state: ServiceState = Depends(get_state)
) -> CurrentTenant:
    """``current_tenant`` for a call that queues a tuning job: counted against the tenant's job
    rate (``jobs_per_minute``, ``jobs_burst``), else 429 with Retry-After."""
    cfg = state.settings
    state.limiter.take(
        "jobs", tenant.id, Limit.per_minute(cfg.jobs_per_minute, cfg.jobs_burst),
        f"tenant {tenant.name!r} is over its rate of tuning jobs ({cfg.jobs_per_minute:g} per minute, "
        f"{cfg.jobs_burst} at once)",
    )
    return tenant


def take_classify(state: ServiceState, tenant: CurrentTenant) -> None:
    """Count one classify request of ``tenant`` (``classify_rate``, ``classify_burst``), else 429."""
    cfg = state.settings
    state.limiter.take(
        "classify", tenant.id, Limit(cfg.classify_rate, cfg.classify_burst),
        f"tenant {tenant.name!r} is over its classify rate ({cfg.classify_rate:g} requests/s, "
        f"{cfg.classify_burst} at once)",
    )


def admin_attempt(state: ServiceState, request: Request, verify: Callable[[], T | None]) -> T | None:
    """Run ``verify``, a check of admin credentials the caller presented, under the limit of
    failed attempts per client address: once an address has used up its failures
    (``admin_auth_failures_per_minute``, ``admin_auth_failure_burst``) it gets 429, without
    its credentials being checked, until the bucket refills. A failure is logged and counted."""
    cfg = state.settings
    limit = Limit.per_minute(cfg.admin_auth_failures_per_minute, cfg.admin_auth_failure_burst)
    address = client_address(request)
    state.limiter.take(
        "admin-auth", address, limit, "too many failed admin authentications from this address", count=False
    )
    result = verify()
    if not result:
        state.limiter.wait("admin-auth", address, limit)  # count the failure
        log.warning("admin authentication refused for %s", address)
    return result


def require_admin(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(bearer),
    state: ServiceState = Depends(get_state),
) -> None:
    """The admin token, else 401 (429 after too many wrong ones from the caller's address)."""
    if creds is None or not creds.credentials:
        raise ApiError(401, "missing admin token: send the header 'Authorization: Bearer <admin_token>'", _AUTH_HEADERS)
    token = state.settings.admin_token
    if not token:
        raise ApiError(401, "admin API disabled: no admin token is configured (PROMPTSTORE_ADMIN_TOKEN)", _AUTH_HEADERS)
    if not admin_attempt(state, request, lambda: hmac.compare_digest(creds.credentials.encode(), token.encode())):
        raise ApiError(401, "invalid admin token", _AUTH_HEADERS)


def form_fields(
    route: str, *allowed: str, required: bool = True, repeated: tuple[str, ...] = ()
) -> Callable[[Request], object]:
    """A dependency that refuses what a multipart route would otherwise drop without a word:
    a body that is not a form (415, naming the fields), a field the route does not take (422,
    e.g. ``method`` on a retrain, which cannot change it), a field sent twice that is not one of
    ``repeated`` (422: one of the values would be ignored), and a text value where a file is
    expected (``dataset``). ``required=False``: an empty body is fine (every field optional)."""
    names = ", ".join(allowed)
    example = " ".join(f"-F {n}=@data.zip" if n == "dataset" else f"-F {n}=..." for n in allowed[:3])

    async def check(request: Request) -> None:
        from starlette.datastructures import UploadFile

        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not ctype and not required:
            return
        if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise ApiError(
                415, f"{route} takes multipart/form-data (fields: {names}), not {ctype or 'an empty body'}; "
                f"e.g. curl {example}",
            )
        form = await request.form()  # parsed once: the route's Form/File parameters read the same
        unknown = sorted({k for k in form.keys() if k not in allowed})
        if unknown:
            raise ApiError(422, f"{route} does not take the field(s) {', '.join(map(repr, unknown))}; it takes: {names}")
        twice = sorted({k for k in form.keys() if k not in repeated and len(form.getlist(k)) > 1})
        if twice:
            raise ApiError(422, f"{route}: the field(s) {', '.join(map(repr, twice))} were sent more than once; send each once")
        value = form.get("dataset")
        if value is not None and not isinstance(value, UploadFile):
            raise ApiError(422, "dataset must be a file part (a zip of class folders), e.g. -F dataset=@data.zip")

    return check
