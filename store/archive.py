"""Safe reading of a tenant's dataset archive (a zip of class folders).

The format is fixed by API.md ("Dataset archive"): top-level folders are the
class names, each holding that class's images; one wrapping folder is allowed;
an optional ``classes.json`` at the root maps folder names to display names.

Everything here treats the archive as hostile:

- the archive's own size, its entry count, the declared uncompressed total and
  the expansion ratio are checked before anything is decompressed;
- the bytes actually produced while reading are counted again, so a header
  that lies about sizes cannot get past the limits;
- entry names that escape the archive (``..``, absolute paths, drive letters)
  and links or other special files (from the Unix mode in ``external_attr``)
  are rejected; nothing is ever written to disk;
- an image's dimensions are read from its header and checked against the pixel
  limit before the pixels are decoded, and Pillow's own decompression-bomb
  guard is mapped to the same error;
- only PNG, JPEG, WebP, BMP and GIF decoders are used.

Every rejection raises :class:`DatasetError` with a message that names the
problem (and the file, where there is one) and a ``status_code`` the API
returns as is: 413 for size limits, 422 for everything else.
"""

from __future__ import annotations

import io
import json
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from store.images import ALLOWED_IMAGE_FORMATS, ImageError, decode_image

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "ArchiveLimits",
    "ArchiveManifest",
    "DatasetError",
    "ImageError",
    "decode_image",
    "inspect_archive",
    "iter_archive_images",
    "read_archive",
]

MiB = 1024 * 1024

#: File names (any folder) that archivers and desktops add and that are ignored.
_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db"})
#: Folder names (any depth) whose whole subtree is ignored.
_JUNK_DIRS = frozenset({"__macosx"})

CLASSES_FILE = "classes.json"
_MAX_CLASSES_FILE_BYTES = 1 * MiB
_READ_CHUNK = 64 * 1024


class DatasetError(ValueError):
    """The uploaded dataset archive is not acceptable; ``str(err)`` says why."""

    def __init__(self, message: str, *, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class ArchiveLimits:
    """Limits applied to an archive; built from Settings with :meth:`from_settings`."""

    max_bytes: int = 200 * MiB
    max_entries: int = 10_000
    max_uncompressed_bytes: int = 1024 * MiB
    max_expansion_ratio: float = 100.0
    max_image_pixels: int = 4096 * 4096
    # The ratio is only enforced once the expanded total passes this floor: a
    # few kilobytes of flat-colour BMPs can legitimately deflate 200-fold and
    # cannot hurt anybody, while a bomb is, by definition, large once expanded.
    ratio_floor_bytes: int = 1 * MiB

    @classmethod
    def from_settings(cls, settings: Any) -> "ArchiveLimits":
        return cls(
            max_bytes=int(settings.max_upload_bytes),
            max_entries=int(settings.max_archive_entries),
            max_uncompressed_bytes=int(settings.max_uncompressed_bytes),
            max_expansion_ratio=float(settings.max_expansion_ratio),
            max_image_pixels=int(settings.max_image_pixels),
        )


def _coerce_limits(limits: Any) -> ArchiveLimits:
    if limits is None:
        return ArchiveLimits()
    if isinstance(limits, ArchiveLimits):
        return limits
    return ArchiveLimits.from_settings(limits)


@dataclass(frozen=True)
class ImageEntry:
    path: str  # the entry's name inside the zip, as stored
    label: int  # index into ArchiveManifest.classes


@dataclass
class ArchiveManifest:
    """What an archive holds, in a stable order (classes sorted by folder name)."""

    classes: list[str]  # display names, index = label
    folders: list[str]  # folder names, same order as classes
    counts: dict[str, int]  # display name -> number of images
    images: list[ImageEntry] = field(default_factory=list)
    uncompressed_bytes: int = 0

    @property
    def n_images(self) -> int:
        return len(self.images)


# --------------------------------------------------------------------------- helpers


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _is_link_or_special(info: zipfile.ZipInfo) -> str | None:
    """'a link' / 'a device or other special file' when the Unix mode says so."""
    mode = (info.external_attr >> 16) & 0xFFFF
    if not mode:
        return None
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        return "a link"
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "a device or other special file"
    return None


def _split_safe(name: str) -> list[str]:
    """The path components of an entry name, or DatasetError if it escapes."""
    shown = name if len(name) <= 200 else name[:200] + "..."
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":" and norm[0].isalpha()):
        raise DatasetError(
            f"archive entry '{shown}' is an absolute path; entries must be relative "
            "paths inside the archive"
        )
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError(
            f"archive entry '{shown}' escapes the archive ('..' in its path); "
            "entries must stay inside the archive"
        )
    if any("\x00" in p for p in parts):
        raise DatasetError(f"archive entry '{shown}' has a NUL byte in its name")
    return parts


