"""store.archive on archives as real tools write them (issue "Real-world inputs"):

- kind 2, names: entry names decoded as the zip specification and the common archivers do
  (flag set: UTF-8; not set: UTF-8 when it decodes, else cp437), NFC, ``/`` and ``\\``
  separators, operating-system litter and folder entries without files ignored, class names exactly the
  folder names (trimmed); blank names, control characters and names that collide once
  normalised refused naming them; an archive that is not folders of images is refused
  saying what was found.
- kind 6, duplicates: images identified by their decoded pixels; the same image under two
  labels refused naming both files; duplicates within a class kept once and reported in
  ``manifest.warnings``; the job's iterator yields the same deduplicated list, so the
  train/validation split never shares an image.

Every archive is built here, in memory (tests/archivedata.py writes raw entry names).
"""

from __future__ import annotations

import unicodedata

import pytest
import torch
from archivedata import finder_zip, nfd, picture, raw_zip, unicode_path_extra
from psdata import make_zip

from store.archive import DatasetError, inspect_archive, iter_archive_images, pixel_digest, read_archive


def reject(data: bytes) -> str:
    with pytest.raises(DatasetError) as info:
        inspect_archive(data)
    assert not info.value.over_limit
    return str(info.value)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# ============================================================================ kind 2: names


def test_the_macos_archive_classes_equal_the_nfc_folder_names():
    """The quoted input: Finder's zip of café/ and thé/ (UTF-8, NFD, no UTF-8 flag, with
    __MACOSX/ and .DS_Store) used to give classes 'cafe╠ü' and 'the╠ü'."""
    data = finder_zip({"café": [picture(1), picture(2)], "thé": [picture(3), picture(4)]})
    m = inspect_archive(data)
    assert m.classes == ["café", "thé"]
    assert all(c == nfc(c) for c in m.classes) and "cafe╠ü" not in m.classes
    assert m.classes[0] == "caf\u00e9"  # the precomposed é a client types
    assert m.counts == {"café": 2, "thé": 2}
    assert m.warnings == []
    assert [e.name for e in m.images][0] == "Photos/café/photo 0.png"


def test_nfd_names_with_the_utf8_flag_are_normalised_to_nfc():
    data = make_zip({nfd("café/1.png"): picture(1), nfd("thé/1.png"): picture(2)})  # zipfile sets the flag
    assert inspect_archive(data).classes == ["café", "thé"]


def test_utf8_names_without_the_flag_are_read_as_utf8():
    data = raw_zip([("猫/1.png".encode(), False, picture(1)), ("собака/1.png".encode(), False, picture(2))])
    assert inspect_archive(data).classes == ["собака", "猫"]


def test_names_that_are_not_utf8_without_the_flag_are_cp437():
    # What old Windows tools wrote: cp437 bytes (0x82 is é, 0x9a is Ü), not valid UTF-8.
    data = raw_zip([(b"caf\x82/1.png", False, picture(1)), (b"\x9abung/1.png", False, picture(2))])
    assert inspect_archive(data).classes == ["café", "Übung"]


def test_the_info_zip_unicode_path_field_gives_the_name():
    header = "кот/".encode("cp1251")  # a legacy code page in the header, neither UTF-8 nor cp437 text
    data = raw_zip(
        [(header + b"1.png", False, picture(1)), (b"dog/1.png", False, picture(2))],
        extras={header + b"1.png": unicode_path_extra(header + b"1.png", "кот/1.png")},
    )
    assert inspect_archive(data).classes == ["dog", "кот"]


def test_japanese_and_cyrillic_folder_names_are_kept_exactly():
    data = make_zip({"ねこ/1.png": picture(1), "Собака/1.png": picture(2), "ｶﾀｶﾅ/1.png": picture(3)})
    # NFC, not NFKC: half-width katakana stays what the user typed.
    assert inspect_archive(data).classes == ["Собака", "ねこ", "ｶﾀｶﾅ"]


def test_windows_backslash_separators():
    data = raw_zip([
        (b"photos\\", False, None),
        (b"photos\\cat\\", False, None),
        (b"photos\\cat\\1.png", False, picture(1)),
        (b"photos\\cat\\sub\\2.png", False, picture(2)),
        (b"photos\\dog\\1.png", False, picture(3)),
    ])
    m = inspect_archive(data)
    assert m.classes == ["cat", "dog"] and m.counts == {"cat": 2, "dog": 1} and m.warnings == []
    assert [e.name for e in m.images] == ["photos/cat/1.png", "photos/cat/sub/2.png", "photos/dog/1.png"]


def test_class_names_are_trimmed_of_surrounding_whitespace():
    data = make_zip({" cat /1.png": picture(1), "\u3000dog\u00a0/1.png": picture(2), "sea lion/1.png": picture(3)})
    assert inspect_archive(data).classes == ["cat", "dog", "sea lion"]


