"""store/images.py: every image is decoded as a viewer shows it (EXIF orientation, first
frame, one documented mode rule, colour profiles), and each Pillow refusal gets a message
naming its reason. Every input is built here; references are written here with numpy."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from store.images import BACKGROUND, MAX_IMAGE_SIDE, ImageError, decode_image, to_rgb

BIG = 10**9
RNG = np.random.default_rng(7)


def u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    img = decode_image(data, max_pixels=BIG, name="img")
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int64)


# ---------------------------------------------------------------- references (the documented rule)


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """round((c * a + 255 * (255 - a)) / 255) per channel; colour (..., 3), alpha (...)."""
    c = colour.astype(np.int64)
    a = alpha.astype(np.int64)[..., None]
    bg = np.array(BACKGROUND, dtype=np.int64)
    return (c * a + bg * (255 - a) + 127) // 255


def grey3(v: np.ndarray) -> np.ndarray:
    return np.repeat(v.astype(np.int64)[..., None], 3, axis=-1)


def palette_of(img: Image.Image) -> np.ndarray:
    return np.array(img.getpalette("RGB"), dtype=np.int64).reshape(-1, 3)


def ref_cmyk(cmyk: np.ndarray) -> np.ndarray:
    c = cmyk.astype(np.int64)
    return ((255 - c[..., :3]) * (255 - c[..., 3:]) + 127) // 255


def ref_16bit(v: np.ndarray) -> np.ndarray:
    return grey3(v.astype(np.int64) // 256)


def ref_stretch(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return grey3(np.rint((v - v.min()) * 255.0 / (v.max() - v.min())))


# ---------------------------------------------------------------- to_rgb, mode by mode


def _mode_cases() -> list[tuple[str, Callable[[], tuple[Image.Image, np.ndarray]]]]:
    def one():
        bits = RNG.integers(0, 2, (9, 11)).astype(bool)
        return Image.fromarray(bits), grey3(bits * 255)

    def grey():
        v = u8(9, 11)
        return Image.fromarray(v, "L"), grey3(v)

    def grey_alpha():
        v = u8(9, 11, 2)
        return Image.fromarray(v, "LA"), over_white(grey3(v[..., 0]), v[..., 1])

    def palette():
        idx = RNG.integers(0, 16, (9, 11)).astype(np.uint8)
        img = Image.fromarray(idx, "P")
        img.putpalette(u8(16 * 3).tolist())
        return img, palette_of(img)[idx]

    def palette_transparent_index():
        img, ref = palette()
        img.info["transparency"] = 3
        idx = np.asarray(img)
        return img, np.where((idx == 3)[..., None], np.array(BACKGROUND), ref)

    def palette_alpha_per_entry():
        img, ref = palette()
        alphas = u8(16)
        img.info["transparency"] = alphas.tobytes()
        return img, over_white(ref, alphas[np.asarray(img)])

    def rgba():
        v = u8(9, 11, 4)
        return Image.fromarray(v, "RGBA"), over_white(v[..., :3], v[..., 3])

    def rgb_colour_key():
        v = u8(9, 11, 3)
        v[2, 3] = (10, 20, 30)
        img = Image.fromarray(v, "RGB")
        img.info["transparency"] = (10, 20, 30)
        key = (v == (10, 20, 30)).all(axis=-1)
        return img, np.where(key[..., None], np.array(BACKGROUND), v.astype(np.int64))

    def cmyk():
        v = u8(9, 11, 4)
        return Image.fromarray(v, "CMYK"), ref_cmyk(v)

    def ycbcr():
        v = u8(9, 11, 3).astype(np.float64)
        y, cb, cr = v[..., 0], v[..., 1] - 128, v[..., 2] - 128
        rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
        return Image.fromarray(v.astype(np.uint8), "YCbCr"), np.clip(np.rint(rgb), 0, 255)

    def sixteen_bit():
        v = RNG.integers(0, 65536, (9, 11)).astype(np.uint16)
        v[0, :3] = (0, 65535, 32768)  # the ends stay at the ends: nothing clamps
        return Image.fromarray(v), ref_16bit(v)

    def int32_in_16bit_range():
        v = RNG.integers(0, 65536, (9, 11)).astype(np.int32)
        v[0, 0] = 65535
        return Image.fromarray(v, "I"), ref_16bit(v)

    def int32_signed():
        v = RNG.integers(-100_000, 300_000, (9, 11)).astype(np.int32)
        return Image.fromarray(v, "I"), ref_stretch(v)

    def float_unit():
        v = RNG.random((9, 11)).astype(np.float32)
        v[0, :2] = (0.0, 1.0)
        return Image.fromarray(v, "F"), grey3(np.rint(v.astype(np.float64) * 255))

    def float_wide():
        v = (RNG.random((9, 11)) * 40 - 7).astype(np.float32)
        return Image.fromarray(v, "F"), ref_stretch(v)

    return [
        ("1", one), ("L", grey), ("LA", grey_alpha), ("P", palette),
        ("P+transparent-index", palette_transparent_index), ("P+alpha-per-entry", palette_alpha_per_entry),
        ("RGBA", rgba), ("RGB+colour-key", rgb_colour_key), ("CMYK", cmyk), ("YCbCr", ycbcr),
        ("I;16", sixteen_bit), ("I-16bit-range", int32_in_16bit_range), ("I-signed", int32_signed),
        ("F-unit", float_unit), ("F-wide", float_wide),
    ]  # fmt: skip


@pytest.mark.parametrize("make", [m for _, m in _mode_cases()], ids=[n for n, _ in _mode_cases()])
def test_to_rgb_follows_the_documented_rule_per_mode(make) -> None:
    img, ref = make()
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    diff = np.abs(np.asarray(out).astype(np.int64) - ref)
    assert diff.max() <= (1 if img.mode == "YCbCr" else 0), (img.mode, diff.max())


def test_to_rgb_float_non_finite_values() -> None:
    v = np.array([[0.0, 0.5, np.nan, np.inf, -np.inf, 1.0]], dtype=np.float32)
    out = np.asarray(to_rgb(Image.fromarray(v, "F")))[0, :, 0]
    assert out.tolist() == [0, 128, 0, 255, 0, 255]


def test_plain_rgb_is_returned_as_is() -> None:
    img = Image.fromarray(u8(4, 5, 3), "RGB")
    assert to_rgb(img) is img


# ---------------------------------------------------------------- real files, through decode_image


def _file_cases() -> list[tuple[str, Callable[[], tuple[bytes, np.ndarray]]]]:
    cases = {n: m for n, m in _mode_cases()}

    def png(name: str, **save):
        def make():
            img, ref = cases[name]()
            return encode(img, "PNG", **save), ref

        return make

    def png_with_trns(name: str):
        def make():
            img, ref = cases[name]()
            return encode(img, "PNG", transparency=img.info["transparency"]), ref

        return make

    def png_grey_key():
        v = u8(9, 11)
        v[1, 1] = 77
        ref = np.where((v == 77)[..., None], np.array(BACKGROUND), grey3(v))
        return encode(Image.fromarray(v, "L"), "PNG", transparency=77), ref

    def jpeg_cmyk():
        data = encode(Image.fromarray(u8(16, 24, 4), "CMYK"), "JPEG", quality=95)
        with Image.open(io.BytesIO(data)) as raw:  # the stored CMYK samples, decoded as Pillow does
            assert raw.mode == "CMYK"
            return data, ref_cmyk(np.asarray(raw))

    def jpeg_grey():
        data = encode(Image.fromarray(u8(16, 24), "L"), "JPEG", quality=95)
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.mode == "L"
            return data, grey3(np.asarray(raw))

    def bmp_palette():
        img, ref = cases["P"]()
        return encode(img, "BMP"), ref

    def bmp_one():
        img, ref = cases["1"]()
        return encode(img, "BMP"), ref

    def webp_rgba_lossless():
        img, ref = cases["RGBA"]()
        return encode(img, "WEBP", lossless=True, exact=True), ref

    def gif_transparent():
        img, ref = cases["P+transparent-index"]()
        return encode(img, "GIF", transparency=3), ref

    return [
        ("png-1", png("1")), ("png-L", png("L")), ("png-LA", png("LA")), ("png-P", png("P")),
        ("png-P+tRNS-index", png_with_trns("P+transparent-index")),
        ("png-P+tRNS-alphas", png_with_trns("P+alpha-per-entry")), ("png-RGBA", png("RGBA")),
        ("png-RGB+tRNS", png_with_trns("RGB+colour-key")), ("png-L+tRNS", png_grey_key),
        ("png-I;16", png("I;16")), ("jpeg-CMYK", jpeg_cmyk), ("jpeg-L", jpeg_grey),
        ("bmp-P", bmp_palette), ("bmp-1", bmp_one), ("webp-RGBA", webp_rgba_lossless),
        ("gif-transparent", gif_transparent),
    ]  # fmt: skip


@pytest.mark.parametrize("make", [m for _, m in _file_cases()], ids=[n for n, _ in _file_cases()])
def test_decoded_file_follows_the_documented_rule(make) -> None:
    data, ref = make()
    assert np.array_equal(decoded(data), ref)


def _animation(fmt: str) -> tuple[bytes, np.ndarray]:
    frames = [Image.fromarray(np.full((12, 10, 3), c, np.uint8)) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with Image.open(io.BytesIO(data)) as probe:
        assert getattr(probe, "n_frames", 1) == 3, "the test file must be animated"
    return data, np.asarray(frames[0]).astype(np.int64)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_decodes_its_first_frame(fmt: str) -> None:
    data, first = _animation(fmt)
    out = decoded(data)
    assert np.abs(out - first).max() <= (2 if fmt == "GIF" else 0)  # GIF: a 256-colour palette


# ---------------------------------------------------------------- EXIF orientation

#: What a viewer shows for stored pixels ``a`` (H, W, 3) with EXIF Orientation o, written
#: from the EXIF definition of where row 0 and column 0 of the stored image go.
DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1, :],  # mirrored upside down
    5: lambda a: a.transpose(1, 0, 2),  # row 0 is the left side, column 0 the top
    6: lambda a: np.rot90(a, -1),  # row 0 is the right side: turn clockwise (phones)
    7: lambda a: np.rot90(a, -1)[::-1],  # row 0 is the right side, column 0 the bottom
    8: lambda a: np.rot90(a, 1),  # row 0 is the left side, column 0 the bottom
}


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", sorted(DISPLAY))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    stored = u8(6, 10, 3)
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(Image.fromarray(stored), fmt, exif=exif_bytes(orientation), **extra)
    assert np.array_equal(decoded(data), DISPLAY[orientation](stored))


@pytest.mark.parametrize("orientation", [3, 6, 8, 2])
def test_phone_jpeg_with_exif_orientation_comes_out_upright(orientation: int) -> None:
    data = encode(Image.fromarray(u8(16, 24, 3)), "JPEG", quality=90, exif=exif_bytes(orientation))
    with Image.open(io.BytesIO(data)) as raw:
        stored = np.asarray(raw.convert("RGB"))
    out = decoded(data)
    assert np.array_equal(out, DISPLAY[orientation](stored))
    assert out.shape[:2] == ((24, 16) if orientation in (5, 6, 7, 8) else (16, 24))


def test_orientation_keeps_transparency_and_profile() -> None:
    v = u8(6, 10, 4)
    data = encode(Image.fromarray(v, "RGBA"), "PNG", exif=exif_bytes(6))
    assert np.array_equal(decoded(data), DISPLAY[6](over_white(v[..., :3], v[..., 3])))


def test_unreadable_exif_is_ignored() -> None:
    stored = u8(6, 10, 3)
    data = encode(Image.fromarray(stored), "PNG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert np.array_equal(decoded(data), stored)


# ---------------------------------------------------------------- colour profiles


def srgb_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def swapped_primaries_profile() -> bytes:
    """sRGB with its red and blue primaries swapped (the rXYZ and bXYZ tags trade places):
    a pixel (r, g, b) in this space is (b, g, r) in sRGB."""
    data = bytearray(srgb_bytes())
    count = struct.unpack_from(">I", data, 128)[0]
    entries = {struct.unpack_from(">4s", data, 132 + 12 * i)[0]: 132 + 12 * i for i in range(count)}
    r, b = entries[b"rXYZ"], entries[b"bXYZ"]
    r_off, b_off = data[r + 4 : r + 12], data[b + 4 : b + 12]
    data[r + 4 : r + 12], data[b + 4 : b + 12] = b_off, r_off
    data[84:100] = bytes(16)  # no profile ID: it is optional
    return bytes(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_embedded_profile_is_converted_to_srgb(fmt: str) -> None:
    img = Image.fromarray(u8(16, 24, 3))
    extra = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    plain = encode(img, fmt, **extra)
    with Image.open(io.BytesIO(plain)) as raw:
        stored = np.asarray(raw.convert("RGB")).astype(np.int64)
    swapped = decoded(encode(img, fmt, icc_profile=swapped_primaries_profile(), **extra))
    assert np.abs(swapped - stored[..., ::-1]).max() <= 1  # LittleCMS rounding
    same = decoded(encode(img, fmt, icc_profile=srgb_bytes(), **extra))
    assert np.abs(same - stored).max() <= 1


def test_rgba_with_profile_keeps_alpha_then_composites() -> None:
    v = u8(8, 8, 4)
    out = decoded(encode(Image.fromarray(v, "RGBA"), "PNG", icc_profile=swapped_primaries_profile()))
    assert np.abs(out - over_white(v[..., 2::-1], v[..., 3])).max() <= 1


@pytest.mark.parametrize("profile", [b"not a profile at all", "srgb-on-grey"])
def test_unusable_profile_is_ignored(profile) -> None:
    v = u8(8, 8)
    icc = srgb_bytes() if profile == "srgb-on-grey" else profile
    assert np.array_equal(decoded(encode(Image.fromarray(v, "L"), "PNG", icc_profile=icc)), grey3(v))


# ---------------------------------------------------------------- refusals, each naming its reason


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height; no pixel data follows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    )  # fmt: skip


def refused(data: bytes, max_pixels: int = BIG) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=max_pixels, name="images[3]")
    msg = str(info.value)
    assert "images[3]" in msg and "Traceback" not in msg and "/" not in msg.replace("PNG/", "")
    return info.value


def test_pillow_bomb_guard_names_the_pixel_limit() -> None:
    err = refused(png_header_only(20_000, 20_000))  # over twice Image.MAX_IMAGE_PIXELS
    assert err.over_limit
    assert "400000000 pixels" in str(err) and f"pixel limit of {2 * Image.MAX_IMAGE_PIXELS}" in str(err)


def test_over_the_pixel_limit_from_the_header() -> None:
    err = refused(png_header_only(300, 300), max_pixels=10_000)
    assert err.over_limit and "300x300" in str(err) and "pixel limit of 10000" in str(err)


@pytest.mark.parametrize("size", [(MAX_IMAGE_SIDE + 1, 1), (1, MAX_IMAGE_SIDE + 1)])
def test_longer_side_limit(size: tuple[int, int]) -> None:
    err = refused(encode(Image.new("L", size), "PNG"))
    assert err.over_limit and f"limit of {MAX_IMAGE_SIDE} pixels" in str(err)


@pytest.mark.parametrize("size", [(65536, 1), (1, 65536), (20000, 3)])
def test_strips_within_the_limits_decode(size: tuple[int, int]) -> None:
    data = encode(Image.new("L", size, 90), "PNG")
    img = decode_image(data, max_pixels=4096 * 4096, name="strip")
    assert img.mode == "RGB" and img.size == size


def noisy_png(size: int = 64) -> bytes:
    return encode(Image.fromarray(u8(size, size, 3)), "PNG")


@pytest.mark.parametrize(
    "data",
    [noisy_png()[: len(noisy_png()) // 2], encode(Image.fromarray(u8(64, 64, 3)), "JPEG")[:-400],
     encode(Image.fromarray(u8(64, 64, 3)), "GIF")[:-300]],
    ids=["png", "jpeg", "gif"],
)  # fmt: skip
def test_truncated_file_says_truncated(data: bytes) -> None:
    err = refused(data)
    assert not err.over_limit and "is truncated" in str(err)


def test_cut_in_the_header_names_the_format() -> None:
    err = refused(noisy_png()[:40])
    assert not err.over_limit and "PNG" in str(err) and "truncated or corrupt" in str(err)


def test_oversized_text_chunk_names_the_metadata_limit() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (2 * PngImagePlugin.MAX_TEXT_CHUNK), zip=True)
    err = refused(encode(Image.new("RGB", (4, 4)), "PNG", pnginfo=info))
    assert not err.over_limit and "metadata" in str(err) and str(PngImagePlugin.MAX_TEXT_CHUNK) in str(err)


def test_oversized_colour_profile_names_the_metadata_limit() -> None:
    data = encode(Image.new("RGB", (4, 4)), "PNG", icc_profile=b"\0" * (2 * PngImagePlugin.MAX_TEXT_CHUNK))
    err = refused(data)
    assert not err.over_limit and "metadata" in str(err) and "colour profile" in str(err)


def test_unknown_format_lists_the_accepted_ones() -> None:
    err = refused(b"definitely not an image")
    assert not err.over_limit and "not a decodable image (accepted: PNG, JPEG, WebP, BMP, GIF)" in str(err)
    tiff = refused(encode(Image.new("RGB", (4, 4)), "TIFF"))
    assert "accepted: PNG, JPEG, WebP, BMP, GIF" in str(tiff)


def test_corrupt_pixel_data_says_damaged() -> None:
    data = bytearray(noisy_png())
    pos = data.find(b"IDAT") + 8
    data[pos : pos + 40] = b"\xff" * 40  # the zlib stream no longer inflates
    err = refused(bytes(data))
    assert not err.over_limit and ("damaged PNG" in str(err) or "truncated" in str(err))
