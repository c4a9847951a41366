"""Who may see the admin pages: the holder of the admin token (docs/settings.md), in one of three ways.

- ``Authorization: Bearer <admin_token>`` (scripts; needs no CSRF token: browsers never
  add that header on their own);
- ``Authorization: Basic`` with user ``admin`` and the token as password;
- the session cookie set by the login form: ``<issued>.<nonce>.<hmac>``, signed with a key
  derived from the token (changing the token ends every session), HttpOnly,
  SameSite=Strict, Secure over https, valid for ``SESSION_TTL_S``.

Every POST form of a cookie or Basic session carries a CSRF token (an HMAC of the
session's nonce under the same key) on top of the SameSite cookie.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

COOKIE = "ps_admin"
COOKIE_PATH = "/admin"
SESSION_TTL_S = 12 * 3600
BASIC_USER = "admin"


def _key(token: str) -> bytes:
    return hmac.new(token.encode(), b"promptstore-admin-session-v1", hashlib.sha256).digest()


def _sign(token: str, payload: str) -> str:
    return hmac.new(_key(token), payload.encode(), hashlib.sha256).hexdigest()


def token_matches(token: str | None, given: str | None) -> bool:
    """Constant-time comparison; False when no admin token is configured."""
    if not token or not given:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def new_session(token: str, now: float | None = None) -> str:
    """A cookie value for a fresh session."""
    payload = f"{int(now if now is not None else time.time())}.{secrets.token_urlsafe(16)}"
    return f"{payload}.{_sign(token, payload)}"


def session_nonce(token: str | None, value: str | None, now: float | None = None) -> str | None:
    """The session's nonce when ``value`` is a valid, unexpired cookie for ``token``, else None."""
    if not token or not value or value.count(".") != 2:
        return None
    issued, nonce, sig = value.split(".")
    if not hmac.compare_digest(sig.encode(), _sign(token, f"{issued}.{nonce}").encode()):
        return None
    try:
        age = (now if now is not None else time.time()) - int(issued)
    except ValueError:
        return None
    return nonce if 0 <= age <= SESSION_TTL_S else None


def csrf_token(token: str, nonce: str) -> str:
    return _sign(token, "csrf:" + nonce)


@dataclass(frozen=True)
class Admin:
    """An authenticated admin request. ``csrf`` is what POST forms must send back (None:
    not needed, the Bearer header cannot be forged cross-site)."""

    via: str  # "bearer" | "basic" | "session"
    csrf: str | None

    def csrf_ok(self, given: str | None) -> bool:
        if self.csrf is None:
            return True
        return bool(given) and hmac.compare_digest(str(given).encode(), self.csrf.encode())


def authenticate(request: Request, token: str | None) -> Admin | None:
    """The admin behind ``request``, or None (no token configured, or none presented)."""
    if not token:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, cred = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and token_matches(token, cred.strip()):
        return Admin(via="bearer", csrf=None)
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if user == BASIC_USER and token_matches(token, password):
            return Admin(via="basic", csrf=csrf_token(token, "basic"))
        return None
    nonce = session_nonce(token, request.cookies.get(COOKIE))
    if nonce is not None:
        return Admin(via="session", csrf=csrf_token(token, nonce))
    return None