@pytest.mark.parametrize(
    "litter",
    ["__MACOSX/cat/._1.png", "cat/._1.png", "cat/.DS_Store", ".DS_Store", "dog/Thumbs.db", "dog/THUMBS.DB",
     "dog/desktop.ini", "Desktop.ini", "__MACOSX/"],
)  # fmt: skip
def test_operating_system_litter_is_ignored(litter):
    entries: dict[str, bytes | None] = {"cat/1.png": picture(1), "dog/1.png": picture(2)}
    entries[litter] = None if litter.endswith("/") else b"\x00\x05\x16\x07 not an image"
    m = inspect_archive(make_zip(entries))
    assert m.classes == ["cat", "dog"] and m.n_images == 2 and m.warnings == []


def test_folder_entries_without_files_are_ignored():
    entries: dict[str, bytes | None] = {
        "wrap/": None, "wrap/cat/": None, "wrap/cat/1.png": picture(1), "wrap/cat/empty/": None,
        "wrap/dog/1.png": picture(2), "wrap/dog/sub/deeper/": None,
    }  # fmt: skip
    m = inspect_archive(make_zip(entries))
    assert m.classes == ["cat", "dog"] and m.n_images == 2 and m.warnings == []
    # ... but an empty folder at the class level is a class with no image
    entries["wrap/New folder/"] = None
    with pytest.raises(DatasetError, match=r"class folder 'New folder' has no images"):
        inspect_archive(make_zip(entries))


def test_classes_json_keys_and_display_names_follow_the_same_rules():
    entries = {
        "café/1.png": picture(1),
        "dog/1.png": picture(2),
        "classes.json": ('{"%s": "  %s  ", " dog ": "chien"}' % (nfd("café"), nfd("crème brûlée"))).encode(),
    }
    assert inspect_archive(make_zip(entries)).classes == ["crème brûlée", "chien"]


# ---------------------------------------------------------------------------- refused


def test_a_blank_class_name_is_refused():
    msg = reject(make_zip({"   /1.png": picture(1), "dog/1.png": picture(2), "cat/1.png": picture(3)}))
    assert "blank name" in msg and "'   /'" in msg


def test_a_class_name_with_control_characters_is_refused():
    msg = reject(make_zip({"ca\x07t/1.png": picture(1), "dog/1.png": picture(2)}))
    assert "control characters" in msg and "U+0007" in msg and "'ca\\x07t/'" in msg


def test_a_display_name_with_control_characters_is_refused():
    entries = {"cat/1.png": picture(1), "dog/1.png": picture(2), "classes.json": b'{"cat": "tab\\nby"}'}
    msg = reject(make_zip(entries))
    assert "classes.json" in msg and "control characters" in msg and "U+000A" in msg


def test_two_folders_that_become_one_name_are_refused_naming_both():
    # The same word typed on macOS (decomposed) and on Windows (precomposed).
    msg = reject(make_zip({nfd("café/1.png"): picture(1), "café/2.png": picture(2), "dog/1.png": picture(3)}))
    assert "'café'" in msg and "decomposed Unicode form" in msg and "same class name 'café'" in msg
    msg = reject(make_zip({"cat/1.png": picture(1), "cat /2.png": picture(2), "dog/1.png": picture(3)}))
    assert "'cat'" in msg and "'cat ' (surrounding whitespace)" in msg


def test_two_files_that_become_one_name_are_refused():
    msg = reject(make_zip({nfd("cat/é.png"): picture(1), "cat/é.png": picture(2), "dog/1.png": picture(3)}))
    assert "two entries named 'cat/é.png'" in msg and "decomposed" in msg


def test_images_at_the_top_level_say_what_was_found():
    msg = reject(make_zip({"IMG_001.png": picture(1), "IMG_002.png": picture(2)}))
    assert "top level" in msg and "found at the top level: 'IMG_001.png', 'IMG_002.png'" in msg


def test_no_images_says_what_was_found():
    msg = reject(make_zip({"cat/": None, "dog/": None, "__MACOSX/._x": b"j", ".DS_Store": b"j"}))
    assert "no images" in msg
    assert "'cat/' (0 files), 'dog/' (0 files)" in msg and "2 system files ignored" in msg


def test_one_class_folder_says_what_was_found_inside_the_wrapping_folder():
    msg = reject(make_zip({"a/b/cat/1.png": picture(1), "a/b/dog/1.png": picture(2)}))
    assert "one class only ('b')" in msg and "found inside the wrapping folder 'a/': 'b/' (2 files)" in msg


# ============================================================================ kind 6: duplicates


def test_the_same_image_under_two_labels_gets_422_naming_both_files():
    """The quoted input: a copy dragged into the wrong folder."""
    photo = picture(7)
    data = make_zip({"cat/a.png": picture(1), "cat/tabby.png": photo, "dog/b.png": picture(2), "dog/tabby.png": photo})
    msg = reject(data)
    assert "same image" in msg and "'cat/tabby.png' (class 'cat')" in msg and "'dog/tabby.png' (class 'dog')" in msg


