"""Decoding one uploaded image: the one function every image goes through, in a dataset
archive and in a classify request.

``decode_image`` turns the bytes into the RGB picture a person sees in an image viewer:

1. The format must be one of :data:`ALLOWED_IMAGE_FORMATS` (PNG, JPEG, WebP, BMP, GIF).
   The size is checked from the header before any pixel is decoded: at most
   ``max_pixels`` pixels and at most :data:`MAX_IMAGE_SIDE` pixels on either side.
   Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) and its metadata
   limits stay on, and truncated files are refused (``ImageFile.LOAD_TRUNCATED_IMAGES``
   stays False).
2. Only the first frame of an animation (GIF, APNG, animated WebP) is decoded.
3. The EXIF Orientation tag (2-8, what phones write) is applied, so a photo stored
   sideways comes out upright; an unreadable EXIF block is ignored (no rotation).
4. :func:`to_rgb` converts the pixels to 8-bit sRGB by one rule, documented there.

Errors raise :class:`ImageError` with a message naming the image and the problem, and
``over_limit`` set for a size limit (the API answers those 413, everything else 422).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import threading
from collections import OrderedDict

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "BACKGROUND",
    "MAX_IMAGE_SIDE",
    "ImageError",
    "decode_image",
    "to_rgb",
]

#: Pillow format names of the image types the service accepts.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_ACCEPTED = "PNG, JPEG, WebP, BMP, GIF"

#: Longest accepted side in pixels, whatever the pixel count. Decoding cost has a part per
#: row (Pillow keeps one pointer per row and decodes row by row): a 1 x 16,000,000 PNG costs
#: about 7 times the memory and 10 times the time of a 4000 x 4000 one. 65536 covers every
#: JPEG (65535 at most), WebP (16383) and GIF (65535).
MAX_IMAGE_SIDE = 65536

#: What transparent pixels are composited over: opaque white, as a viewer on a white page
#: shows them.
BACKGROUND = (255, 255, 255)

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
#: What Pillow raises for a file it cannot open or decode (other than UnidentifiedImageError).
_PILLOW_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error)
_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")


class ImageError(ValueError):
    """One image cannot be used (undecodable, damaged, or over a size limit).

    ``over_limit``: the image is over a size limit rather than damaged; the message names the image.
    """

    def __init__(self, message: str, *, over_limit: bool = False) -> None:
        super().__init__(message)
        self.over_limit = over_limit


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode one uploaded image to the upright 8-bit RGB picture a viewer shows.

    ``data``: the file's bytes. ``max_pixels``: the largest width * height accepted.
    ``name``: how messages name the image (e.g. ``images[2]``, ``file 'cat/a.png'``).
    Returns a loaded ``RGB`` image, EXIF orientation applied, first frame of an
    animation, pixels converted by :func:`to_rgb`.

    Raises :class:`ImageError` naming ``name``:
    413 when the image has more than ``max_pixels`` pixels, a side longer than
    :data:`MAX_IMAGE_SIDE`, or more pixels than Pillow's decompression-bomb guard allows;
    422 when the bytes are not a PNG, JPEG, WebP, BMP or GIF image, are truncated, carry
    metadata (text chunks, colour profile) over Pillow's safety limits, or are corrupt.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(name, max_pixels, exc) from None
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt is not None:
            raise ImageError(
                f"{name} starts like a {fmt} file but its header cannot be read (the file is truncated "
                f"or corrupt)"
            ) from None
        raise ImageError(f"{name} is not a decodable image (accepted: {_ACCEPTED})") from None
    except _PILLOW_ERRORS as exc:
        raise _explain(name, exc, img_format=_sniff(data)) from None
    result: Image.Image | None = None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"{name} has an empty size ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(
                f"{name} is {width}x{height} = {width * height} pixels, over the pixel limit of "
                f"{max_pixels} pixels",
                over_limit=True,
            )
        if max(width, height) > MAX_IMAGE_SIDE:
            raise ImageError(
                f"{name} is {width}x{height} pixels; its longer side is over the limit of "
                f"{MAX_IMAGE_SIDE} pixels",
                over_limit=True,
            )
        try:
            img.load()  # the first frame: an image opens on frame 0 and nothing seeks further
            result = to_rgb(_apply_orientation(img))
            return result
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise _bomb_error(name, max_pixels, exc) from None
        except MemoryError:
            raise ImageError(f"{name} is too large to decode", over_limit=True) from None
        except _PILLOW_ERRORS as exc:
            raise _explain(name, exc, img_format=img.format) from None
    finally:
        if result is not img:  # a plain RGB file is returned as decoded: keep it open
            img.close()


def _apply_orientation(img: Image.Image) -> Image.Image:
    """``img`` turned by its EXIF Orientation (2-8); itself when there is none or the EXIF
    cannot be read."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # a damaged EXIF block: show the pixels as stored, as viewers do
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    return ImageOps.exif_transpose(img)


