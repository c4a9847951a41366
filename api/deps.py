"""FastAPI dependencies: settings, service state, database session, current tenant, admin."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.state import ServiceState
from store import logcontext, repo
from store.db import session_scope
from store.settings import Settings

__all__ = [
    "CurrentTenant", "DbSession", "authenticate", "bearer", "current_tenant", "get_session", "get_settings",
    "get_state", "require_admin",
]

bearer = HTTPBearer(auto_error=False, description="Tenant API key or admin token.")
_AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


def get_state(request: Request) -> ServiceState:
    return request.app.state.ps


def get_settings(state: ServiceState = Depends(get_state)) -> Settings:
    """The settings the app was built with. Not a ``dependency_overrides`` entry: while any
    override exists FastAPI re-analyses every dependency's signature on every request."""
    return state.settings


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


def require_admin(
    creds: HTTPAuthorizationCredentials | None = Depends(bearer),
    settings: Settings = Depends(get_settings),
) -> None:
    """The admin token, else 401."""
    if creds is None or not creds.credentials:
        raise ApiError(401, "missing admin token: send the header 'Authorization: Bearer <admin_token>'", _AUTH_HEADERS)
    token = settings.admin_token
    if not token:
        raise ApiError(401, "admin API disabled: no admin token is configured (PROMPTSTORE_ADMIN_TOKEN)", _AUTH_HEADERS)
    if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise ApiError(401, "invalid admin token", _AUTH_HEADERS)
