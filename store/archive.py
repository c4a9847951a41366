"""Safe reading of a tenant's dataset archive (a zip of class folders).

The format is fixed by docs/inputs.md ("Dataset archives"): top-level folders are the
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

Entry names are read as the tool that wrote them meant them (see docs/inputs.md,
"Dataset archives"): UTF-8 when the zip's UTF-8 flag (0x800) is set; without it
the Info-ZIP Unicode Path extra field when present, else UTF-8 when the bytes
decode as UTF-8 (macOS Finder, Linux), else cp437 (old Windows tools). Names are
normalised to Unicode NFC, ``\\`` is a separator like ``/``, operating-system
litter is ignored and folders without files are ignored (reported as warnings).
Class names are the folder names, NFC, trimmed; blank names, control characters
and two folders that become the same name are refused.

Images are decoded once each and identified by a hash of their decoded pixels:
the same picture under two labels is refused naming both files; a duplicate
within one class is dropped (kept once) and reported in ``manifest.warnings``.
Upload (``inspect_archive``) and the job (``iter_archive_images``) go through
the same code, so both see the same deduplicated image list.

Every rejection raises :class:`DatasetError` with a message that names the
problem (and the file, where there is one); ``over_limit`` marks a size limit
(the API answers those 413, everything else 422: ``api.errors``).
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import struct
import unicodedata
import zipfile
import zlib
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
    "pixel_digest",
    "read_archive",
]

MiB = 1024 * 1024

#: File names (any folder) that archivers and desktops add and that are ignored.
_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})
#: Folder names (any depth) whose whole subtree is ignored.
_JUNK_DIRS = frozenset({"__macosx"})

CLASSES_FILE = "classes.json"
_MAX_CLASSES_FILE_BYTES = 1 * MiB
_READ_CHUNK = 64 * 1024
#: zip general-purpose flag bit 11: the entry's name (and comment) is UTF-8.
_UTF8_FLAG = 0x800
#: Info-ZIP Unicode Path extra field (UTF-8 name plus the CRC-32 of the header name).
_UNICODE_PATH_EXTRA = 0x7075
#: Most files listed by name in one warning or error before "and N more".
_MAX_LISTED = 10


class DatasetError(ValueError):
    """The uploaded dataset archive is not acceptable; ``str(err)`` says why; ``over_limit``:
    the archive (or one of its images) is over a size limit rather than malformed."""

    def __init__(self, message: str, *, over_limit: bool = False) -> None:
        super().__init__(message)
        self.over_limit = over_limit


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
    path: str  # the entry's name inside the zip, as zipfile reports it (lookup key)
    label: int  # index into ArchiveManifest.classes
    name: str = ""  # the name as the user wrote it: decoded, NFC, "/"-separated
    index: int = -1  # position in ZipFile.infolist()

    @property
    def shown(self) -> str:
        return self.name or self.path


@dataclass
class ArchiveManifest:
    """What an archive holds, in a stable order (classes sorted by folder name)."""

    classes: list[str]  # display names, index = label
    folders: list[str]  # folder names, same order as classes
    counts: dict[str, int]  # display name -> number of images
    images: list[ImageEntry] = field(default_factory=list)
    uncompressed_bytes: int = 0
    #: What was ignored or dropped, for the task's ``warnings`` (empty folders at
    #: once; duplicate images once the images have been iterated to the end).
    warnings: list[str] = field(default_factory=list)

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


# --------------------------------------------------------------------------- names

#: Unicode categories refused in class names: control characters and line/paragraph separators.
_CONTROL = frozenset({"Cc", "Zl", "Zp"})


def _unicode_path_extra(extra: bytes, raw: bytes) -> str | None:
    """The UTF-8 name in an Info-ZIP Unicode Path extra field (0x7075) written for the
    header name ``raw`` (its CRC-32 matches), or None."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + size]
        pos += 4 + size
        if tag != _UNICODE_PATH_EXTRA or len(body) < 5 or body[0] != 1:
            continue
        if struct.unpack_from("<I", body, 1)[0] != zlib.crc32(raw) & 0xFFFFFFFF:
            continue  # the name was changed by a tool that did not update the field
        try:
            return body[5:].decode("utf-8") or None
        except UnicodeDecodeError:
            return None
    return None


