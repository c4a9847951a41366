"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api.docs_ui import install_docs
from api.errors import install_error_handlers
from api.engine import Engine, Inference
from api.middleware import FORM_OVERHEAD_BYTES, BodyLimitMiddleware, HttpMetrics, MetricsMiddleware
from api.ratelimit import RateLimiter
from api.state import RequestCounter, ServiceState
from backbone.errors import public_text
from backbone.holder import BackboneHolder
from store.consistency import PeriodicCollector
from store.db import get_sessionmaker
from store.objects import get_object_store
from store.settings import Settings, get_settings
from worker.dispatch import Dispatcher, make_dispatcher

log = logging.getLogger("promptstore.api")

DESCRIPTION = """A multi-tenant store of learned visual prompts served on one frozen CLIP/ViT backbone.

Tenants upload a labelled few-shot dataset (a zip of class folders), a job tunes a small
prompt for it, and classify serves it. Tenant calls carry `Authorization: Bearer <api_key>`,
admin calls `Authorization: Bearer <admin_token>`. Every error is `{"detail": str}`."""


def create_app(
    settings: Settings | None = None,
    *,
    dispatcher: Dispatcher | None = None,
    inference: Inference | None = None,
) -> FastAPI:
    """Build the app for ``settings`` (default: from the environment).

    With no broker configured, tuning jobs run in a thread pool of this process. The
    backbone starts loading in the background when the app starts; ``/readyz`` says when
    it is usable. Migrations are not applied here (``promptstore migrate``, or ``serve``
    on the embedded database). ``inference`` replaces the engine built from the settings
    (anything with the routes' interface, ``api.engine.Inference``).
    """
    settings = settings or get_settings()
    registry = CollectorRegistry()
    http_metrics = HttpMetrics(registry)
    backbone = BackboneHolder(settings.backbone, settings.device, on_loaded=lambda bb: log.info(
        "ready to serve: backbone %s loaded on %s", public_text(bb.spec), bb.device
    ))
    objects = get_object_store(settings)
    sm = get_sessionmaker(
        settings.database_url, connect_timeout=settings.db_connect_timeout, timeout=settings.db_timeout
    )
    state = ServiceState(
        settings=settings,
        sessionmaker=sm,
        objects=objects,
        backbone=backbone,
        inference=inference if inference is not None else Engine(
            backbone,
            objects,
            cache_bytes=settings.prompt_cache_bytes,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            redis_url=settings.redis_url,
            registry=registry,
        ),
        dispatcher=dispatcher or make_dispatcher(settings),
        registry=registry,
        http_metrics=http_metrics,
        limiter=RateLimiter(settings.redis_url, registry, timeout=settings.redis_timeout),
        requests=RequestCounter(sm),
    )

    gc = PeriodicCollector(
        sm, objects, interval=settings.gc_interval, grace_s=settings.gc_grace,
        prediction_record_s=settings.prediction_record_s,
    )

    # jobs this process runs tell the engine at once (others announce through Redis)
    state.dispatcher.on_published = state.inference.published

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info(
            "starting (jobs: %s); /readyz answers 503 until backbone %s is loaded",
            state.dispatcher.kind, public_text(settings.backbone),
        )
        state.backbone.start()  # logs "ready to serve" once loaded
        state.inference.start()
        state.requests.start()
        state.dispatcher.start()
        gc.start()  # deletes objects no row refers to, past the grace (store.consistency)
        try:
            yield
        finally:
            gc.close()
            state.dispatcher.shutdown()
            state.inference.close()
            state.requests.close()

    app = FastAPI(
        title="Promptstore",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by install_docs with local assets (no CDN)
        redoc_url=None,
    )
    app.state.ps = state
    app.state.gc = gc
    install_error_handlers(app)
    install_docs(app)
    from api.openapi import install_openapi

    install_openapi(app)  # error responses described as {"detail": str} (api/openapi.py)

    from api.routes import classify, evaluations, events, fsck, ops, samples, tasks, tenants, versions

    app.include_router(ops.router)
    app.include_router(fsck.router)
    app.include_router(tenants.router)
    app.include_router(tasks.router)
    app.include_router(classify.router)
    app.include_router(versions.router)
    app.include_router(evaluations.router)
    app.include_router(events.router)
    app.include_router(samples.router)
    from api.admin import install_admin_errors, router as admin_router

    app.include_router(admin_router)
    install_admin_errors(app)  # a dashboard page without the admin: 401 with the login form

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=http_metrics)
    return app
