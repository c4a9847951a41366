"""The process's backbone: loaded once per ``(spec, device)`` and kept, never per job or
request; shared by the API and the job runners of the same process.

``BackboneHolder`` starts the load in a background thread so that a process answers (and
says "loading") while big weights load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import public_reason

if TYPE_CHECKING:
    from .loading import Backbone

log = logging.getLogger("promptstore.backbone")

_lock = threading.Lock()
_backbone_locks: dict[tuple[str, str | None], threading.Lock] = {}
_backbones: dict[tuple[str, str | None], "Backbone"] = {}


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
            from .loading import load_backbone

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
            log.error("backbone %s failed to load: %s", self.spec, exc)
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