def _decoded_name(info: zipfile.ZipInfo) -> str:
    """The entry's name as the archiver meant it (not yet normalised): UTF-8 when the
    entry's UTF-8 flag is set; otherwise the Unicode Path extra field when present, UTF-8
    when the bytes decode as UTF-8 (macOS Finder, Linux tools), else cp437."""
    name = info.orig_filename  # the header name, before zipfile cuts it at a NUL byte
    if info.flag_bits & _UTF8_FLAG:
        return name  # zipfile decoded it as UTF-8 already
    try:
        raw = name.encode("cp437")  # zipfile decoded the header bytes as cp437: undo that
    except UnicodeEncodeError:  # pragma: no cover - only with another metadata_encoding
        return name
    unicode_path = _unicode_path_extra(info.extra, raw)
    if unicode_path is not None:
        return unicode_path
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return name  # cp437, as old Windows tools wrote it


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _show(name: str, limit: int = 200) -> str:
    """A name fit for a message: control characters escaped, long names cut."""
    out = "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _CONTROL else ch for ch in name
    )
    return out if len(out) <= limit else out[:limit] + "..."


def _describe(raw: str) -> str:
    """``'name'`` plus what normalisation changes in it."""
    notes = []
    if _nfc(raw) != raw:
        notes.append("decomposed Unicode form")
    if raw != raw.strip():
        notes.append("surrounding whitespace")
    return f"'{_show(raw)}'" + (f" ({', '.join(notes)})" if notes else "")


def _class_name(raw: str, what: str) -> str:
    """The class name ``raw`` stands for: NFC, trimmed of surrounding whitespace.
    DatasetError for a blank name or one with control characters."""
    name = _nfc(raw).strip()
    if not name:
        raise DatasetError(
            f"{what} has a blank name; class names must contain at least one visible character"
        )
    bad = sorted({ch for ch in name if unicodedata.category(ch) in _CONTROL})
    if bad:
        codes = ", ".join(f"U+{ord(c):04X}" for c in bad)
        raise DatasetError(
            f"{what} has control characters in its name ({codes}); class names must be printable text"
        )
    return name


def _split_safe(name: str) -> list[str]:
    """The path components of an entry name (``/`` and ``\\`` both separate), or
    DatasetError if it escapes the archive."""
    shown = _show(name)
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


def _is_folder_entry(info: zipfile.ZipInfo, decoded: str) -> bool:
    # Windows tools may end a folder's name with "\"; MS-DOS attribute 0x10 marks a folder.
    return decoded.endswith(("/", "\\")) or (bool(info.external_attr & 0x10) and info.file_size == 0)


@dataclass
class _File:
    raw_parts: list[str]  # decoded, not normalised
    parts: list[str]  # NFC (the wrapping folder removed once it is known)
    name: str  # NFC, "/"-separated, the full path as the user sees it
    index: int
    info: zipfile.ZipInfo


def _found(files: list[_File], dirs: list[list[str]], ignored: int, wrapper: str | None) -> str:
    """What the archive holds at the class-folder level, for messages that refuse it."""
    counts: dict[str, int | None] = {}  # name -> files under it; None: a file
    for f in files:
        if len(f.parts) == 1:
            counts.setdefault(f.parts[0], None)
        else:
            key = f.parts[0] + "/"
            counts[key] = (counts.get(key) or 0) + 1
    for d in dirs:
        if d:
            counts.setdefault(d[0] + "/", 0)
    items = []
    for name in sorted(counts)[:_MAX_LISTED]:
        n = counts[name]
        if n is None:
            items.append(f"'{_show(name)}'")
        else:
            items.append(f"'{_show(name)}' ({n} file{'' if n == 1 else 's'})")
    more = len(counts) - _MAX_LISTED
    where = f"inside the wrapping folder '{_show(wrapper)}/'" if wrapper else "at the top level"
    text = f"found {where}: " + (", ".join(items) if items else "nothing")
    if more > 0:
        text += f" and {more} more"
    if ignored:
        text += (
            f"; {ignored} system file{'' if ignored == 1 else 's'} ignored "
            "(__MACOSX/, ._*, .DS_Store, Thumbs.db, desktop.ini)"
        )
    return text


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")