def _is_junk(parts: list[str]) -> bool:
    if any(p.lower() in _JUNK_DIRS for p in parts):
        return True
    leaf = parts[-1]
    if leaf.lower() in _JUNK_NAMES:
        return True
    # Hidden files and folders (".git/", "._cat.jpg" AppleDouble files, ...).
    return any(p.startswith(".") for p in parts)


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: list[int], limits: ArchiveLimits) -> bytes:
    """Read one entry counting the bytes really produced (never trusting headers).

    ``budget`` is a one-element list with the bytes still allowed in total.
    """
    out = io.BytesIO()
    try:
        with zf.open(info) as fh:
            while True:
                chunk = fh.read(_READ_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    raise DatasetError(
                        f"archive expands past the limit of {_human(limits.max_uncompressed_bytes)} "
                        f"while reading '{info.filename}'",
                        status_code=413,
                    )
                if out.tell() > info.file_size:
                    raise DatasetError(
                        f"archive entry '{info.filename}' is larger than its header declares; "
                        "the archive is corrupt or crafted"
                    )
    except DatasetError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise DatasetError(f"archive entry '{info.filename}' cannot be read: {_clean(exc)}") from None
    except NotImplementedError:
        raise DatasetError(
            f"archive entry '{info.filename}' uses a compression method that is not supported; "
            "use deflate or store"
        ) from None
    return out.getvalue()


def _clean(exc: BaseException) -> str:
    """An exception's message without anything that looks like a server path."""
    msg = str(exc).strip() or type(exc).__name__
    return msg.replace("\n", " ")[:200]


# --------------------------------------------------------------------------- the reader


def _open_zip(data: bytes, limits: ArchiveLimits) -> zipfile.ZipFile:
    if len(data) > limits.max_bytes:
        raise DatasetError(
            f"dataset archive is {_human(len(data))}, over the upload limit of {_human(limits.max_bytes)}",
            status_code=413,
        )
    if not data:
        raise DatasetError("dataset is empty; upload a zip archive of class folders")
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError):
        raise DatasetError(
            "dataset is not a zip archive; upload a .zip whose top-level folders are the class names"
        ) from None


