"""What one app instance holds: settings, database, object store, backbone, inference,
job dispatcher and metrics registry. Built by ``api.app.create_app``."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from api.middleware import HttpMetrics
from store.objects import ObjectStore
from worker import runtime

if TYPE_CHECKING:
    from backbone import Backbone
    from store.settings import Settings
    from worker.dispatch import CeleryDispatcher, ThreadDispatcher

log = logging.getLogger("promptstore.api")


class BackboneNotReady(Exception):
    """The backbone is still loading, or failed to load (the message says which)."""


class BackboneHolder:
    """Loads the process's backbone in a background thread at start, so that the
    process answers /healthz (and /readyz says "loading") while big weights load."""

    def __init__(self, spec: str, device: str | None) -> None:
        self.spec = spec
        self.device = device
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._done = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._load, name="promptstore-backbone", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            runtime.get_backbone(self.spec, self.device)
        except Exception as exc:  # BackboneError and the like: said in /readyz and the log
            log.error("backbone %s failed to load: %s", self.spec, exc)
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def get(self) -> "Backbone":
        bb = runtime.loaded_backbone(self.spec, self.device)
        if bb is not None:
            return bb
        if self._error is not None:
            raise BackboneNotReady(f"backbone failed to load ({self._error.split(':')[0]})")
        raise BackboneNotReady("backbone is still loading")

    @property
    def error(self) -> str | None:
        return self._error


@dataclass
class ServiceState:
    settings: "Settings"
    sessionmaker: sessionmaker[Session]
    objects: ObjectStore
    backbone: BackboneHolder
    inference: Any  # api.inference.Inference (or the engine that replaces it)
    dispatcher: "CeleryDispatcher | ThreadDispatcher"
    registry: CollectorRegistry
    http_metrics: HttpMetrics
