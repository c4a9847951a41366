"""Error handling: every error leaves the service as JSON ``{"detail": str}``.

Client mistakes get a 4xx whose detail says what was wrong and what is
accepted; anything unexpected is logged with its traceback and answered with a
bare 500 that carries no stack trace, server path or other tenant's data.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sqlalchemy.exc import OperationalError

from api.ratelimit import RateLimited
from store.archive import DatasetError
from store.images import ImageError
from store.objects import ObjectNotFound, ObjectStoreError
from store.timeouts import RETRY_AFTER_S, DependencyTimeout
from store.textinput import InputError

log = logging.getLogger("promptstore.api")


class ApiError(Exception):
    """An error with an HTTP status and a client-facing message."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def input_status(exc: DatasetError | ImageError | InputError) -> int:
    """The HTTP status of a refused input from the store: 413 over a size limit, else 422."""
    return 413 if exc.over_limit else 422


class BodyTooLarge(StarletteHTTPException):
    """Raised by the body-size guard while a request body is streamed in. An HTTPException, so
    that the framework's own body parsing (forms, JSON) passes it on as the 413 it is."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes")
        self.limit = limit


#: Messages of the multipart parser's own limits (starlette.formparsers): answered 413, not 400.
_FORM_LIMIT_MESSAGES = ("Part exceeded maximum size", "Field exceeded maximum size", "Too many fields", "Too many files")


def _framework_error(status_code: int, detail: str) -> tuple[int, str]:
    """The framework answers a body it cannot parse with 400; the contract (docs/api.md) says
    413 for a limit and 422 for a bad input."""
    if status_code != 400:
        return status_code, detail
    if detail.startswith(_FORM_LIMIT_MESSAGES):
        return 413, f"multipart form: {detail} (text fields such as name, classes and config are at most 1 MiB)"
    return 422, f"request body cannot be parsed: {detail}"


def error_response(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie", "form"):
        where, rest = parts[0], parts[1:]
        return ".".join(rest) if rest else where
    return ".".join(parts)


def flatten_validation_errors(errors: list[dict[str, Any]]) -> str:
    """``[{"loc": ("query", "top_k"), "msg": "..."}]`` -> ``"top_k: ..."``, joined by "; "."""
    out = []
    for err in errors:
        msg = str(err.get("msg", "invalid value"))
        where = _loc(err.get("loc", ()))
        if err.get("type") == "json_invalid":  # loc is ("body", <offset>): say what it is
            ctx = err.get("ctx") or {}
            why = ctx.get("error") if isinstance(ctx, dict) else None
            out.append(f"request body is not valid JSON ({why or msg}, at character {_offset(err)}); send a JSON object")
            continue
        if err.get("type") == "model_attributes_type" and tuple(err.get("loc", ()))[:1] == ("body",):
            out.append("request body must be a JSON object (Content-Type: application/json)")
            continue
        out.append(f"{where}: {msg}" if where else msg)
    return "; ".join(out) or "invalid request"


def _offset(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    return str(loc[1]) if len(loc) > 1 else "?"


def _status_text(code: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "error"


def install_timeout_handlers(app: FastAPI) -> None:
    """A dependency past its timeouts (store.timeouts): 503 naming the part, with Retry-After."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    @app.exception_handler(DependencyTimeout)
    async def _dependency_timeout(request: Request, exc: DependencyTimeout) -> JSONResponse:
        log.error("%s timed out on %s %s: %s", exc.part, request.method, request.url.path, exc.detail)
        return error_response(503, exc.detail, exc.headers)

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, exc: PoolTimeout) -> JSONResponse:
        log.error("no database connection free on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503, "database: no connection became free in time; retry", {"Retry-After": str(RETRY_AFTER_S)}
        )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else _status_text(exc.status_code)
        status, detail = _framework_error(exc.status_code, detail)
        return error_response(status, detail, getattr(exc, "headers", None))

    @app.exception_handler(RateLimited)
    async def _rate_limited(_: Request, exc: RateLimited) -> JSONResponse:
        return error_response(429, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, flatten_validation_errors(list(exc.errors())))

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return error_response(input_status(exc), exc.message)

    @app.exception_handler(DatasetError)
    async def _dataset_error(_: Request, exc: DatasetError) -> JSONResponse:
        return error_response(input_status(exc), f"invalid dataset: {exc}")

    @app.exception_handler(ImageError)
    async def _image_error(_: Request, exc: ImageError) -> JSONResponse:
        return error_response(input_status(exc), str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, f"request body is over the limit of {exc.limit} bytes")

    @app.exception_handler(ObjectNotFound)
    async def _object_missing(request: Request, exc: ObjectNotFound) -> JSONResponse:
        log.error("object missing on %s %s: %s", request.method, request.url.path, exc)
        return error_response(500, "a stored object the request needs is missing; the operator has been told")

    @app.exception_handler(ObjectStoreError)
    async def _object_store_down(request: Request, exc: ObjectStoreError) -> JSONResponse:
        log.error("object store error on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "the object store is unavailable; try again shortly", {"Retry-After": "5"})

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error on %s %s: %s", request.method, request.url.path, exc)
        if isinstance(exc.orig, DependencyTimeout):  # store.db: the server did not answer in time
            return error_response(503, exc.orig.detail, exc.orig.headers)
        return error_response(503, "the database is unavailable; try again shortly", {"Retry-After": "5"})

    install_timeout_handlers(app)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