def _plan(zf: zipfile.ZipFile, data_len: int, limits: ArchiveLimits) -> tuple[ArchiveManifest, zipfile.ZipInfo | None]:
    """Validate names and declared sizes; decide classes. No entry is decompressed."""
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise DatasetError(
            f"archive has {len(infos)} entries, over the limit of {limits.max_entries}",
            status_code=413,
        )

    seen: set[str] = set()
    files: list[tuple[list[str], zipfile.ZipInfo]] = []
    dirs: list[list[str]] = []
    declared = 0
    for info in infos:
        parts = _split_safe(info.filename)
        special = _is_link_or_special(info)
        if special:
            raise DatasetError(
                f"archive entry '{info.filename}' is {special}; only regular files and folders are allowed"
            )
        if not parts:
            continue
        key = "/".join(parts)
        if _is_junk(parts):
            # A class folder that holds nothing but junk is still a class folder
            # (so that it is reported as having no images).
            if len(parts) >= 2 and not _is_junk(parts[:1]):
                dirs.append(parts[:-1])
            continue
        if info.is_dir():
            dirs.append(parts)
            continue
        if key in seen:
            raise DatasetError(f"archive has two entries named '{key}'")
        seen.add(key)
        if info.flag_bits & 0x1:
            raise DatasetError(f"archive entry '{info.filename}' is encrypted; upload an unencrypted zip")
        declared += int(info.file_size)
        files.append((parts, info))

    if declared > limits.max_uncompressed_bytes:
        raise DatasetError(
            f"archive expands to {_human(declared)}, over the limit of "
            f"{_human(limits.max_uncompressed_bytes)}",
            status_code=413,
        )
    _check_ratio(declared, data_len, limits)

    # One wrapping folder: every entry (but a root classes.json) lives under the
    # same first folder, and that folder holds no image directly, only class
    # folders (and perhaps classes.json).
    rooted = [p for p, _ in files if p != [CLASSES_FILE]] + dirs
    tops = {p[0] for p in rooted}
    if len(tops) == 1:
        direct = [p for p, _ in files if len(p) == 2 and p[1] != CLASSES_FILE]
        deeper = any(len(p) >= 3 for p, _ in files)
        if not direct and deeper:
            files = [(p if p == [CLASSES_FILE] else p[1:], i) for p, i in files]
            dirs = [p[1:] for p in dirs if len(p) > 1]
            if sum(1 for p, _ in files if p == [CLASSES_FILE]) > 1:
                raise DatasetError(
                    f"archive has two {CLASSES_FILE} files (at the root and in the wrapping folder); keep one"
                )

    classes_info: zipfile.ZipInfo | None = None
    folders: dict[str, list[ImageEntry]] = {}
    for parts in dirs:
        folders.setdefault(parts[0], [])
    image_paths: list[tuple[str, str]] = []
    for parts, info in files:
        if len(parts) == 1:
            if parts[0] == CLASSES_FILE:
                classes_info = info
                continue
            raise DatasetError(
                f"file '{info.filename}' is at the top level of the archive; each image must be "
                "inside its class folder (e.g. cat/001.jpg)"
            )
        folders.setdefault(parts[0], [])
        image_paths.append((parts[0], info.filename))

    if not image_paths:
        raise DatasetError(
            "archive has no images; put each class's images in a folder named after the class "
            "(e.g. cat/001.jpg, dog/002.png)"
        )
    if len(folders) < 2:
        only = next(iter(folders))
        raise DatasetError(
            f"archive has one class only ('{only}'); a task needs at least 2 class folders"
        )
    folder_names = sorted(folders)
    label_of = {f: i for i, f in enumerate(folder_names)}
    counts_by_folder = {f: 0 for f in folder_names}
    images: list[ImageEntry] = []
    for folder, name in image_paths:
        counts_by_folder[folder] += 1
        images.append(ImageEntry(path=name, label=label_of[folder]))
    empty = [f for f in folder_names if counts_by_folder[f] == 0]
    if empty:
        raise DatasetError(
            f"class folder '{empty[0]}' has no images; each class needs at least 1 image"
        )
    manifest = ArchiveManifest(
        classes=list(folder_names),
        folders=folder_names,
        counts={},
        images=images,
        uncompressed_bytes=declared,
    )
    return manifest, classes_info


def _check_ratio(expanded: int, data_len: int, limits: ArchiveLimits) -> None:
    if expanded <= limits.ratio_floor_bytes:
        return
    ratio = expanded / max(data_len, 1)
    if ratio > limits.max_expansion_ratio:
        raise DatasetError(
            f"archive expands {ratio:.0f}-fold ({_human(data_len)} to {_human(expanded)}), over the "
            f"expansion ratio limit of {limits.max_expansion_ratio:g}",
            status_code=413,
        )


