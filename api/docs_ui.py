"""The interactive API docs (`/docs`) and the landing page (`/`), served offline.

FastAPI's default docs page loads Swagger UI from a CDN, so it is blank on a machine without
internet. Here the page is FastAPI's own (``get_swagger_ui_html``, as in its "self-hosting
JavaScript and CSS for docs" recipe) and the assets come from the installed ``fastapi-offline``
package, served under ``/docs-assets``. ReDoc is not offered: its page fetches its logo from a
CDN whatever the options, and Swagger UI already shows every operation and schema.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"

_LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Promptstore</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem}}
code{{background:#f3f3f3;padding:0 .2em}}</style></head>
<body><h1>Promptstore {version}</h1>
<p>A multi-tenant store of learned visual prompts served on one frozen backbone.</p>
<ul>
<li><a href="/docs">/docs</a>: the HTTP API, interactive</li>
<li><a href="/openapi.json">/openapi.json</a>: the OpenAPI document</li>
<li><a href="/admin">/admin</a>: the admin dashboard (admin token)</li>
<li><a href="/readyz">/readyz</a>: is the service ready (database, object store, backbone)</li>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
</ul>
<p>Tenant calls carry <code>Authorization: Bearer &lt;api_key&gt;</code>.</p>
</body></html>"""


def install_docs(app: FastAPI) -> None:
    """Add ``/``, ``/docs`` and ``/docs/oauth2-redirect`` with local assets. The app must be
    built with ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    title = f"{app.title} API"

    @app.get("/", include_in_schema=False)
    def landing() -> HTMLResponse:
        return HTMLResponse(_LANDING.format(version=app.version))

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
