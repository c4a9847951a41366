"""``s3://bucket?endpoint=http://host:port[&region=R][&secure=true|false]``: objects in an S3
bucket through the ``minio`` client."""

from __future__ import annotations

import datetime as dt
import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qs, urlsplit

import urllib3.exceptions

from store.objects.base import ObjectInfo, ObjectNotFound, ObjectStoreError, ObjectStoreTimeout, validate_key

if TYPE_CHECKING:
    from store.settings import Settings


_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"})
#: S3 error codes worth another attempt.
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})
_T = TypeVar("_T")
#: Bytes per second a large object is given on top of ``s3_deadline`` (1 MiB/s: a 200 MiB
#: dataset may take 200 s more), so that the deadline bounds waiting, not size.
MIN_TRANSFER_RATE = 1024 * 1024
#: The deadline (time.monotonic()) of the S3 call this thread is in, if any.
_call_state = threading.local()


def _deadline_pool_manager_class() -> Any:
    import urllib3

    class DeadlinePoolManager(urllib3.PoolManager):
        """A pool whose every request gets the store's connect/read timeouts, cut to the
        current call's deadline (minio passes no timeout of its own)."""

        def __init__(self, store: "S3ObjectStore", **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._store = store

        def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any) -> Any:
            kw.setdefault("timeout", self._store.attempt_timeout())
            return super().urlopen(method, url, redirect=redirect, **kw)

    return DeadlinePoolManager


def _DeadlinePoolManager(store: "S3ObjectStore", **kwargs: Any) -> Any:
    return _deadline_pool_manager_class()(store, **kwargs)


