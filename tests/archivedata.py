"""Dataset archives as real-world tools write them, built in memory for the tests: entry
names given as raw bytes with the zip's UTF-8 flag (0x800) set or not, as macOS Finder,
old Windows tools and Info-ZIP write them (Python's zipfile always sets the flag for a
non-ASCII name, so it cannot write these by itself)."""

from __future__ import annotations

import io
import struct
import unicodedata
import zipfile
import zlib

from PIL import Image


def picture(seed: int = 0, *, size: int = 8, fmt: str = "PNG", tweak: bool = False) -> bytes:
    """A small picture unique to ``seed``, encoded in ``fmt`` (PNG, BMP and lossless WebP
    keep the pixels; JPEG does not). ``tweak`` changes one pixel: a near-miss."""
    img = Image.new("RGB", (size, size), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31 + 40) % 256))
    px = img.load()
    for x in range(size):
        px[x, (x * 3 + seed) % size] = ((x * 37 + seed * 5) % 256, (x * 11 + seed) % 256, 90)
    if tweak:
        r, g, b = px[0, 0]
        px[0, 0] = ((r + 1) % 256, g, b)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


class _RawName(zipfile.ZipInfo):
    """A ZipInfo written with exactly these name bytes and this UTF-8 flag."""

    __slots__ = ("raw_name", "utf8")

    def __init__(self, raw_name: bytes, utf8: bool) -> None:
        super().__init__(raw_name.decode("utf-8" if utf8 else "cp437"))
        self.raw_name = raw_name
        self.utf8 = utf8

    def _encodeFilenameFlags(self):  # noqa: N802 - zipfile's own name
        return self.raw_name, (self.flag_bits | 0x800) if self.utf8 else (self.flag_bits & ~0x800)


def unicode_path_extra(header_name: bytes, name: str) -> bytes:
    """The Info-ZIP Unicode Path extra field (0x7075) giving ``name`` for ``header_name``."""
    body = struct.pack("<BI", 1, zlib.crc32(header_name) & 0xFFFFFFFF) + name.encode("utf-8")
    return struct.pack("<HH", 0x7075, len(body)) + body


def raw_zip(entries: list[tuple[bytes, bool, bytes | None]], *, extras: dict[bytes, bytes] | None = None) -> bytes:
    """``(name bytes, utf8 flag, data or None for a folder)`` in order; ``extras`` maps a
    name to the extra field its headers carry."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for raw, utf8, data in entries:
            info = _RawName(raw, utf8)
            if extras and raw in extras:
                info.extra = extras[raw]
            if data is None:
                info.external_attr = 0x10  # MS-DOS folder attribute
                zf.writestr(info, b"")
            else:
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
    return buf.getvalue()


def finder_zip(classes: dict[str, list[bytes]], *, root: str = "Photos") -> bytes:
    """What macOS Finder's "Compress" writes for a folder ``root`` holding one folder per
    class: UTF-8 names in decomposed form (NFD) *without* the UTF-8 flag, folder entries,
    ``__MACOSX/`` AppleDouble files and a ``.DS_Store``."""
    entries: list[tuple[bytes, bool, bytes | None]] = [(f"{root}/".encode(), False, None)]
    for folder, images in classes.items():
        d = nfd(f"{root}/{folder}/")
        entries.append((d.encode("utf-8"), False, None))
        for i, data in enumerate(images):
            entries.append((nfd(f"{root}/{folder}/photo {i}.png").encode("utf-8"), False, data))
        entries.append((nfd(f"{root}/{folder}/.DS_Store").encode("utf-8"), False, b"\x00\x00\x00\x01Bud1"))
    entries.append((f"{root}/.DS_Store".encode(), False, b"\x00\x00\x00\x01Bud1"))
    entries.append(("__MACOSX/".encode(), False, None))
    for folder, images in classes.items():
        for i, _ in enumerate(images):
            entries.append((nfd(f"__MACOSX/{root}/{folder}/._photo {i}.png").encode("utf-8"), False, b"\x00\x05\x16\x07"))
    return raw_zip(entries)