def _apply_class_names(zf: zipfile.ZipFile, manifest: ArchiveManifest, info: zipfile.ZipInfo | None,
                       budget: list[int], limits: ArchiveLimits) -> None:
    if info is not None:
        if info.file_size > _MAX_CLASSES_FILE_BYTES:
            raise DatasetError(f"{CLASSES_FILE} is larger than {_human(_MAX_CLASSES_FILE_BYTES)}")
        raw = _read_entry(zf, info, budget, limits)
        try:
            mapping = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DatasetError(
                f"{CLASSES_FILE} is not valid JSON; it must map folder names to display names, "
                'e.g. {"cat": "tabby cat"}'
            ) from None
        if not isinstance(mapping, dict):
            raise DatasetError(
                f"{CLASSES_FILE} must be a JSON object mapping folder names to display names, "
                'e.g. {"cat": "tabby cat"}'
            )
        for folder, display in mapping.items():
            if folder not in manifest.folders:
                raise DatasetError(
                    f"{CLASSES_FILE} names folder '{folder}', which is not a class folder of the "
                    f"archive (folders: {', '.join(manifest.folders)})"
                )
            if not isinstance(display, str) or not display.strip():
                raise DatasetError(
                    f"{CLASSES_FILE}: the display name of folder '{folder}' must be a non-empty string"
                )
        manifest.classes = [mapping.get(f, f).strip() for f in manifest.folders]
    seen: dict[str, str] = {}
    for folder, display in zip(manifest.folders, manifest.classes):
        if display in seen:
            raise DatasetError(
                f"folders '{seen[display]}' and '{folder}' have the same class name '{display}'; "
                "class names must be unique"
            )
        seen[display] = folder
    counts = [0] * len(manifest.classes)
    for entry in manifest.images:
        counts[entry.label] += 1
    manifest.counts = dict(zip(manifest.classes, counts))


def _open_checked(data: bytes, limits: Any) -> tuple[zipfile.ZipFile, ArchiveManifest, list[int], ArchiveLimits]:
    lim = _coerce_limits(limits)
    zf = _open_zip(data, lim)
    try:
        manifest, classes_info = _plan(zf, len(data), lim)
        budget = [lim.max_uncompressed_bytes]
        _apply_class_names(zf, manifest, classes_info, budget, lim)
    except BaseException:
        zf.close()
        raise
    return zf, manifest, budget, lim


def iter_archive_images(data: bytes, limits: Any = None) -> tuple[ArchiveManifest, Iterator[tuple[Image.Image, int]]]:
    """The manifest and an iterator of ``(RGB image, label)`` in manifest order.

    The iterator decodes one image at a time (so a caller can preprocess and
    drop each) and raises :class:`DatasetError` naming the first bad file.
    """
    zf, manifest, budget, lim = _open_checked(data, limits)

    def gen() -> Iterator[tuple[Image.Image, int]]:
        produced = 0
        try:
            infos = {i.filename: i for i in zf.infolist()}
            for entry in manifest.images:
                info = infos[entry.path]
                raw = _read_entry(zf, info, budget, lim)
                produced += len(raw)
                _check_ratio(produced, len(data), lim)
                try:
                    img = decode_image(raw, max_pixels=lim.max_image_pixels, name=f"file '{entry.path}'")
                except ImageError as exc:
                    raise DatasetError(str(exc), status_code=exc.status_code) from None
                yield img, entry.label
        finally:
            zf.close()

    return manifest, gen()


def inspect_archive(data: bytes, limits: Any = None, *, decode_images: bool = True) -> ArchiveManifest:
    """Validate an archive and return its manifest (classes, counts, image entries).

    With ``decode_images`` (the default) every image is decoded once and
    dropped, so every rejection API.md lists is found here, at upload time.
    """
    manifest, images = iter_archive_images(data, limits)
    if decode_images:
        for img, _ in images:
            img.close()
    else:
        images.close()  # type: ignore[attr-defined]
    return manifest


def read_archive(data: bytes, limits: Any = None) -> tuple[list[str], list[Image.Image], list[int]]:
    """``(classes, images, labels)``: display class names, RGB images, label per image."""
    manifest, it = iter_archive_images(data, limits)
    images: list[Image.Image] = []
    labels: list[int] = []
    for img, label in it:
        images.append(img)
        labels.append(label)
    return manifest.classes, images, labels