class S3ObjectStore:
    """Objects in an S3 bucket through the ``minio`` client; the bucket is created if absent."""

    scheme: ClassVar[str] = "s3"
    #: The HTTP transport's "could not reach / no answer" errors (minio speaks through urllib3).
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = (
        urllib3.exceptions.MaxRetryError,
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.TimeoutError,
    )

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        secure: bool | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        retries: int = 2,
        deadline: float = 8.0,
    ) -> None:
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
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.retries = int(retries)
        self.deadline = float(deadline)
        # Retries are ours (``_call``), inside one deadline; urllib3 makes one attempt per call.
        http = _DeadlinePoolManager(self, retries=False, maxsize=16, **pool_kwargs)
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
    def from_url(
        cls,
        url: str,
        settings: "Settings | None" = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        **timeouts: Any,
    ) -> "S3ObjectStore":
        """``s3://bucket?endpoint=http://host:port[&region=R][&secure=true|false]``; the
        credentials and timeouts not given come from ``settings`` (the object store's access
        and secret keys, ``s3_*`` timeouts)."""
        if settings is not None:
            default_access, default_secret = settings.object_store_credentials()
            access_key = access_key if access_key is not None else default_access
            secret_key = secret_key if secret_key is not None else default_secret
            timeouts = {
                "connect_timeout": settings.s3_connect_timeout, "read_timeout": settings.s3_read_timeout,
                "retries": settings.s3_retries, "deadline": settings.s3_deadline, **timeouts,
            }
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
            **timeouts,
        )

    def attempt_timeout(self) -> Any:
        """The urllib3 timeout of one HTTP attempt: the configured connect and read timeouts,
        cut to what is left of the current call's deadline."""
        import urllib3

        deadline = getattr(_call_state, "deadline", None)
        if deadline is None:
            return urllib3.Timeout(connect=self.connect_timeout, read=self.read_timeout)
        left = deadline - time.monotonic()
        if left <= 0:
            raise ObjectStoreTimeout(self.deadline)
        return urllib3.Timeout(connect=min(self.connect_timeout, left), read=min(self.read_timeout, left), total=left)

    def _call(self, action: str, key: str | None, fn: Callable[[], _T], size: int = 0) -> _T:
        """``fn()`` (minio calls) retried after a connection error, a timeout or a 5xx, at most
        ``retries`` times and all within ``deadline`` seconds; past it ``ObjectStoreTimeout``.
        Other errors (S3Error: missing key, denied, ...) go to the caller as they are."""
        import urllib3
        from minio.error import S3Error, ServerError

        start = time.monotonic()
        outer = getattr(_call_state, "deadline", None)
        # a large body gets the time to travel at MIN_TRANSFER_RATE on top of the deadline
        _call_state.deadline = start + self.deadline + size / MIN_TRANSFER_RATE if outer is None else outer
        try:
            attempt = 0
            while True:
                try:
                    return fn()
                except ObjectStoreTimeout:
                    raise
                except S3Error as exc:
                    if exc.code not in _TRANSIENT_CODES:
                        raise
                    last: Exception = exc
                except (urllib3.exceptions.HTTPError, ServerError, OSError) as exc:
                    last = exc
                timed_out = isinstance(last, (urllib3.exceptions.TimeoutError, TimeoutError))
                backoff = 0.1 * 2**attempt
                attempt += 1
                if attempt > self.retries or time.monotonic() + backoff >= _call_state.deadline:
                    if timed_out or time.monotonic() >= _call_state.deadline:
                        raise ObjectStoreTimeout(self.deadline) from None
                    raise self._error(action, key, last) from None
                time.sleep(backoff)
        finally:
            _call_state.deadline = outer

    def _error(self, action: str, key: str | None, exc: Exception) -> ObjectStoreError:
        what = f" {key!r}" if key else ""
        code = getattr(exc, "code", None) or type(exc).__name__
        return ObjectStoreError(f"object store {self.location}: {action}{what} failed ({code})")

    def ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        from minio.error import S3Error

        def ensure() -> None:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        try:
            self._call("creating bucket", None, ensure)
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._error("creating bucket", None, exc) from None
        self._bucket_ready = True

    def put(self, key: str, data: bytes) -> None:
        validate_key(key)
        self.ensure_bucket()
        try:
            self._call("put", key, lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data)), len(data))
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._error("put", key, exc) from None

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        validate_key(key)

        def read() -> bytes:
            resp = self.client.get_object(self.bucket, key)
            try:
                chunks = []
                for chunk in resp.stream(1024 * 1024):
                    chunks.append(chunk)
                    # a body that keeps arriving at MIN_TRANSFER_RATE is not cut; a silent one
                    # ends after the read timeout (urllib3)
                    _call_state.deadline += len(chunk) / MIN_TRANSFER_RATE
                return b"".join(chunks)
            finally:
                resp.close()
                resp.release_conn()

        try:
            return self._call("get", key, read)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ObjectNotFound(f"no object {key!r} in {self.location}") from None
            raise self._error("get", key, exc) from None
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._error("get", key, exc) from None

    def delete(self, key: str) -> None:
        from minio.error import S3Error

        validate_key(key)
        try:
            self._call("delete", key, lambda: self.client.remove_object(self.bucket, key))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return
            raise self._error("delete", key, exc) from None
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._error("delete", key, exc) from None

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        validate_key(key)
        try:
            self._call("stat", key, lambda: self.client.stat_object(self.bucket, key))
            return True
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return False
            raise self._error("stat", key, exc) from None
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._error("stat", key, exc) from None

    def ping(self) -> None:
        self._bucket_ready = False
        self.ensure_bucket()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        from minio.error import S3Error

        try:
            for obj in self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                if obj.is_dir or obj.object_name is None:
                    continue
                modified = obj.last_modified or dt.datetime.now(dt.timezone.utc)
                if modified.tzinfo is None:
                    modified = modified.replace(tzinfo=dt.timezone.utc)
                yield ObjectInfo(obj.object_name, int(obj.size or 0), modified)
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                return
            raise self._error("list", prefix or None, exc) from None
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise self._error("list", prefix or None, exc) from None

    def stat(self, key: str) -> ObjectInfo | None:
        from minio.error import S3Error

        validate_key(key)
        try:
            st = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return None
            raise self._error("stat", key, exc) from None
        except Exception as exc:
            raise self._error("stat", key, exc) from None
        modified = st.last_modified or dt.datetime.now(dt.timezone.utc)
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=dt.timezone.utc)
        return ObjectInfo(key, int(st.size or 0), modified)

