"""The admin dashboard's dependencies, ``Annotated`` like ``api.deps``'s.

``AdminPage`` (and ``AdminEntryPage`` for ``/admin`` itself): the admin, else the page is
answered 401 with the login form in its place (``LoginRequired``, handled by
``install_admin_errors``). ``AdminApi``: the admin, else 401 ``{"detail"}``. ``AdminForm``:
``AdminApi`` plus the session's CSRF token from the form's ``csrf`` field, else 403.
``MaybeAdmin``: the admin or None (the login page). A guess of the token by Bearer or Basic
credentials counts against the failed-attempt limit (429, ``api.deps.admin_attempt``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import Response

from api.admin import auth
from api.deps import admin_attempt, get_state
from api.errors import ApiError
from api.state import ServiceState

__all__ = [
    "AdminApi", "AdminEntryPage", "AdminForm", "AdminPage", "AdminState", "LoginRequired", "MaybeAdmin",
    "install_admin_errors",
]

AdminState = Annotated[ServiceState, Depends(get_state)]


class LoginRequired(Exception):
    """A page asked for without the admin: answered 401 with the login form (``basic``: the
    challenge offers Basic first, for the dashboard's entry page)."""

    def __init__(self, *, basic: bool = False) -> None:
        super().__init__("admin login required")
        self.basic = basic


def maybe_admin(request: Request, state: AdminState) -> auth.Admin | None:
    token = state.settings.admin_token
    if not request.headers.get("authorization") or not token:
        return auth.authenticate(request, token)  # a session cookie, or nothing presented
    # Bearer or Basic credentials: a guess of the token, under the failed-attempt limit (429)
    return admin_attempt(state, request, lambda: auth.authenticate(request, token))


MaybeAdmin = Annotated[auth.Admin | None, Depends(maybe_admin)]


def page_admin(admin: MaybeAdmin) -> auth.Admin:
    if admin is None:
        raise LoginRequired()
    return admin


def entry_page_admin(admin: MaybeAdmin) -> auth.Admin:
    if admin is None:
        raise LoginRequired(basic=True)
    return admin


def api_admin(admin: MaybeAdmin) -> auth.Admin:
    if admin is None:
        raise ApiError(
            401,
            "admin token required: log in at /admin/login, or send 'Authorization: Bearer <admin_token>'",
            {"WWW-Authenticate": "Bearer"},
        )
    return admin


def form_admin(admin: Annotated[auth.Admin, Depends(api_admin)], csrf: str = Form("")) -> auth.Admin:
    if not admin.csrf_ok(csrf):
        raise ApiError(403, "missing or invalid CSRF token: reload the page and submit the form again")
    return admin


AdminPage = Annotated[auth.Admin, Depends(page_admin)]
AdminEntryPage = Annotated[auth.Admin, Depends(entry_page_admin)]
AdminApi = Annotated[auth.Admin, Depends(api_admin)]
AdminForm = Annotated[auth.Admin, Depends(form_admin)]


def install_admin_errors(app: FastAPI) -> None:
    """Answer ``LoginRequired`` with the login form (``api.admin.views.login_required``)."""
    from api.admin.views import login_required

    async def _login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return login_required(request, basic=exc.basic)

    app.add_exception_handler(LoginRequired, _login_required)