def _read_entry(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: list[int], limits: ArchiveLimits, *, shown: str | None = None
) -> bytes:
    """Read one entry counting the bytes really produced (never trusting headers).

    ``budget`` is a one-element list with the bytes still allowed in total; ``shown`` is
    the entry's name for messages (default: as zipfile decoded it).
    """
    name = shown if shown is not None else info.filename
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
                        f"while reading '{name}'",
                        over_limit=True,
                    )
                if out.tell() > info.file_size:
                    raise DatasetError(
                        f"archive entry '{name}' is larger than its header declares; "
                        "the archive is corrupt or crafted"
                    )
    except DatasetError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise DatasetError(f"archive entry '{name}' cannot be read: {_clean(exc)}") from None
    except NotImplementedError:
        raise DatasetError(
            f"archive entry '{name}' uses a compression method that is not supported; "
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
            over_limit=True,
        )
    if not data:
        raise DatasetError("dataset is empty; upload a zip archive of class folders")
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except UnicodeDecodeError:
        raise DatasetError(
            "archive has an entry whose name is marked as UTF-8 but is not valid UTF-8; the archive "
            "is corrupt or was written by a faulty tool, zip it again"
        ) from None
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
            over_limit=True,
        )

    seen: dict[str, str] = {}  # normalised name -> decoded name
    files: list[_File] = []
    dirs: list[list[str]] = []
    ignored = 0
    hidden_dirs: dict[str, int] = {}  # a hidden folder holding files -> how many (said in warnings)
    declared = 0
    for index, info in enumerate(infos):
        decoded = _decoded_name(info)
        raw_parts = _split_safe(decoded)
        special = _is_link_or_special(info)
        if special:
            raise DatasetError(
                f"archive entry '{_show(decoded)}' is {special}; only regular files and folders are allowed"
            )
        if not raw_parts:
            continue
        parts = [_nfc(p) for p in raw_parts]
        if _is_junk(parts):
            ignored += 1
            hidden = next((i for i, p in enumerate(parts[:-1]) if p.startswith(".")), None)
            if hidden is not None and not _is_folder_entry(info, decoded):
                key = "/".join(parts[: hidden + 1])
                hidden_dirs[key] = hidden_dirs.get(key, 0) + 1
            # A folder that holds nothing but litter is an empty folder (reported as ignored).
            if len(parts) >= 2 and not _is_junk(parts[:1]):
                dirs.append(parts[:-1])
            continue
        if _is_folder_entry(info, decoded):
            dirs.append(parts)
            continue
        key = "/".join(parts)
        if key in seen:
            if seen[key] != "/".join(raw_parts):
                raise DatasetError(
                    f"archive has two entries named '{_show(key)}' once their names are Unicode-normalised "
                    f"(NFC): {_describe(seen[key])} and {_describe('/'.join(raw_parts))}; rename one"
                )
            raise DatasetError(f"archive has two entries named '{_show(key)}'")
        seen[key] = "/".join(raw_parts)
        if info.flag_bits & 0x1:
            raise DatasetError(f"archive entry '{_show(key)}' is encrypted; upload an unencrypted zip")
        declared += int(info.file_size)
        files.append(_File(raw_parts, parts, key, index, info))

    if declared > limits.max_uncompressed_bytes:
        raise DatasetError(
            f"archive expands to {_human(declared)}, over the limit of "
            f"{_human(limits.max_uncompressed_bytes)}",
            over_limit=True,
        )
    _check_ratio(declared, data_len, limits)

    # One wrapping folder: every file (but a root classes.json) lives under the same first
    # folder, and that folder holds no file directly, only class folders (and perhaps
    # classes.json). Folders without files do not count.
    wrapper: str | None = None
    rooted = [f for f in files if f.parts != [CLASSES_FILE]]
    tops = {f.parts[0] for f in rooted}
    if len(tops) == 1:
        direct = [f for f in rooted if len(f.parts) == 2 and f.parts[1] != CLASSES_FILE]
        deeper = any(len(f.parts) >= 3 for f in rooted)
        if not direct and deeper:
            wrapper = next(iter(tops))
            for f in rooted:
                f.parts, f.raw_parts = f.parts[1:], f.raw_parts[1:]
            dirs = [p[1:] for p in dirs if len(p) > 1 and p[0] == wrapper]
            if sum(1 for f in files if f.parts == [CLASSES_FILE]) > 1:
                raise DatasetError(
                    f"archive has two {CLASSES_FILE} files (at the root and in the wrapping folder); keep one"
                )

    classes_info: zipfile.ZipInfo | None = None
    image_files: list[tuple[str, _File]] = []
    raw_of: dict[str, dict[str, None]] = {}  # class name -> folder names (decoded) that give it
    name_of: dict[str, str] = {}  # folder name (decoded) -> class name
    for f in files:
        if len(f.parts) == 1:
            if f.parts[0] == CLASSES_FILE:
                classes_info = f.info
                continue
            raise DatasetError(
                f"file '{_show(f.name)}' is at the top level of the archive; each image must be "
                f"inside its class folder (e.g. cat/001.jpg); {_found(files, dirs, ignored, wrapper)}"
            )
        raw = f.raw_parts[0]
        if raw not in name_of:
            name_of[raw] = _class_name(raw, f"class folder '{_show(raw)}/'")
        cls = name_of[raw]
        raw_of.setdefault(cls, {})[raw] = None
        image_files.append((cls, f))

    for cls, raws in raw_of.items():
        if len(raws) > 1:
            both = " and ".join(_describe(r) for r in raws)
            raise DatasetError(
                f"class folders {both} are the same class name '{_show(cls)}' once normalised "
                "(Unicode NFC, surrounding whitespace trimmed); rename or merge them"
            )

    if not image_files:
        raise DatasetError(
            "archive has no images; put each class's images in a folder named after the class "
            f"(e.g. cat/001.jpg, dog/002.png); {_found(files, dirs, ignored, wrapper)}"
        )
    if len(raw_of) < 2:
        only = next(iter(raw_of))
        raise DatasetError(
            f"archive has one class only ('{_show(only)}'); a task needs at least 2 class folders with "
            f"images; {_found(files, dirs, ignored, wrapper)}"
        )
    folder_names = sorted(raw_of)
    label_of = {c: i for i, c in enumerate(folder_names)}
    images = [
        ImageEntry(path=f.info.filename, label=label_of[cls], name=f.name, index=f.index) for cls, f in image_files
    ]
    # A folder at the class level without images is a class with no image: refused, since
    # training on the other classes alone is not what the user asked for. Empty folders
    # deeper inside a class folder are only folders, and ignored.
    empty = sorted({d[0] for d in dirs if d and _nfc(d[0]).strip() not in label_of})
    if empty:
        shown = ", ".join(f"'{_show(d)}'" for d in empty[:5])
        raise DatasetError(
            f"class folder {shown} has no images; each class needs at least 1 image (add images or remove "
            f"the folder); {_found(files, dirs, ignored, wrapper)}"
        )
    # hidden folders are ignored like other litter, but one holding files may be a class the
    # user meant (a folder named ".cats"): said, so that it is not dropped without a word
    warnings: list[str] = [
        f"ignored hidden folder '{_show(d)}/' ({n} file{'s' if n != 1 else ''}): names starting with '.' are "
        "treated as hidden files; rename it to use it as a class"
        for d, n in sorted(hidden_dirs.items())
    ]
    manifest = ArchiveManifest(
        classes=list(folder_names),
        folders=folder_names,
        counts={},
        images=images,
        uncompressed_bytes=declared,
        warnings=warnings,
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
            over_limit=True,
        )


