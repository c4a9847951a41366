"""Classify request input (api/images.py) through HTTP: every accepted image format and
both encodings work; each bad image or body is a 4xx whose detail names the image
(``images[i]``) or the problem, and the service keeps answering."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from apiclient import Api, embedded_settings, running_app
from PIL import Image
from psdata import b64, image_bytes

MAX_IMAGES = 4
MAX_PIXELS = 64 * 64
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def ready_task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, dict[str, str], str]]:
    """An app with small image limits and a ready zeroshot task."""
    settings = embedded_settings(
        tmp_path_factory.mktemp("images"), max_classify_images=MAX_IMAGES, max_image_pixels=MAX_PIXELS
    )
    with running_app(settings) as client:
        api = Api(client)
        tenant = api.tenant("classifier")
        task = api.create_task(tenant, "zeroshot", classes=CLASSES).json()
        api.wait_ready(tenant, task["id"])
        yield api, tenant, task["id"]


def _encoded(fmt: str, size: int = 32, **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def _gif_two_frames() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 30, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def test_every_accepted_format_and_both_encodings(ready_task: tuple[Api, dict[str, str], str]) -> None:
    api, tenant, tid = ready_task
    images = [_encoded("PNG"), _encoded("JPEG"), _encoded("WEBP"), _encoded("BMP")]
    r = api.classify_files(tenant, tid, images, top_k=1)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 4 and all(len(p) == 1 for p in r.json()["predictions"])

    gif = _gif_two_frames()
    as_json = [b64(gif), "data:image/png;base64," + b64(_encoded("PNG")), b64(image_bytes()).rstrip("=")]
    r = api.client.post(f"/v1/tasks/{tid}/classify", json={"images": as_json}, headers=tenant)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all([p["label"] for p in x] and len(x) == len(CLASSES) for x in preds)
    # The GIF is classified on its first (red) frame: the same answer as the red PNG.
    first = Image.open(io.BytesIO(gif)).convert("RGB")
    buf = io.BytesIO()
    first.save(buf, format="PNG")
    r2 = api.client.post(f"/v1/tasks/{tid}/classify", json={"images": [b64(buf.getvalue())]}, headers=tenant)
    assert [p["label"] for p in r2.json()["predictions"][0]] == [p["label"] for p in preds[0]]


@pytest.mark.parametrize(
    ("kind", "payload", "status", "needles"),
    [
        ("files", [image_bytes(), b"definitely not an image"], 422, ("images[1]", "not a decodable image")),
        ("files", [image_bytes(), _encoded("PNG")[:40]], 422, ("images[1]",)),
        ("files", [_encoded("TIFF")], 422, ("images[0]", "PNG, JPEG, WebP, BMP, GIF")),
        ("files", [_encoded("PNG", size=100)], 413, ("images[0]", "pixel limit", str(MAX_PIXELS))),
        ("files", [image_bytes()] * (MAX_IMAGES + 1), 413, (f"more than {MAX_IMAGES} images", f"limit of {MAX_IMAGES}")),
        ("files", [image_bytes()] * (MAX_IMAGES + 2), 413, (f"more than {MAX_IMAGES} images", f"limit of {MAX_IMAGES}")),
        ("files", [b""], 422, ("images[0] is empty",)),
        ("json", {"images": [b64(image_bytes()), "%%% not base64 %%%"]}, 422, ("images[1]", "base64")),
        ("json", {"images": [b64(image_bytes()), 42]}, 422, ("images[1] must be a base64 string",)),
        ("json", {"images": []}, 422, ("empty list",)),
        ("json", {"pictures": [b64(image_bytes())]}, 422, ('{"images"',)),
        ("json", {"images": [b64(image_bytes())] * (MAX_IMAGES + 1)}, 413, (f"limit of {MAX_IMAGES}",)),
        ("raw-json", b"{not json", 422, ("not valid JSON",)),
        ("text", b"hello", 415, ("unsupported content type 'text/plain'",)),
        ("no-parts", None, 422, ("no images",)),
        ("top_k", 0, 422, ("top_k",)),
    ],
    ids=["undecodable", "truncated", "tiff", "over-pixel-limit", "too-many-files", "far-too-many-files", "empty-file", "bad-base64",
         "not-a-string", "empty-list", "wrong-key", "too-many-json", "bad-json", "wrong-content-type",
         "multipart-without-images", "top-k-zero"],  # fmt: skip
)
def test_bad_classify_input_is_a_4xx_naming_the_problem(
    ready_task: tuple[Api, dict[str, str], str], kind: str, payload: Any, status: int, needles: tuple[str, ...]
) -> None:
    api, tenant, tid = ready_task
    url = f"/v1/tasks/{tid}/classify"
    if kind == "files":
        r = api.classify_files(tenant, tid, payload)
    elif kind == "json":
        r = api.client.post(url, json=payload, headers=tenant)
    elif kind == "raw-json":
        r = api.client.post(url, content=payload, headers={**tenant, "Content-Type": "application/json"})
    elif kind == "text":
        r = api.client.post(url, content=payload, headers={**tenant, "Content-Type": "text/plain"})
    elif kind == "no-parts":
        r = api.client.post(url, data={"other": "x"}, files={"file": ("a.png", image_bytes(), "image/png")}, headers=tenant)
    else:
        r = api.client.post(f"{url}?top_k={payload}", json={"images": [b64(image_bytes())]}, headers=tenant)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"detail"}
    for needle in needles:
        assert needle in r.json()["detail"], r.json()
    # The service keeps answering.
    ok = api.client.post(url, json={"images": [b64(image_bytes())]}, headers=tenant)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("orientation", [6, 3, 8])
def test_a_phone_photo_is_classified_upright(ready_task: tuple[Api, dict[str, str], str], orientation: int) -> None:
    """A JPEG stored sideways with EXIF Orientation (what phones write) scores, over HTTP, as
    the upright picture a viewer shows, not as its stored pixels."""
    import numpy as np

    api, tenant, task_id = ready_task
    rng = np.random.default_rng(orientation)
    y, x = np.mgrid[0:24, 0:48]
    stored = np.clip(np.stack([x * 5, y * 10, (x + y) * 3], -1) + rng.normal(0, 25, (24, 48, 3)), 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored.astype(np.uint8)).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    phone = buf.getvalue()
    with Image.open(io.BytesIO(phone)) as raw:
        pixels = np.asarray(raw.convert("RGB"))  # the stored pixels, as decoded
    turn = {3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}[orientation]
    as_seen, sideways = (io.BytesIO(), io.BytesIO())
    Image.fromarray(np.ascontiguousarray(turn(pixels))).save(as_seen, format="PNG")
    Image.fromarray(pixels).save(sideways, format="PNG")
    r = api.classify_files(tenant, task_id, [phone, as_seen.getvalue(), sideways.getvalue()])
    assert r.status_code == 200, r.text
    got, want, stored_scores = ({p["label"]: p["score"] for p in preds} for preds in r.json()["predictions"])
    assert max(abs(got[c] - want[c]) for c in CLASSES) <= 1e-5
    if orientation != 3:  # a half turn of a near-symmetric picture may score alike; a quarter turn does not
        assert max(abs(stored_scores[c] - want[c]) for c in CLASSES) > 1e-6