def _sniff(data: bytes) -> str | None:
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _bomb_error(name: str, max_pixels: int, exc: Exception) -> ImageError:
    guard = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else max_pixels
    limit = min(max_pixels, guard)
    m = _BOMB_SIZE.search(str(exc))
    size = f" is {m.group(1)} pixels," if m else " is"
    return ImageError(f"{name}{size} over the pixel limit of {limit} pixels", over_limit=True)


def _explain(name: str, exc: Exception, *, img_format: str | None) -> ImageError:
    """The ImageError for an exception Pillow raised while opening or decoding."""
    text = str(exc)
    low = text.lower()
    if "max_text_chunk" in low or "max_text_memory" in low or "decompressed data too large" in low:
        return ImageError(
            f"{name} carries metadata (a text chunk or an embedded colour profile) larger than the "
            f"decoder's safety limit of {PngImagePlugin.MAX_TEXT_CHUNK} bytes per chunk and "
            f"{PngImagePlugin.MAX_TEXT_MEMORY} bytes in all; remove the metadata and send it again"
        )
    if isinstance(exc, EOFError) or "truncated" in low or isinstance(exc, struct.error):
        return ImageError(f"{name} is truncated: the file ends before the image is complete")
    fmt = {"WEBP": "WebP"}.get(img_format or "", img_format)
    what = f"a damaged {fmt} image" if fmt else "a damaged image"
    return ImageError(f"{name} is {what}: its data is corrupt and cannot be decoded")