def _apply_class_names(zf: zipfile.ZipFile, manifest: ArchiveManifest, info: zipfile.ZipInfo | None,
                       budget: list[int], limits: ArchiveLimits) -> None:
    if info is not None:
        if info.file_size > _MAX_CLASSES_FILE_BYTES:
            raise DatasetError(f"{CLASSES_FILE} is larger than {_human(_MAX_CLASSES_FILE_BYTES)}")
        raw = _read_entry(zf, info, budget, limits, shown=CLASSES_FILE)
        try:
            mapping = json.loads(raw.decode("utf-8-sig"))
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
        # Folder names in classes.json are matched as the folders are: NFC, trimmed.
        names: dict[str, str] = {}
        given: dict[str, str] = {}
        for folder, display in mapping.items():
            key = _nfc(folder).strip()
            if key in given:
                raise DatasetError(
                    f"{CLASSES_FILE} names folder '{_show(key)}' twice ({_describe(given[key])} and "
                    f"{_describe(folder)}) once normalised (Unicode NFC, surrounding whitespace trimmed)"
                )
            given[key] = folder
            if key not in manifest.folders:
                raise DatasetError(
                    f"{CLASSES_FILE} names folder '{_show(folder)}', which is not a class folder of the "
                    f"archive (folders: {_listed([_show(f) for f in manifest.folders])})"
                )
            if not isinstance(display, str) or not display.strip():
                raise DatasetError(
                    f"{CLASSES_FILE}: the display name of folder '{_show(key)}' must be a non-empty string"
                )
            names[key] = _class_name(display, f"{CLASSES_FILE}: the display name '{_show(display)}' of folder '{_show(key)}'")
        manifest.classes = [names.get(f, f) for f in manifest.folders]
    seen: dict[str, str] = {}
    for folder, display in zip(manifest.folders, manifest.classes):
        if display in seen:
            raise DatasetError(
                f"folders '{_show(seen[display])}' and '{_show(folder)}' have the same class name "
                f"'{_show(display)}'; class names must be unique"
            )
        seen[display] = folder
    _count(manifest)


def _count(manifest: ArchiveManifest) -> None:
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


def pixel_digest(img: Image.Image) -> bytes:
    """What identifies a picture: a hash of its decoded pixels (so a copy re-encoded in
    another lossless format is the same picture; one changed pixel is not)."""
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode("ascii"))
    h.update(img.tobytes())
    return h.digest()


