"""Reading the images of a classify request: multipart ``images`` parts or JSON base64.

Each bad image is a 4xx naming its index (``images[2] ...``), so a client can
tell which of its images was refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from api.errors import ApiError, input_status
from store import textinput
from store.images import ImageError, decode_image

_WS = re.compile(r"\s+")
_URLSAFE = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)


async def read_image_payloads(request: Request, max_images: int) -> list[bytes]:
    """The raw bytes of each image in the request, in order."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except (MultiPartException, HTTPException) as exc:  # starlette wraps the parser's error in a 400
            if str(getattr(exc, "detail", exc)).startswith("Too many files"):  # the same limit, said the same way
                raise ApiError(413, f"more than {max_images} images in one request, over the limit of {max_images}") from None
            raise
        try:
            others = sorted({k for k in form.keys() if k != "images"})
            named = ", ".join(repr(k[:40]) for k in others[:10])
            parts = form.getlist("images")
            if not parts:
                raise ApiError(
                    422, "no images: send one or more multipart file parts named 'images', "
                    'or JSON {"images": ["<base64>", ...]}' + (f" (this request has {named})" if others else "")
                )
            if others:
                raise ApiError(422, _UNKNOWN.format(named))
            _check_count(len(parts), max_images)
            payloads = []
            for i, part in enumerate(parts):
                if not isinstance(part, UploadFile):
                    raise ApiError(422, f"images[{i}] is a text field; send each image as a file part")
                payloads.append(await part.read())
            return payloads
        finally:
            await form.close()
    if ctype in ("application/json", "") or ctype.endswith("+json"):
        raw = await request.body()  # its size is bounded by api.middleware.BodyLimitMiddleware
        try:  # depth, UTF-8 and Unicode bounds first (store.textinput): 422 naming the body
            body: Any = textinput.loads_checked("request body", raw, max_bytes=len(raw))
        except json.JSONDecodeError:
            raise ApiError(422, 'request body is not valid JSON; send {"images": ["<base64>", ...]}') from None
        if not isinstance(body, dict) or not isinstance(body.get("images"), list):
            raise ApiError(422, 'JSON body must be an object {"images": ["<base64>", ...]}')
        others = sorted(k for k in body if k != "images")
        if others:
            raise ApiError(422, _UNKNOWN.format(", ".join(repr(k[:40]) for k in others[:10])))
        items = body["images"]
        if not items:
            raise ApiError(422, "no images: 'images' is an empty list")
        _check_count(len(items), max_images)
        return [_b64(i, item) for i, item in enumerate(items)]
    raise ApiError(
        415,
        f"unsupported content type '{ctype}'; send multipart/form-data with 'images' file parts "
        'or application/json {"images": ["<base64>", ...]}',
    )


#: A classify body carries images only: its options are query parameters, and an option sent in
#: the body would be silently ignored (a threshold not applied is a wrong answer given with 200).
_UNKNOWN = (
    "classify takes only 'images' in its body, not {}; options go in the query string: "
    "?top_k=K&min_score=S&keep=true"
)


def _check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise ApiError(413, f"{n} images in one request, over the limit of {max_images}")


def _b64(i: int, item: Any) -> bytes:
    if not isinstance(item, str):
        raise ApiError(422, f"images[{i}] must be a base64 string")
    text = _WS.sub("", _DATA_URL.sub("", item.strip(), count=1))
    padded = text + "=" * (-len(text) % 4)  # padding is optional
    try:
        if _URLSAFE.fullmatch(text) and ("-" in text or "_" in text):
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"images[{i}] is not valid base64") from None


def decode_images(payloads: list[bytes], max_pixels: int) -> list[Image.Image]:
    """Decode every payload with ``store.images.decode_image`` (upright, first frame, 8-bit
    sRGB RGB; docs/inputs.md "Images") or raise ApiError naming the index: 413 for a size
    limit, 422 for an empty, unaccepted, truncated or damaged image."""
    out = []
    for i, data in enumerate(payloads):
        if not data:
            raise ApiError(422, f"images[{i}] is empty")
        try:
            out.append(decode_image(data, max_pixels=max_pixels, name=f"images[{i}]"))
        except ImageError as exc:
            raise ApiError(input_status(exc), str(exc)) from None
    return out
