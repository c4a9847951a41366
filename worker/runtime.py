"""Per-process resources shared by every job (and by the API in the same process).

The backbone is loaded once per process and kept (keyed by spec and device),
never per job; database engines and object stores are likewise opened once
per URL.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from store.db import make_engine, make_sessionmaker
from store.objects import ObjectStore, open_object_store

if TYPE_CHECKING:
    from backbone import Backbone
    from store.settings import Settings

log = logging.getLogger("promptstore.worker")
_backbone_log = logging.getLogger("promptstore.backbone")

_lock = threading.Lock()
_backbone_locks: dict[tuple[str, str | None], threading.Lock] = {}
_backbones: dict[tuple[str, str | None], "Backbone"] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}
_object_stores: dict[tuple[str, str | None], ObjectStore] = {}


def get_backbone(spec: str, device: str | None = None) -> "Backbone":
    """The process's backbone for ``(spec, device)``, loaded on first use.

    Concurrent first callers wait for the one load; a failed load is not cached,
    so the next caller tries again (and gets the same clear error).
    """
    key = (spec, device)
    bb = _backbones.get(key)
    if bb is not None:
        return bb
    with _lock:
        load_lock = _backbone_locks.setdefault(key, threading.Lock())
    with load_lock:
        bb = _backbones.get(key)
        if bb is None:
            from backbone import load_backbone

            bb = load_backbone(spec, device)
            if getattr(bb, "weights", None) == "random":
                log.warning(
                    "backbone %s runs with RANDOM weights: predictions are only meaningful for "
                    "tests and trials; set PROMPTSTORE_BACKBONE to real weights for production",
                    bb.spec,
                )
            else:
                log.info("backbone %s loaded on %s", bb.spec, bb.device)
            _backbones[key] = bb
    return bb


def loaded_backbone(spec: str, device: str | None = None) -> "Backbone | None":
    """The backbone if this process has loaded it already, else None (never loads)."""
    return _backbones.get((spec, device))


def get_sessionmaker(database_url: str) -> sessionmaker[Session]:
    with _lock:
        sm = _sessionmakers.get(database_url)
        if sm is None:
            sm = make_sessionmaker(make_engine(database_url))
            _sessionmakers[database_url] = sm
        return sm


def get_object_store(settings: "Settings") -> ObjectStore:
    key = (settings.object_store_url, settings.s3_access_key)
    with _lock:
        objects = _object_stores.get(key)
        if objects is None:
            objects = open_object_store(settings)
            _object_stores[key] = objects
        return objects


class BackboneNotReady(Exception):
    """The backbone is still loading, or failed to load (the message says which)."""


class BackboneHolder:
    """Loads the process's backbone in a background thread at start: an API process answers
    /healthz (and /readyz says "loading") while big weights load, and a worker's first job
    does not wait for the load it would otherwise start."""

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
            get_backbone(self.spec, self.device)
        except Exception as exc:  # BackboneError and the like: said in /readyz and the log
            _backbone_log.error("backbone %s failed to load: %s", self.spec, exc)
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def get(self) -> "Backbone":
        bb = loaded_backbone(self.spec, self.device)
        if bb is not None:
            return bb
        if self._error is not None:
            raise BackboneNotReady(f"backbone failed to load ({self._error.split(':')[0]})")
        raise BackboneNotReady("backbone is still loading")

    @property
    def error(self) -> str | None:
        return self._error
