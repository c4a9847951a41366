"""Object stores behind one small interface (``ObjectStore``), one backend per URL scheme.

Keys are relative, '/'-separated, made of ``[A-Za-z0-9._-]`` segments that do not start
with a dot; anything else (``..``, absolute paths, backslashes, empty segments) is refused
with ``InvalidKey`` so no key can escape the store. Content-addressed layout:

- ``prompts/{tenant_id}/{task_id}/{sha256}.safetensors``
- ``datasets/{tenant_id}/{sha256}.zip``
- ``evaluations/{tenant_id}/{task_id}/{evaluation_id}.zip`` (until its evaluation job ran)

Backends live in their own modules and are named in ``BACKENDS`` (imported on first use):
each declares its ``scheme``, its ``transient_errors`` (what a job may retry) and
``from_url(url, settings)``, which reads its credentials from the settings. Adding one
(say ``gs://``) is a new module and one line in ``BACKENDS``.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any

from store.objects.base import (
    MAX_KEY_LENGTH,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreBackend,
    ObjectStoreError,
    ObjectStoreTimeout,
    dataset_key,
    evaluation_key,
    prompt_key,
    sha256_hex,
    validate_key,
)

if TYPE_CHECKING:
    from store.objects.local import LocalObjectStore
    from store.objects.s3 import S3ObjectStore
    from store.settings import Settings

#: URL scheme -> "module:Class" of its backend.
BACKENDS: dict[str, str] = {
    "file": "store.objects.local:LocalObjectStore",
    "s3": "store.objects.s3:S3ObjectStore",
}

#: How each scheme's URL looks, for error messages (a scheme not listed shows as ``scheme://...``).
_EXAMPLES = {"file": "file://PATH", "s3": "s3://BUCKET?endpoint=http://HOST:PORT"}

__all__ = [
    "BACKENDS", "MAX_KEY_LENGTH", "InvalidKey", "LocalObjectStore", "ObjectInfo", "ObjectNotFound", "ObjectStore",
    "ObjectStoreBackend", "ObjectStoreError", "ObjectStoreTimeout", "S3ObjectStore", "backend_for",
    "dataset_key", "evaluation_key", "get_object_store", "known_schemes", "open_object_store", "prompt_key", "sha256_hex",
    "supported_urls", "transient_errors", "validate_key",
]


def known_schemes() -> tuple[str, ...]:
    """The URL schemes a backend is registered for (without importing any backend)."""
    return tuple(BACKENDS)


def supported_urls() -> str:
    """``file://PATH or s3://...``: the accepted URL forms, for messages."""
    forms = [_EXAMPLES.get(s, f"{s}://...") for s in BACKENDS]
    return ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else forms[0]


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def backend_for(scheme: str) -> "type[ObjectStoreBackend]":
    """The backend class registered for ``scheme`` (``ObjectStoreError`` when none is)."""
    target = BACKENDS.get(scheme)
    if target is None:
        raise ObjectStoreError(f"no object store backend for {scheme!r}:// URLs; use {supported_urls()}")
    module, name = target.split(":")
    cls: type[ObjectStoreBackend] = getattr(importlib.import_module(module), name)
    return cls


def transient_errors() -> tuple[type[BaseException], ...]:
    """Every backend's transient errors (a job that hits one is retried)."""
    seen: dict[type[BaseException], None] = {}
    for scheme in BACKENDS:
        for err in backend_for(scheme).transient_errors:
            seen.setdefault(err)
    return tuple(seen)


def open_object_store(
    settings_or_url: "Settings | str", access_key: str | None = None, secret_key: str | None = None
) -> ObjectStore:
    """The store for ``settings.object_store_url`` (or the URL given), by its scheme; the
    backend reads its credentials and timeouts from the settings unless given here."""
    if isinstance(settings_or_url, str):
        url, settings = settings_or_url, None
    else:
        url, settings = settings_or_url.object_store_url, settings_or_url
    if scheme_of(url) not in BACKENDS:
        raise ObjectStoreError(f"unsupported object store URL {url!r}; use {supported_urls()}")
    return backend_for(scheme_of(url)).from_url(url, settings, access_key=access_key, secret_key=secret_key)


_lock = threading.Lock()
_object_stores: dict[tuple[object, ...], ObjectStore] = {}


def get_object_store(settings: "Settings") -> ObjectStore:
    """The process's object store for these settings, opened on first use and then shared."""
    key = (
        settings.object_store_url, settings.object_store_credentials()[0], settings.s3_connect_timeout,
        settings.s3_read_timeout, settings.s3_retries, settings.s3_deadline,
    )
    with _lock:
        objects = _object_stores.get(key)
        if objects is None:
            objects = open_object_store(settings)
            _object_stores[key] = objects
        return objects


def __getattr__(name: str) -> Any:
    """``LocalObjectStore``, ``S3ObjectStore``: the backends, imported when asked for."""
    for scheme, target in BACKENDS.items():
        if target.endswith(f":{name}"):
            return backend_for(scheme)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
