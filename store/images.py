"""Decoding one uploaded image: the one function every image goes through, in a dataset
archive and in a classify request.

Errors raise :class:`ImageError` with a message naming the image and a ``status_code``
(413 for size limits, 422 for everything else).
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

__all__ = ["ALLOWED_IMAGE_FORMATS", "ImageError", "decode_image"]

#: Pillow format names of the image types the service accepts.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class ImageError(ValueError):
    """One image cannot be used (undecodable or over the pixel limit)."""

    def __init__(self, message: str, *, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode one uploaded image to RGB (first frame for GIF), checking the pixel
    limit from the header before any pixel data is decoded.

    Raises :class:`ImageError` naming ``name`` when the bytes are not a PNG, JPEG,
    WebP, BMP or GIF image, or when the image has more than ``max_pixels`` pixels.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name} is over the pixel limit of {max_pixels} pixels", status_code=413
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ImageError(
            f"{name} is not a decodable image (accepted: PNG, JPEG, WebP, BMP, GIF)"
        ) from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"{name} has an empty size ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(
                f"{name} is {width}x{height} = {width * height} pixels, over the pixel limit of "
                f"{max_pixels} pixels",
                status_code=413,
            )
        try:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            rgb = img.convert("RGB")
        except Image.DecompressionBombError:
            raise ImageError(
                f"{name} is over the pixel limit of {max_pixels} pixels", status_code=413
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError):
            raise ImageError(
                f"{name} is not a decodable image (its data is truncated or corrupt)"
            ) from None
        return rgb
    finally:
        img.close()
