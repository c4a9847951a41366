"""The OpenAPI document describes the errors the service actually answers.

Every error body is ``{"detail": str}`` (``ErrorOut``, api/errors.py), so FastAPI's default
422 ``HTTPValidationError`` is replaced by ``ErrorOut`` and each operation declares the
statuses its layers can answer (docs/api.md "Errors"):

- 401 and 429 on every authenticated operation (a wrong admin token is rate limited per address);
- 413 on every operation with a body (api.middleware.BodyLimitMiddleware) and 422 on every
  operation with a parameter or a body;
- 503 on every ``/v1`` operation (the database or object store unavailable, with Retry-After).

The routes declare what is theirs (404, 409, 415, ...); this fills in the rest.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

_ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}
_DEFAULT_TEXT = {
    401: "Missing or invalid API key / admin token.",
    413: "A body, list or text over its limit (the detail names the limit).",
    422: "A bad input (the detail names the field and what is accepted).",
    429: "Over a rate limit (see Retry-After).",
    503: "A dependency is unavailable for now (see Retry-After).",
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": dict(_ERROR_REF)}}}


def fix_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with every error response described as ``ErrorOut`` (in place; returned)."""
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses: dict[str, Any] = op["responses"]
            wanted: set[int] = set()
            if path.startswith("/v1/"):
                wanted |= {401, 429, 503}
            if op.get("parameters") or op.get("requestBody"):
                wanted.add(422)
            if op.get("requestBody"):
                wanted.add(413)
            for code in wanted:
                responses.setdefault(str(code), _error(_DEFAULT_TEXT[code]))
            for code, resp in responses.items():
                if code.startswith(("4", "5")):  # every error is {"detail": str}
                    resp["content"] = {"application/json": {"schema": dict(_ERROR_REF)}}
                    if resp.get("description") in (None, "", "Validation Error"):
                        resp["description"] = _DEFAULT_TEXT.get(int(code), "Error.")
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.setdefault("ErrorOut", {
        "title": "ErrorOut", "type": "object", "required": ["detail"],
        "properties": {"detail": {"title": "Detail", "type": "string"}},
    })
    return spec


def install_openapi(app: FastAPI) -> None:
    """``app.openapi()`` returns the document with the error contract applied (cached)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = fix_errors(original())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
