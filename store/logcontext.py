"""Ids that tag every log line of a request or a job: request, tenant and task.

It lives in ``store`` because every layer imports ``store`` (and nothing above it), so
the API middleware, its dependencies and the worker's jobs can all set the ids, and the
JSON log formatter of ``promptstore`` (``api.cli``) reads them.

A request gets a fresh mutable ``dict`` in a ``ContextVar`` (``bind_request``). FastAPI
runs sync dependencies and handlers in worker threads on *copies* of the context, so
setting a ContextVar inside a dependency would not reach the handler; updating the one
dict that every copy points to does.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

FIELDS = ("request_id", "tenant_id", "task_id")

_ctx: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("promptstore_log_ctx", default=None)

#: What a client-sent X-Request-ID may look like to be reused (else a new id is made).
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def new_request_id(given: str | None = None) -> str:
    """``given`` when it is a short token of safe characters, else a new uuid4 hex."""
    if given and _REQUEST_ID_RE.match(given):
        return given
    return uuid.uuid4().hex


def current() -> dict[str, str]:
    """A copy of the ids bound now (empty outside a request or job)."""
    ctx = _ctx.get()
    return dict(ctx) if ctx else {}


def set_ids(**ids: str | None) -> None:
    """Add ids (``tenant_id=...``, ``task_id=...``) to the current request or job; ignored
    outside one. None values are skipped."""
    ctx = _ctx.get()
    if ctx is None:
        return
    for key, value in ids.items():
        if key in FIELDS and value:
            ctx[key] = str(value)


@contextmanager
def bind(**ids: str | None) -> Iterator[dict[str, str]]:
    """Bind a fresh set of ids for the block (a request, a job), restoring the outer ones."""
    ctx = {k: str(v) for k, v in ids.items() if k in FIELDS and v}
    token = _ctx.set(ctx)
    try:
        yield ctx
    finally:
        _ctx.reset(token)
