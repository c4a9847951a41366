"""store.archive: the dataset archive reader, one test per rejection in docs/inputs.md ("Dataset archives").

Every archive here is crafted in memory with zipfile (and, for lying headers,
patched bytes); nothing touches the disk.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib

import pytest
from PIL import Image
from psdata import make_zip

from store.archive import (
    ArchiveLimits,
    DatasetError,
    ImageError,
    decode_image,
    inspect_archive,
    iter_archive_images,
    read_archive,
)


def img_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 8), color=(200, 30, 30), seed: int = 0) -> bytes:
    img = Image.new("RGB", size, color)
    # A little structure so that the encoded file is not trivially compressible.
    px = img.load()
    for x in range(size[0]):
        px[x, (x * 7 + seed) % size[1]] = ((x * 37 + seed) % 256, (x * 11) % 256, 90)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def good_entries(prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}cat/001.png": img_bytes(seed=1),
        f"{prefix}cat/002.jpg": img_bytes("JPEG", seed=2),
        f"{prefix}dog/a.png": img_bytes(color=(0, 0, 200), seed=3),
        f"{prefix}dog/b.webp": img_bytes("WEBP", color=(0, 90, 200), seed=4),
    }


def reject(data: bytes, limits: ArchiveLimits | None = None) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        inspect_archive(data, limits)
    return info.value


# ----------------------------------------------------------------------------- accepted


def test_reads_classes_images_and_labels():
    classes, images, labels = read_archive(make_zip(good_entries()))
    assert classes == ["cat", "dog"]
    assert labels == [0, 0, 1, 1]
    assert all(im.mode == "RGB" and im.size == (8, 8) for im in images)


def test_manifest_counts_without_decoding():
    m = inspect_archive(make_zip(good_entries()), decode_images=False)
    assert m.classes == ["cat", "dog"] and m.counts == {"cat": 2, "dog": 2} and m.n_images == 4


def test_one_wrapping_folder_is_allowed():
    entries = {"mydata/": None, **good_entries("mydata/")}
    classes, _, labels = read_archive(make_zip(entries))
    assert classes == ["cat", "dog"] and labels == [0, 0, 1, 1]


def test_classes_json_maps_folders_to_display_names():
    entries = good_entries()
    entries["classes.json"] = b'{"cat": "tabby cat", "dog": "golden retriever"}'
    classes, _, _ = read_archive(make_zip(entries))
    assert classes == ["tabby cat", "golden retriever"]


def test_classes_json_inside_wrapping_folder_and_partial_mapping():
    entries = good_entries("wrap/")
    entries["wrap/classes.json"] = b'{"dog": "puppy"}'
    m = inspect_archive(make_zip(entries))
    assert m.classes == ["cat", "puppy"] and m.counts == {"cat": 2, "puppy": 2}


def test_junk_is_ignored():
    entries = good_entries()
    entries.update({
        "__MACOSX/cat/._001.png": b"\x00\x05\x16\x07junk",
        "__MACOSX/": None,
        ".DS_Store": b"junk",
        "cat/.DS_Store": b"junk",
        "dog/Thumbs.db": b"junk",
        "dog/._a.png": b"junk",
    })
    m = inspect_archive(make_zip(entries))
    assert m.classes == ["cat", "dog"] and m.n_images == 4


def test_all_accepted_formats_including_gif_first_frame_and_nested_folders():
    frames = [Image.new("P", (8, 8), i) for i in (1, 2, 3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    entries = {  # different pictures: the same one under two classes is refused
        "a/x.png": img_bytes("PNG", seed=1),
        "a/x.jpeg": img_bytes("JPEG", seed=2),
        "a/sub/x.webp": img_bytes("WEBP", seed=3),
        "b/x.bmp": img_bytes("BMP", seed=4),
        "b/x.gif": gif.getvalue(),
    }
    classes, images, labels = read_archive(make_zip(entries))
    assert classes == ["a", "b"] and labels == [0, 0, 0, 1, 1]
    assert all(im.mode == "RGB" for im in images)


def test_stored_entries_and_limits_from_settings_like_object():
    class S:
        max_upload_bytes = 10_000_000
        max_archive_entries = 10
        max_uncompressed_bytes = 10_000_000
        max_expansion_ratio = 100.0
        max_image_pixels = 100

    m = inspect_archive(make_zip(good_entries(), compression=zipfile.ZIP_STORED), S())
    assert m.n_images == 4


def test_iterator_yields_lazily_in_manifest_order():
    manifest, it = iter_archive_images(make_zip(good_entries()))
    first = next(it)
    assert first[1] == manifest.images[0].label
    it.close()


# ----------------------------------------------------------------------------- rejected


def test_rejects_not_a_zip():
    err = reject(b"this is not a zip file at all" * 10)
    assert "not a zip" in str(err) and not err.over_limit


def test_rejects_empty_upload():
    assert "empty" in str(reject(b""))


def test_rejects_archive_over_byte_limit_with_413():
    data = make_zip(good_entries())
    err = reject(data, ArchiveLimits(max_bytes=len(data) - 1))
    assert err.over_limit and "upload limit" in str(err)


def test_rejects_too_many_entries_with_413():
    entries = {f"c{i % 2}/{i}.png": img_bytes() for i in range(12)}
    err = reject(make_zip(entries), ArchiveLimits(max_entries=10))
    assert err.over_limit and "12 entries" in str(err) and "limit of 10" in str(err)


def test_rejects_declared_uncompressed_total_over_limit_with_413():
    err = reject(make_zip(good_entries()), ArchiveLimits(max_uncompressed_bytes=100))
    assert err.over_limit and "expands to" in str(err)


def test_rejects_expansion_ratio_with_413():
    entries = good_entries()
    entries["cat/bomb.png"] = b"\x00" * (4 * 1024 * 1024)  # deflates ~1000-fold
    err = reject(make_zip(entries))
    assert err.over_limit and "expansion ratio" in str(err)


def _patch_declared_sizes(data: bytes, name: bytes, new_size: int) -> bytes:
    """Rewrite the uncompressed size of entry `name` in both the local and the central header."""
    buf = bytearray(data)
    pos = 0
    while (pos := buf.find(b"PK\x03\x04", pos)) != -1:
        nlen = struct.unpack_from("<H", buf, pos + 26)[0]
        if bytes(buf[pos + 30 : pos + 30 + nlen]) == name:
            struct.pack_into("<I", buf, pos + 22, new_size)
        pos += 4
    pos = 0
    while (pos := buf.find(b"PK\x01\x02", pos)) != -1:
        nlen = struct.unpack_from("<H", buf, pos + 28)[0]
        if bytes(buf[pos + 46 : pos + 46 + nlen]) == name:
            struct.pack_into("<I", buf, pos + 24, new_size)
        pos += 4
    return bytes(buf)


def test_lying_size_headers_do_not_get_past_the_byte_count():
    entries = good_entries()
    entries["dog/big.bmp"] = b"BM" + bytes(range(256)) * 20_000  # ~5 MB, declared as 100 bytes
    data = _patch_declared_sizes(make_zip(entries), b"dog/big.bmp", 100)
    lim = ArchiveLimits(max_uncompressed_bytes=1024 * 1024, max_expansion_ratio=1e9)
    # The declared total passes the limit ...
    assert inspect_archive(make_zip(good_entries()), lim).n_images == 4
    # ... but reading counts real bytes and stops the entry (size mismatch or CRC).
    err = reject(data, lim)
    assert "dog/big.bmp" in str(err)


def test_rejects_no_images():
    assert "no images" in str(reject(make_zip({"cat/": None, "dog/": None})))


def test_rejects_archive_holding_only_junk():
    assert "no images" in str(reject(make_zip({"__MACOSX/x": b"j", ".DS_Store": b"j"})))


def test_rejects_one_class_only():
    err = reject(make_zip({"cat/1.png": img_bytes(), "cat/2.png": img_bytes()}))
    assert "one class only" in str(err) and "'cat'" in str(err)


def test_rejects_one_class_inside_wrapping_folder():
    err = reject(make_zip({"wrap/cat/1.png": img_bytes(), "wrap/cat/2.png": img_bytes()}))
    assert "one class only" in str(err)


def test_rejects_class_with_no_image():
    """A class-level folder without images is a class with no image: refused, naming it."""
    entries = good_entries()
    entries["bird/"] = None
    err = reject(make_zip(entries))
    assert "'bird' has no images" in str(err) and "each class needs at least 1 image" in str(err)


def test_rejects_class_holding_only_junk():
    entries = good_entries()
    entries["bird/.DS_Store"] = b"junk"
    assert "'bird' has no images" in str(reject(make_zip(entries)))


@pytest.mark.parametrize("name", ["../evil.png", "cat/../../evil.png", "cat\\..\\..\\evil.png"])
def test_rejects_dotdot_entries(name):
    entries = good_entries()
    entries[name] = img_bytes()
    err = reject(make_zip(entries))
    assert "escapes the archive" in str(err)


@pytest.mark.parametrize("name", ["/etc/evil.png", "C:/evil.png", "\\\\server\\share\\x.png"])
def test_rejects_absolute_entries(name):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in good_entries().items():
            zf.writestr(n, d)
        info = zipfile.ZipInfo("placeholder")
        info.filename = name  # bypass zipfile's own sanitising of the name
        zf.writestr(info, img_bytes())
    err = reject(buf.getvalue())
    assert "absolute path" in str(err)


def test_rejects_symlink_entries():
    data = make_zip({**good_entries(), "cat/link.png": b"/etc/passwd"}, unix_modes={"cat/link.png": stat.S_IFLNK | 0o777})
    err = reject(data)
    assert "cat/link.png" in str(err) and "link" in str(err)


def test_rejects_device_entries():
    data = make_zip({**good_entries(), "cat/dev": b""}, unix_modes={"cat/dev": stat.S_IFCHR | 0o666})
    assert "special file" in str(reject(data))


def test_rejects_undecodable_image_naming_the_file():
    entries = good_entries()
    entries["dog/notes.txt"] = b"hello, I am not an image"
    err = reject(make_zip(entries))
    assert "'dog/notes.txt'" in str(err) and "not a decodable image" in str(err)
    assert not err.over_limit


def test_rejects_truncated_image_naming_the_file():
    entries = good_entries()
    entries["dog/cut.png"] = img_bytes(size=(64, 64))[:120]
    err = reject(make_zip(entries))
    assert "'dog/cut.png'" in str(err)


def test_rejects_unsupported_image_format_naming_the_file():
    entries = good_entries()
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, format="TIFF")
    entries["dog/x.tiff"] = tiff.getvalue()
    err = reject(make_zip(entries))
    assert "'dog/x.tiff'" in str(err) and "PNG, JPEG, WebP, BMP, GIF" in str(err)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height; no pixel data follows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    )


def test_rejects_image_over_pixel_limit_from_its_header_with_413():
    entries = good_entries()
    entries["cat/huge.png"] = _png_header_only(5000, 5000)  # 25 Mpx > 16.7 Mpx default, never decoded
    err = reject(make_zip(entries))
    assert err.over_limit and "'cat/huge.png'" in str(err) and "pixel limit" in str(err)


def test_pillow_decompression_bomb_guard_maps_to_pixel_limit():
    # Over twice Pillow's own MAX_IMAGE_PIXELS: Pillow refuses at open time.
    with pytest.raises(ImageError) as info:
        decode_image(_png_header_only(20_000, 20_000), max_pixels=10**12, name="image 0")
    assert info.value.over_limit and "image 0" in str(info.value)


def test_rejects_file_at_top_level():
    entries = good_entries()
    entries["stray.png"] = img_bytes()
    err = reject(make_zip(entries))
    assert "'stray.png'" in str(err) and "top level" in str(err)


def test_rejects_encrypted_entries():
    data = bytearray(make_zip(good_entries(), compression=zipfile.ZIP_STORED))
    pos = data.find(b"PK\x01\x02")
    flags = struct.unpack_from("<H", data, pos + 8)[0]
    struct.pack_into("<H", data, pos + 8, flags | 0x1)
    assert "encrypted" in str(reject(bytes(data)))


def test_rejects_duplicate_entries():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in good_entries().items():
            zf.writestr(n, d)
        with pytest.warns(UserWarning):
            zf.writestr("cat/001.png", img_bytes())
    assert "two entries named 'cat/001.png'" in str(reject(buf.getvalue()))


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"{not json", "not valid JSON"),
        (b'["cat", "dog"]', "must be a JSON object"),
        (b'{"bird": "x"}', "names folder 'bird'"),
        (b'{"cat": ""}', "non-empty string"),
        (b'{"cat": "same", "dog": "same"}', "same class name 'same'"),
    ],
)
def test_rejects_bad_classes_json(content, needle):
    entries = good_entries()
    entries["classes.json"] = content
    assert needle in str(reject(make_zip(entries)))


def test_errors_do_not_leak_server_paths_or_tracebacks():
    for data in (b"nope", make_zip({"a/x.txt": b"x", "b/y.png": img_bytes()})):
        msg = str(reject(data))
        assert "Traceback" not in msg and "/work" not in msg and "site-packages" not in msg
