"""Per-process resources shared by every job (and by the API in the same process).

The backbone is loaded once per process and kept (keyed by spec and device),
never per job; database engines and object stores are likewise opened once
per URL.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
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
_sessionmakers: dict[tuple[str, float | None, float | None], sessionmaker[Session]] = {}
_object_stores: dict[tuple[object, ...], ObjectStore] = {}


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


def get_sessionmaker(
    database_url: str, *, connect_timeout: float | None = None, timeout: float | None = None
) -> sessionmaker[Session]:
    """The process's sessionmaker for ``database_url`` with these timeouts (settings
    ``db_connect_timeout``, ``db_timeout``; None: their defaults)."""
    key = (database_url, connect_timeout, timeout)
    with _lock:
        sm = _sessionmakers.get(key)
        if sm is None:
            sm = make_sessionmaker(make_engine(database_url, connect_timeout=connect_timeout, timeout=timeout))
            _sessionmakers[key] = sm
        return sm


def get_object_store(settings: "Settings") -> ObjectStore:
    key = (
        settings.object_store_url, settings.s3_access_key, settings.s3_connect_timeout, settings.s3_read_timeout,
        settings.s3_retries, settings.s3_deadline,
    )
    with _lock:
        objects = _object_stores.get(key)
        if objects is None:
            objects = open_object_store(settings)
            _object_stores[key] = objects
        return objects


#: An absolute path (POSIX or Windows) standing alone or after ':' or '=' (not a URL's '//').
_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s:='"(]))(?:/(?!/)|[A-Za-z]:\\)[^\s'"(),;]+""")
_URL_CREDENTIALS = re.compile(r"(\w+://)[^/\s@]+@")


def public_reason(exc: BaseException) -> str:
    """``exc``'s message fit for a client (see ``public_text``)."""
    return public_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def public_text(msg: str) -> str:
    """``msg`` fit for a client: no server path (a path is shortened to its last part) and no
    credentials in URLs; at most 300 characters."""
    msg = _URL_CREDENTIALS.sub(r"\1", msg)
    msg = _PATH.sub(lambda m: ".../" + re.split(r"[\\/]", m.group(0).rstrip("\\/"))[-1], msg)
    return msg[:300]


class BackboneNotReady(Exception):
    """The backbone is still loading, or failed to load (the message says which)."""


class BackboneHolder:
    """Loads the process's backbone in a background thread at start: an API process answers
    /healthz (and /readyz says "loading") while big weights load, and a worker's first job
    does not wait for the load it would otherwise start."""

    def __init__(self, spec: str, device: str | None, on_loaded: "Callable[[Backbone], None] | None" = None) -> None:
        self.spec = spec
        self.device = device
        self.on_loaded = on_loaded  # called once, in the loading thread, when the backbone is usable
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
            bb = get_backbone(self.spec, self.device)
        except Exception as exc:  # BackboneError and the like: said in /readyz and the log
            _backbone_log.error("backbone %s failed to load: %s", self.spec, exc)
            self._error = public_reason(exc)
            self._done.set()
            return
        self._done.set()
        if self.on_loaded is not None:
            self.on_loaded(bb)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def get(self) -> "Backbone":
        bb = loaded_backbone(self.spec, self.device)
        if bb is not None:
            return bb
        if self._error is not None:
            raise BackboneNotReady(f"backbone failed to load: {self._error}")
        raise BackboneNotReady("backbone is still loading")

    @property
    def error(self) -> str | None:
        return self._error
