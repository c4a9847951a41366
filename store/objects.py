"""Object store: S3 (minio client) or local files, behind one small interface.

Keys are relative, '/'-separated, made of ``[A-Za-z0-9._-]`` segments that do not start
with a dot; anything else (``..``, absolute paths, backslashes, empty segments) is refused
with ``InvalidKey`` so no key can escape the store. Content-addressed layout:

- ``prompts/{tenant_id}/{task_id}/{sha256}.safetensors``
- ``datasets/{tenant_id}/{sha256}.zip``
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from store.settings import Settings


class ObjectStoreError(Exception):
    """The object store failed or was misconfigured; the message names the store, never a secret."""


class ObjectNotFound(ObjectStoreError, LookupError):
    """No object under that key."""


class InvalidKey(ObjectStoreError, ValueError):
    """A key that is not a plain relative path inside the store."""


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


@runtime_checkable
class ObjectStore(Protocol):
    #: Where the objects live, for logs and /readyz (never contains credentials).
    location: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def ping(self) -> None: ...


class LocalObjectStore:
    """Objects as files under ``root``; writes are atomic (temp file in the same folder, fsync,
    ``os.replace``), so readers see the old object or the new one, never a partial one."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.realpath(Path(root).expanduser()))
        self.location = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = Path(os.path.realpath(self.root / key))
        if path != self.root and self.root not in path.parents:
            raise InvalidKey(f"invalid object key {key!r}: resolves outside the store")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.location}") from None

    def delete(self, key: str) -> None:
        """Remove the object (missing is fine) and the folders it leaves empty."""
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreError(f"object store {self.location} cannot be created: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ObjectStoreError(f"object store {self.location} is not writable")


_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"})


class S3ObjectStore:
    """Objects in an S3 bucket through the ``minio`` client; the bucket is created if absent."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        secure: bool | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        import urllib3
        from minio import Minio

        endpoint = endpoint or "https://s3.amazonaws.com"
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ObjectStoreError(f"S3 endpoint {endpoint!r} must look like http://host:port or https://host")
        if secure is None:
            secure = parts.scheme == "https"
        self.bucket = bucket
        self.endpoint = f"{'https' if secure else 'http'}://{parts.netloc}"
        self.location = f"s3://{bucket} at {self.endpoint}"
        pool_kwargs: dict[str, object] = {}
        if secure:
            try:
                import certifi

                pool_kwargs.update(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
            except ImportError:  # pragma: no cover - certifi comes with minio
                pass
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=16,
            **pool_kwargs,
        )
        self.client = Minio(
            parts.netloc,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self._bucket_ready = False

    @classmethod
    def from_url(cls, url: str, *, access_key: str | None = None, secret_key: str | None = None) -> "S3ObjectStore":
        """``s3://bucket?endpoint=http://host:port[&region=R][&secure=true|false]``."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ObjectStoreError(f"{url!r} is not an s3:// URL; expected s3://bucket?endpoint=http://host:port")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint", "region", "secure"}
        if unknown:
            raise ObjectStoreError(
                f"unknown option(s) {sorted(unknown)} in the object store URL; accepted: endpoint, region, secure"
            )
        secure = None
        if "secure" in query:
            secure = query["secure"].lower() in ("1", "true", "yes", "on")
        return cls(
            parts.netloc,
            endpoint=query.get("endpoint"),
            access_key=access_key,
            secret_key=secret_key,
            region=query.get("region"),
            secure=secure,
        )

    def _error(self, action: str, key: str | None, exc: Exception) -> ObjectStoreError:
        what = f" {key!r}" if key else ""
        code = getattr(exc, "code", None) or type(exc).__name__
        return ObjectStoreError(f"object store {self.location}: {action}{what} failed ({code})")

    def ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        from minio.error import S3Error

        try:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._error("creating bucket", None, exc) from None
        self._bucket_ready = True

    def put(self, key: str, data: bytes) -> None:
        validate_key(key)
        self.ensure_bucket()
        try:
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))
        except Exception as exc:
            raise self._error("put", key, exc) from None

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        validate_key(key)
        try:
            resp = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ObjectNotFound(f"no object {key!r} in {self.location}") from None
            raise self._error("get", key, exc) from None
        except Exception as exc:
            raise self._error("get", key, exc) from None
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def delete(self, key: str) -> None:
        from minio.error import S3Error

        validate_key(key)
        try:
            self.client.remove_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return
            raise self._error("delete", key, exc) from None
        except Exception as exc:
            raise self._error("delete", key, exc) from None

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        validate_key(key)
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return False
            raise self._error("stat", key, exc) from None
        except Exception as exc:
            raise self._error("stat", key, exc) from None

    def ping(self) -> None:
        self._bucket_ready = False
        self.ensure_bucket()


def open_object_store(
    settings_or_url: "Settings | str", access_key: str | None = None, secret_key: str | None = None
) -> ObjectStore:
    """The store for ``file://PATH`` (relative paths against the cwd) or
    ``s3://bucket?endpoint=...``; credentials default to the settings' S3 keys."""
    if isinstance(settings_or_url, str):
        url = settings_or_url
    else:
        url = settings_or_url.object_store_url
        access_key = access_key if access_key is not None else settings_or_url.s3_access_key
        secret_key = secret_key if secret_key is not None else settings_or_url.s3_secret_key
    if url.startswith("file://"):
        path = url[len("file://") :]
        if not path:
            raise ObjectStoreError("file:// object store URL needs a path, e.g. file://./var/objects")
        return LocalObjectStore(path)
    if url.startswith("s3://"):
        return S3ObjectStore.from_url(url, access_key=access_key, secret_key=secret_key)
    raise ObjectStoreError(
        f"unsupported object store URL {url!r}; use file://PATH or s3://BUCKET?endpoint=http://HOST:PORT"
    )
