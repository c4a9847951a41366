"""Real-world images through decode + Backbone.preprocess (+ forward): an EXIF-rotated photo
scores like the upright one, and an extreme strip costs a small multiple of a square image
(counted in pixels materialised and in peak RSS, never in seconds)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.loading import PLAIN_ASPECT_LIMIT, load_backbone
from store.images import decode_image

RNG = np.random.default_rng(11)
LIMIT = 4096 * 4096


def encode(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def photo(h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth gradients plus noise: an image whose features change when it is turned."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    return np.clip(base + RNG.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def scores(bb, images: list[Image.Image]) -> torch.Tensor:
    """Zero-shot scores (n, 3): 100 * cosine of image and class-text embeddings."""
    with torch.no_grad():
        x = bb.preprocess_batch(images)
        img = torch.nn.functional.normalize(bb.model.encode_image(x).float(), dim=-1)
        txt = torch.nn.functional.normalize(bb.encode_text(["red", "green", "blue"]).float(), dim=-1)
    return 100 * img @ txt.T


#: What a viewer shows for stored pixels with EXIF Orientation o (see tests/store/test_images.py).
DISPLAY = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize(("fmt", "orientation"), [("JPEG", 6), ("JPEG", 3), ("JPEG", 8), ("PNG", 2), ("PNG", 6)])
def test_exif_rotated_photo_scores_like_the_upright_one(tiny, fmt: str, orientation: int) -> None:
    stored = photo()
    data = encode(Image.fromarray(stored), fmt, exif=exif_bytes(orientation), **({"quality": 92} if fmt == "JPEG" else {}))
    with Image.open(io.BytesIO(data)) as raw:
        pixels = np.asarray(raw.convert("RGB"))  # the stored (sideways) pixels as decoded
    upright = encode(Image.fromarray(np.ascontiguousarray(DISPLAY[orientation](pixels))), "PNG")
    rotated, reference = (decode_image(d, max_pixels=LIMIT, name="photo") for d in (data, upright))
    got, want = scores(tiny, [rotated, reference])
    assert (got - want).abs().max().item() <= 1e-5
    # ...while the sideways pixels (what used to be scored) score differently.
    sideways = scores(tiny, [Image.fromarray(pixels)])[0]
    assert (sideways - want).abs().max().item() > 1e-3


# ---------------------------------------------------------------- cost of extreme aspect ratios


@contextmanager
def materialised() -> Iterator[list[int]]:
    """Counts the pixels of every image Pillow creates (resize, crop, convert, transpose...)."""
    counts: list[int] = []
    original = Image.Image._new

    def spy(self, im):  # noqa: ANN001
        counts.append(im.size[0] * im.size[1])
        return original(self, im)

    Image.Image._new = spy  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        Image.Image._new = original  # type: ignore[method-assign]


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    raise OSError("no VmHWM")


def peak_rss_growth_kib(fn) -> int:  # noqa: ANN001
    """Peak RSS reached while ``fn()`` runs, over the RSS before (Linux: reset with clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _hwm_kib()
    except OSError as exc:
        pytest.skip(f"peak RSS cannot be reset here ({exc})")
    fn()
    return _hwm_kib() - base


def cost(bb, data: bytes) -> tuple[int, int]:
    """(pixels materialised, peak RSS growth KiB) of decode + preprocess of one file."""

    def run() -> None:
        img = decode_image(data, max_pixels=LIMIT, name="strip")
        x = bb.preprocess(img)
        assert x.shape == (3, bb.image_size, bb.image_size)

    run()  # warm up: allocator arenas, lazy imports
    with materialised() as counts:
        run()
    return sum(counts), peak_rss_growth_kib(run)


STRIPS = [(65536, 1), (1, 65536), (20000, 3)]


@pytest.mark.parametrize("spec", ["open_clip:tiny:random", "timm:vit_tiny_patch16_224:random"])
def test_extreme_strip_costs_a_small_multiple_of_a_square_image(spec: str) -> None:
    bb = load_backbone(spec, "cpu")
    square_px, square_rss = cost(bb, encode(Image.fromarray(photo(256, 256)), "PNG"))  # 65536 pixels
    for size in STRIPS:
        strip = np.broadcast_to(photo(1, 256)[0, :1], (size[1], size[0], 3)).copy()
        strip[..., 0] = (np.arange(size[0])[None, :] * 7 + np.arange(size[1])[:, None] * 13) % 256
        px, rss = cost(bb, encode(Image.fromarray(strip), "PNG"))
        assert px <= 4 * square_px, (size, px, square_px)
        assert rss <= 4 * square_rss + 16 * 1024, (size, rss, square_rss)  # KiB
    # The library's own resize-then-crop materialises S x (S * aspect) for such a strip.
    img = Image.new("RGB", (20000, 3))
    with materialised() as counts:
        bb._preprocess_fn(img)
    assert sum(counts) > 20 * square_px


@pytest.mark.parametrize("spec", ["open_clip:tiny:random", "timm:vit_tiny_patch16_224:random"])
def test_ordinary_images_are_the_library_transform_bit_for_bit(spec: str) -> None:
    bb = load_backbone(spec, "cpu")
    side = 2 * bb.image_size
    shapes = [(side, side), (int(side * PLAIN_ASPECT_LIMIT), side), (side, int(side * PLAIN_ASPECT_LIMIT)),
              (301, 200), (200, 301), (640, 480), (480, 640), (40, 23)]  # fmt: skip
    for w, h in shapes:
        img = Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = bb._preprocess_fn(img).to(torch.float32)
        assert torch.equal(bb.preprocess(img), want), (w, h)  # numpy path
        assert torch.equal(bb._bounded_fn(img).to(torch.float32), want), (w, h)  # library path


@pytest.mark.parametrize("spec", ["open_clip:tiny:random", "timm:vit_tiny_patch16_224:random"])
def test_elongated_images_give_nearly_the_library_tensor(spec: str) -> None:
    bb = load_backbone(spec, "cpu")
    std = torch.as_tensor(bb._fast_preprocess.std).reshape(3, 1, 1)
    for w, h in [(1000, 100), (100, 1000), (2000, 150), (13, 997), (997, 13), (450, 200)]:
        img = Image.fromarray(photo(h, w))
        want = bb._preprocess_fn(img).to(torch.float32)  # uncropped: still affordable at 10:1
        for got in (bb.preprocess(img), bb._bounded_fn(img).to(torch.float32)):
            levels = ((got - want) * std * 255).abs()  # in 8-bit levels
            assert levels.max().item() <= 2.01 and levels.mean().item() <= 0.5, (w, h, levels.max().item())
    batch = bb.preprocess_batch([Image.fromarray(photo(10, 600)), Image.fromarray(photo(50, 50))])
    assert batch.shape == (2, 3, bb.image_size, bb.image_size)