# ---------------------------------------------------------------- the mode rule

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_PROFILE_SPACES = {"RGB ": ("RGB", "RGBA"), "GRAY": ("L", "LA"), "CMYK": ("CMYK",)}
_TRANSFORMS: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
_TRANSFORMS_LOCK = threading.Lock()
_TRANSFORMS_KEEP = 32
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit sRGB ``RGB``, by one rule.

    - Bit depth. 8-bit modes are taken as they are. 16-bit samples (modes ``I;16``,
      ``I;16B``, ``I;16L``, ``I;16N``: what a 16-bit greyscale PNG opens as) keep their high
      byte, ``v // 256`` (0 -> 0, 65535 -> 255), which is also what Pillow does itself when it
      opens a 16-bit colour PNG. Mode ``I`` (32-bit signed): when every value is in
      0..65535 it is 16-bit data and follows the same rule; otherwise the image's own range
      is stretched linearly, ``round((v - min) * 255 / (max - min))``. Mode ``F`` (float):
      when every finite value is in 0..1, ``round(v * 255)``; otherwise stretched from its
      own finite min..max like ``I``; NaN and -inf become 0, +inf 255. Nothing is clamped:
      the brightest and darkest valid values keep their place at the ends of 0..255.
      ``1`` becomes 0/255.
    - Palettes (``P``, ``PA``) are expanded to their colours.
    - Colour profiles. An embedded ICC profile (``img.info['icc_profile']``) whose colour
      space matches the pixels (RGB, grey or CMYK) is converted to sRGB with LittleCMS
      (Pillow's ImageCms, perceptual intent). A profile that cannot be read or does not
      match the pixels is ignored, and the pixels are taken as sRGB. Without a profile,
      ``CMYK`` uses Pillow's conversion ``R = round((255 - C) * (255 - K) / 255)`` (likewise
      G from M, B from Y), ``YCbCr`` the JPEG (JFIF) equations.
    - Transparency (an alpha channel, a palette's transparent entries, a PNG/GIF
      transparent colour) is composited over :data:`BACKGROUND`, opaque white:
      ``out = round((c * a + 255 * (255 - a)) / 255)``. Premultiplied modes are
      unpremultiplied first.

    Returns a new ``RGB`` image, or ``img`` itself when it already is RGB without a profile
    or transparency. Raises ``ValueError`` for a mode Pillow cannot convert to RGB.
    """
    icc = img.info.get("icc_profile") or None
    mode = img.mode
    if mode == "RGB" and icc is None and "transparency" not in img.info:
        return img
    base = _eight_bit(img)  # L, LA, RGB, RGBA or CMYK
    if icc is not None:
        base = _apply_profile(base, icc)
    if base.mode == "CMYK":
        base = base.convert("RGB")
    if base.mode in ("LA", "RGBA"):
        rgba = base.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return base.convert("RGB")


def _eight_bit(img: Image.Image) -> Image.Image:
    """``img`` as one of L, LA, RGB, RGBA, CMYK (8 bits per channel), info kept."""
    mode = img.mode
    transparency = img.info.get("transparency")
    if mode in ("L", "LA", "RGBA", "CMYK"):
        out = img if transparency is None or mode != "L" else img.convert("LA")
    elif mode == "RGB":
        out = img if transparency is None else img.convert("RGBA")
    elif mode == "1":
        out = img.convert("L")
        if transparency is not None:
            alpha = np.where(np.asarray(out) == (255 if transparency else 0), 0, 255).astype(np.uint8)
            out = Image.merge("LA", (out, Image.fromarray(alpha, "L")))
    elif mode in ("P", "PA"):
        palette_alpha = img.palette is not None and img.palette.mode == "RGBA"
        out = img.convert("RGBA" if (mode == "PA" or transparency is not None or palette_alpha) else "RGB")
    elif mode in ("La", "RGBa"):
        out = img.convert(mode[0] + "A" if mode == "La" else "RGBA")
    elif mode in _SIXTEEN_BIT or mode in ("I", "F"):
        values = np.asarray(img)
        out = Image.fromarray(_scale_to_8bit(values, mode), "L")
        if transparency is not None and mode != "F":
            alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
            out = Image.merge("LA", (out, Image.fromarray(alpha, "L")))
    else:  # YCbCr, HSV, RGBX and anything else Pillow converts to RGB (LAB: ValueError)
        out = img.convert("RGB")
    if out is not img:
        out.info = {k: v for k, v in img.info.items() if k != "transparency"}
    return out


def _scale_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """The bit-depth rule of :func:`to_rgb` on a 2-D array of one mode -> uint8."""
    if mode in _SIXTEEN_BIT:
        return (values.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I":
        v = values.astype(np.int64)
        lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return (v >> 8).astype(np.uint8)
        return _stretch(v.astype(np.float64), lo, hi)
    v = values.astype(np.float64)
    out = np.zeros(v.shape, np.uint8)  # NaN and -inf stay 0
    finite = np.isfinite(v)
    fv = v[finite]
    lo, hi = (float(fv.min()), float(fv.max())) if fv.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        out[finite] = np.rint(fv * 255.0).astype(np.uint8)
    else:
        out[finite] = _stretch(fv, lo, hi)
    out[np.isposinf(v)] = 255
    return out


def _stretch(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    return np.rint((v - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _apply_profile(img: Image.Image, icc: bytes) -> Image.Image:
    """``img`` (L, LA, RGB, RGBA, CMYK) converted from its profile to sRGB; unchanged
    when the profile is unreadable or its colour space is not the image's."""

    def load() -> ImageCms.ImageCmsProfile:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))

    if img.mode == "LA":
        grey, alpha = img.split()
        t = _cms_transform(icc, "L", load)
        if t is None:
            return img
        return Image.merge("RGBA", (*t.apply(grey).split(), alpha))
    t = _cms_transform(icc, img.mode, load)
    return img if t is None else t.apply(img)


def _cms_transform(key: bytes, mode: str, load) -> ImageCms.ImageCmsTransform | None:  # noqa: ANN001
    """A cached LittleCMS transform from a profile to sRGB for pixels of ``mode``
    (RGBA keeps its alpha), or None when the profile is unreadable or does not fit."""
    cache_key = (hashlib.sha256(key).digest(), mode)
    with _TRANSFORMS_LOCK:
        if cache_key in _TRANSFORMS:
            _TRANSFORMS.move_to_end(cache_key)
            return _TRANSFORMS[cache_key]
    transform: ImageCms.ImageCmsTransform | None = None
    try:
        profile = load()
        if mode in _PROFILE_SPACES.get(profile.profile.xcolor_space, ()):
            out_mode = "RGBA" if mode == "RGBA" else "RGB"
            transform = ImageCms.buildTransform(
                profile, _SRGB, mode, out_mode, renderingIntent=ImageCms.Intent.PERCEPTUAL
            )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        transform = None
    with _TRANSFORMS_LOCK:
        _TRANSFORMS[cache_key] = transform
        while len(_TRANSFORMS) > _TRANSFORMS_KEEP:
            _TRANSFORMS.popitem(last=False)
    return transform

