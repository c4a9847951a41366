"""The object-store interface every backend implements: errors, keys, ``ObjectInfo`` and the
``ObjectStore`` protocol (see ``store.objects``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from store.timeouts import OBJECT_STORE, DependencyTimeout

if TYPE_CHECKING:
    from store.settings import Settings


class ObjectStoreError(Exception):
    """The object store failed or was misconfigured; the message names the store, never a secret."""


class ObjectNotFound(ObjectStoreError, LookupError):
    """No object under that key."""


class InvalidKey(ObjectStoreError, ValueError):
    """A key that is not a plain relative path inside the store."""


class ObjectStoreTimeout(DependencyTimeout, ObjectStoreError):
    """The object store did not answer within its deadline (``s3_deadline``); the API answers 503."""

    def __init__(self, seconds: float) -> None:
        DependencyTimeout.__init__(self, OBJECT_STORE, seconds)


_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
_KEY_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
MAX_KEY_LENGTH = 1024


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``InvalidKey``."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key):
        raise InvalidKey(
            f"invalid object key {key!r}: use '/'-separated segments of letters, digits, '.', '_', '-' "
            "that do not start with '.'"
        )
    return key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prompt_key(tenant_id: str, task_id: str, sha256: str) -> str:
    return validate_key(f"prompts/{tenant_id}/{task_id}/{sha256}.safetensors")


def dataset_key(tenant_id: str, sha256: str) -> str:
    return validate_key(f"datasets/{tenant_id}/{sha256}.zip")


def evaluation_key(tenant_id: str, task_id: str, evaluation_id: str) -> str:
    """The labelled zip of an evaluation, kept until its job ran (``store.evaluations``)."""
    return validate_key(f"evaluations/{tenant_id}/{task_id}/{evaluation_id}.zip")


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One stored object as ``list``/``stat`` see it; ``last_modified`` is timezone-aware UTC and
    moves forward on every ``put`` (a put always rewrites, even the same bytes under the same key:
    the garbage collector's grace period counts from it)."""

    key: str
    size: int
    last_modified: dt.datetime


@runtime_checkable
class ObjectStore(Protocol):
    #: Where the objects live, for logs and /readyz (never contains credentials).
    location: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def ping(self) -> None: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and last-modified time, or None when there is none."""
        ...



class ObjectStoreBackend(ObjectStore, Protocol):
    """A class the registry (``store.objects.BACKENDS``) can open from a URL."""

    #: The URL scheme it serves (``file``, ``s3``, ...).
    scheme: ClassVar[str]
    #: Errors of its client that mean "briefly unreachable": a job that hits one is retried.
    transient_errors: ClassVar[tuple[type[BaseException], ...]]

    @classmethod
    def from_url(
        cls, url: str, settings: "Settings | None" = None, *, access_key: str | None = None,
        secret_key: str | None = None,
    ) -> "ObjectStoreBackend":
        """The store at ``url``; credentials (unless given) and timeouts come from ``settings``."""
        ...