def _conflict_message(manifest: ArchiveManifest, conflicts: list[tuple[ImageEntry, ImageEntry]]) -> str:
    pairs = [
        f"'{_show(a.shown)}' (class '{_show(manifest.classes[a.label])}') and "
        f"'{_show(b.shown)}' (class '{_show(manifest.classes[b.label])}')"
        for a, b in conflicts
    ]
    what = "the same image is" if len(pairs) == 1 else f"{len(pairs)} images are"
    return (
        f"{what} stored under two classes: {_listed(pairs)}; an image can have one label only, "
        "remove each copy from the folder it does not belong to"
    )


def _duplicate_warnings(manifest: ArchiveManifest, dropped: dict[int, list[tuple[ImageEntry, ImageEntry]]]) -> list[str]:
    out = []
    for label in sorted(dropped):
        items = [f"{_show(d.shown)} (same as {_show(first.shown)})" for d, first in dropped[label]]
        n = len(items)
        out.append(
            f"dropped {n} duplicate image{'' if n == 1 else 's'} in class "
            f"'{_show(manifest.classes[label])}': {_listed(items)}"
        )
    return out


def iter_archive_images(data: bytes, limits: Any = None) -> tuple[ArchiveManifest, Iterator[tuple[Image.Image, int]]]:
    """The manifest and an iterator of ``(RGB image, label)`` in manifest order.

    The iterator decodes one image at a time (so a caller can preprocess and
    drop each) and raises :class:`DatasetError` naming the first bad file.
    Every image is identified by :func:`pixel_digest`: a repeat within its class is
    skipped (the first copy is kept); the same image under two classes raises
    :class:`DatasetError` naming both files once the iterator reaches its end. When the
    iterator is exhausted, ``manifest.images``/``counts`` hold the kept images only and
    ``manifest.warnings`` says what was dropped.
    """
    zf, manifest, budget, lim = _open_checked(data, limits)

    def gen() -> Iterator[tuple[Image.Image, int]]:
        produced = 0
        first_of: dict[bytes, ImageEntry] = {}
        kept: list[ImageEntry] = []
        dropped: dict[int, list[tuple[ImageEntry, ImageEntry]]] = {}
        conflicts: list[tuple[ImageEntry, ImageEntry]] = []
        try:
            infos = zf.infolist()
            for entry in manifest.images:
                info = infos[entry.index] if entry.index >= 0 else zf.getinfo(entry.path)
                raw = _read_entry(zf, info, budget, lim, shown=entry.shown)
                produced += len(raw)
                _check_ratio(produced, len(data), lim)
                try:
                    img = decode_image(raw, max_pixels=lim.max_image_pixels, name=f"file '{_show(entry.shown)}'")
                except ImageError as exc:
                    raise DatasetError(str(exc), over_limit=exc.over_limit) from None
                del raw
                digest = pixel_digest(img)
                first = first_of.get(digest)
                if first is None:
                    first_of[digest] = entry
                    kept.append(entry)
                    yield img, entry.label
                    continue
                img.close()
                if first.label == entry.label:
                    dropped.setdefault(entry.label, []).append((entry, first))
                else:
                    conflicts.append((first, entry))
            if conflicts:
                raise DatasetError(_conflict_message(manifest, conflicts))
            manifest.images = kept
            _count(manifest)
            manifest.warnings.extend(_duplicate_warnings(manifest, dropped))
        finally:
            zf.close()

    return manifest, gen()


def inspect_archive(data: bytes, limits: Any = None, *, decode_images: bool = True) -> ArchiveManifest:
    """Validate an archive and return its manifest (classes, counts, image entries, warnings).

    With ``decode_images`` (the default) every image is decoded once and
    dropped, so every rejection docs/inputs.md lists is found here, at upload time, and
    duplicates are dropped from the manifest (and reported in its warnings).
    Without it nothing is decoded: counts include duplicates.
    """
    manifest, images = iter_archive_images(data, limits)
    if decode_images:
        for img, _ in images:
            img.close()
    else:
        images.close()  # type: ignore[attr-defined]
    return manifest


def read_archive(data: bytes, limits: Any = None) -> tuple[list[str], list[Image.Image], list[int]]:
    """``(classes, images, labels)``: display class names, RGB images, label per image
    (duplicates within a class once)."""
    manifest, it = iter_archive_images(data, limits)
    images: list[Image.Image] = []
    labels: list[int] = []
    for img, label in it:
        images.append(img)
        labels.append(label)
    return manifest.classes, images, labels
