"""A route class whose JSON request bodies are checked (size, depth, UTF-8, lone surrogates;
``store.textinput.loads_checked``) before the framework parses them, so that a body nested
100,000 deep or holding ``"\\ud800"`` is a 422 naming the body, never a RecursionError."""

from __future__ import annotations

import email.message
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from store import textinput

#: Largest JSON body of a route of this class (the admin tenant body is a few bytes).
MAX_JSON_BODY_BYTES = 64 * 1024


def _is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type")
    if not ctype:
        return True  # the framework reads an untyped body as JSON
    message = email.message.Message()
    message["content-type"] = ctype
    sub = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (sub == "json" or sub.endswith("+json"))


def _raise_input_error(request: Request) -> None:
    """The body check's refusal, raised as the route's last dependency: after authentication,
    so a caller without credentials gets 401 whatever body it sends."""
    exc = getattr(request.state, "input_error", None)
    if exc is not None:
        raise exc


class CheckedJSONRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        kwargs["dependencies"] = [*(kwargs.get("dependencies") or []), Depends(_raise_input_error)]
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH") and _is_json(request):
                body = await request.body()  # cached: the framework reads the same bytes
                if body:
                    try:
                        textinput.loads_checked("request body", body, max_bytes=MAX_JSON_BODY_BYTES)
                    except ValueError as exc:
                        if isinstance(exc, textinput.InputError):
                            # the framework must not parse it (a deep body is a RecursionError);
                            # it sees an empty object, and the refusal comes after the auth
                            request.state.input_error = exc
                            request._body = b"{}"
                        # else invalid JSON: the framework words that one (422)
            return await handler(request)

        return checked
