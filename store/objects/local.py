"""``file://PATH``: objects as files under a folder (relative paths against the cwd)."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from store.objects.base import InvalidKey, ObjectInfo, ObjectNotFound, ObjectStoreError, validate_key

if TYPE_CHECKING:
    from store.settings import Settings


class LocalObjectStore:
    """Objects as files under ``root``; writes are atomic (temp file in the same folder, fsync,
    ``os.replace``), so readers see the old object or the new one, never a partial one."""

    scheme: ClassVar[str] = "file"
    #: Local files are never "briefly unreachable".
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    @classmethod
    def from_url(
        cls, url: str, settings: "Settings | None" = None, *, access_key: str | None = None,
        secret_key: str | None = None,
    ) -> "LocalObjectStore":
        """``file://PATH`` (relative paths against the cwd); files need no credentials."""
        path = url[len("file://") :] if url.startswith("file://") else ""
        if not path:
            raise ObjectStoreError("file:// object store URL needs a path, e.g. file://./var/objects")
        return cls(path)

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

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under the keys starting with ``prefix``; temp files of writes in progress
        (names starting with a dot) are not objects and are skipped."""
        start = self.root
        if "/" in prefix:
            start = self._path(prefix.rsplit("/", 1)[0])
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    info = self.stat(key)
                except InvalidKey:  # not written by the store (odd characters): not one of its objects
                    continue
                if info is not None:
                    yield info

    def stat(self, key: str) -> ObjectInfo | None:
        import stat as stat_mod

        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, dt.datetime.fromtimestamp(st.st_mtime, tz=dt.timezone.utc))

