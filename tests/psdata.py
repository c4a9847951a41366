"""Test data for the API and worker tests: small labelled image zips and images.

Images are the tiny backbone's size (32 px) and carry a class-dependent colour with a
little noise, so that tuning has something to learn and encoded files do not compress
away to nothing.
"""

from __future__ import annotations

import base64
import io
import random
import zipfile

from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (220, 200, 40)]


def image_bytes(label: int = 0, *, seed: int = 0, size: int = 32, fmt: str = "PNG") -> bytes:
    rnd = random.Random(seed * 97 + label)
    base = COLOURS[label % len(COLOURS)]
    img = Image.new("RGB", (size, size), base)
    px = img.load()
    for _ in range(size * 4):
        x, y = rnd.randrange(size), rnd.randrange(size)
        px[x, y] = tuple(max(0, min(255, c + rnd.randint(-60, 60))) for c in base)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_zip(
    entries: dict[str, bytes | None],
    *,
    compression: int = zipfile.ZIP_DEFLATED,
    unix_modes: dict[str, int] | None = None,
) -> bytes:
    """name -> bytes, or None for a folder entry. ``unix_modes`` gives entries a Unix file
    mode (``stat.S_IFLNK | 0o777`` makes a symlink whose target is the entry's bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries.items():
            if data is None:
                zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            elif unix_modes and name in unix_modes:
                info = zipfile.ZipInfo(name)
                info.create_system = 3
                info.external_attr = unix_modes[name] << 16
                zf.writestr(info, data)
            else:  # a fixed time: the same entries make the same bytes (as a re-upload would)
                zf.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data, compress_type=compression)
    return buf.getvalue()


def dataset_zip(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4, *, seed: int = 0) -> bytes:
    entries: dict[str, bytes | None] = {}
    for label, name in enumerate(classes):
        for i in range(per_class):
            fmt = "JPEG" if i % 2 else "PNG"
            entries[f"{name}/{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}"] = image_bytes(label, seed=seed + i, fmt=fmt)
    return make_zip(entries)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