def test_the_same_picture_re_encoded_in_another_format_is_the_same_image():
    data = make_zip({"cat/x.png": picture(7), "cat/y.png": picture(1), "dog/x.bmp": picture(7, fmt="BMP"),
                     "dog/z.webp": picture(7, fmt="WEBP")})  # fmt: skip
    msg = reject(data)
    assert "2 images are stored under two classes" in msg
    assert "'cat/x.png' (class 'cat') and 'dog/x.bmp' (class 'dog')" in msg
    assert "'cat/x.png' (class 'cat') and 'dog/z.webp' (class 'dog')" in msg


def test_conflicts_are_named_with_classes_json_display_names():
    photo = picture(7)
    data = make_zip({"c/1.png": photo, "d/1.png": photo, "classes.json": b'{"c": "cat", "d": "dog"}'})
    msg = reject(data)
    assert "'c/1.png' (class 'cat') and 'd/1.png' (class 'dog')" in msg


def test_duplicates_within_a_class_are_counted_once_with_a_warning():
    data = make_zip({
        "cat/a.png": picture(1),
        "cat/b.png": picture(1),  # a byte-identical copy
        "cat/c.bmp": picture(1, fmt="BMP"),  # the same picture re-encoded
        "cat/d.png": picture(2),
        "dog/a.png": picture(3),
        "dog/copy.png": picture(3),
    })
    m = inspect_archive(data)
    assert m.counts == {"cat": 2, "dog": 1} and m.n_images == 3
    assert [e.name for e in m.images] == ["cat/a.png", "cat/d.png", "dog/a.png"]
    assert m.warnings == [
        "dropped 2 duplicate images in class 'cat': cat/b.png (same as cat/a.png), cat/c.bmp (same as cat/a.png)",
        "dropped 1 duplicate image in class 'dog': dog/copy.png (same as dog/a.png)",
    ]
    classes, images, labels = read_archive(data)
    assert labels == [0, 0, 1] and len({pixel_digest(im) for im in images}) == 3


def test_a_near_miss_is_not_a_duplicate():
    data = make_zip({"cat/a.png": picture(1), "cat/b.png": picture(1, tweak=True),
                     "dog/a.png": picture(1, size=9), "dog/b.png": picture(2)})  # fmt: skip
    m = inspect_archive(data)
    assert m.counts == {"cat": 2, "dog": 2} and m.warnings == []


def test_the_job_iterator_yields_the_same_deduplicated_list_as_the_upload():
    data = make_zip({"cat/a.png": picture(1), "cat/b.png": picture(1), "dog/a.png": picture(2),
                     "dog/b.png": picture(3), "dog/c.png": picture(2, fmt="BMP")})  # fmt: skip
    uploaded = inspect_archive(data)
    manifest, it = iter_archive_images(data)
    labels = [label for _, label in it]
    assert labels == [e.label for e in uploaded.images] == [0, 1, 1]
    assert manifest.images == uploaded.images and manifest.counts == uploaded.counts
    assert manifest.warnings == uploaded.warnings


def test_the_split_never_puts_an_image_in_both_train_and_validation():
    """A few-shot set with many within-class copies: with the copies dropped before the
    stratified split, validation holds no image that is also in training."""
    from backbone.tuning import split_indices

    entries: dict[str, bytes | None] = {}
    for c, cls in enumerate(("cat", "dog", "owl")):
        for i in range(4):
            photo = picture(10 * c + i)
            entries[f"{cls}/{i}.png"] = photo
            entries[f"{cls}/{i} copy.png"] = photo  # Finder's "Duplicate"
            entries[f"{cls}/{i} copy 2.bmp"] = picture(10 * c + i, fmt="BMP")
    classes, images, labels = read_archive(make_zip(entries))
    assert len(images) == 12
    digests = [pixel_digest(im) for im in images]
    for seed in range(20):
        train, val = split_indices(torch.tensor(labels), len(classes), 0.5, seed)
        assert len(val) > 0
        assert not {digests[i] for i in train.tolist()} & {digests[i] for i in val.tolist()}


def test_a_hidden_folder_holding_files_is_ignored_and_said() -> None:
    entries: dict[str, bytes | None] = {
        "a/1.png": picture(1), "b/1.png": picture(2), ".hidden/1.png": picture(3), ".hidden/2.png": picture(4),
        ".git/config": b"[core]", "a/.thumbs/x.png": picture(5),
    }  # fmt: skip
    m = inspect_archive(make_zip(entries))
    assert m.classes == ["a", "b"] and m.n_images == 2
    assert m.warnings == [
        "ignored hidden folder '.git/' (1 file): names starting with '.' are treated as hidden files; rename it to use it as a class",
        "ignored hidden folder '.hidden/' (2 files): names starting with '.' are treated as hidden files; rename it to use it as a class",
        "ignored hidden folder 'a/.thumbs/' (1 file): names starting with '.' are treated as hidden files; rename it to use it as a class",
    ]
    # macOS's own litter is not a folder anybody meant: no warning
    m = inspect_archive(make_zip({"a/1.png": picture(1), "b/1.png": picture(2), "__MACOSX/a/._1.png": b"x"}))
    assert m.warnings == []
