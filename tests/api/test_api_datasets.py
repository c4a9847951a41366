"""Every dataset rejection docs/inputs.md lists ("Dataset archives"), through HTTP: POST /v1/tasks
answers a 4xx whose ``detail`` names the problem, stores nothing, and the service stays
healthy (``/healthz`` after each, a valid upload still tunes at the end). Also the form
fields: unknown config keys, unknown method, zeroshot without classes.

Real-world archives (issue "Real-world inputs"): a macOS Finder zip's classes are the NFC
folder names; the same image under two labels is a 422 naming both files and leaves no task
row, no dataset row and no object behind; duplicates within a class are reported in the
task's ``warnings``.

tests/store/test_archive.py and tests/store/test_archive_real_world.py cover the archive
module itself in more depth."""

from __future__ import annotations

import io
import random
import stat
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from apiclient import Api, embedded_settings, running_app
from archivedata import finder_zip, nfd
from psdata import dataset_zip, image_bytes, make_zip

#: Limits small enough to reach quickly; the valid dataset of these tests fits well inside.
MAX_UPLOAD = 200_000
MAX_ENTRIES = 20
MAX_PIXELS = 64 * 64
MAX_UNCOMPRESSED = 4 * 1024 * 1024


def _noise(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _good() -> dict[str, bytes | None]:
    return {"cat/1.png": image_bytes(0, seed=1), "dog/1.png": image_bytes(1, seed=2)}


def _symlink() -> bytes:
    return make_zip({**_good(), "cat/link.png": b"/etc/passwd"}, unix_modes={"cat/link.png": stat.S_IFLNK | 0o777})


def _stored(entries: dict[str, bytes | None]) -> bytes:
    return make_zip(entries, compression=zipfile.ZIP_STORED)


def _big_image() -> bytes:
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (100, 100), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


#: (case id, archive bytes (built lazily), expected status, words the detail must contain)
CASES: list[tuple[str, Callable[[], bytes], int, tuple[str, ...]]] = [
    ("not-a-zip", lambda: b"this is not a zip file at all", 422, ("not a zip",)),
    ("empty-file", lambda: b"", 422, ("empty",)),
    ("no-images", lambda: make_zip({"cat/": None, "dog/": None}), 422, ("no images",)),
    ("only-junk", lambda: make_zip({"cat/.DS_Store": b"x", "__MACOSX/dog/._1.png": b"x"}), 422, ("no images",)),
    ("one-class-only", lambda: make_zip({"cat/1.png": image_bytes(0), "cat/2.png": image_bytes(0, seed=1)}), 422,
     ("one class only", "'cat'")),
    ("class-with-no-image", lambda: make_zip({**_good(), "bird/": None}), 422,
     ("class folder 'bird' has no images", "each class needs at least 1 image")),
    ("only-top-level-images", lambda: make_zip({"a.png": image_bytes(0), "b.png": image_bytes(1)}), 422,
     ("top level", "found at the top level: 'a.png', 'b.png'")),
    ("same-image-under-two-labels", lambda: make_zip({**_good(), "dog/copy.png": image_bytes(0, seed=1)}), 422,
     ("same image", "'cat/1.png' (class 'cat')", "'dog/copy.png' (class 'dog')")),
    ("same-image-re-encoded-under-two-labels",
     lambda: make_zip({**_good(), "dog/copy.bmp": image_bytes(0, seed=1, fmt="BMP")}), 422,
     ("same image", "'cat/1.png'", "'dog/copy.bmp'")),
    ("names-equal-once-normalised", lambda: make_zip({**_good(), nfd("café/1.png"): image_bytes(2),
                                                       "café/2.png": image_bytes(3)}), 422,
     ("'café'", "decomposed Unicode form", "same class name")),
    ("blank-class-name", lambda: make_zip({**_good(), "  /1.png": image_bytes(2)}), 422, ("blank name",)),
    ("control-character-in-class-name", lambda: make_zip({**_good(), "bi\trd/1.png": image_bytes(2)}), 422,
     ("control characters", "U+0009")),
    ("dotdot-entry", lambda: make_zip({**_good(), "../evil.png": image_bytes()}), 422, ("../evil.png", "escapes")),
    ("nested-dotdot-entry", lambda: make_zip({**_good(), "cat/../../evil.png": image_bytes()}), 422,
     ("cat/../../evil.png", "escapes")),
    ("absolute-entry", lambda: make_zip({**_good(), "/etc/evil.png": image_bytes()}), 422,
     ("/etc/evil.png", "absolute path")),
    ("windows-absolute-entry", lambda: make_zip({**_good(), "C:/evil.png": image_bytes()}), 422, ("absolute path",)),
    ("symlink-entry", _symlink, 422, ("cat/link.png", "link")),
    ("undecodable-image", lambda: make_zip({**_good(), "dog/broken.png": b"\x89PNG but not really"}), 422,
     ("dog/broken.png", "not a decodable image")),
    ("truncated-image", lambda: make_zip({**_good(), "dog/cut.png": image_bytes(1, seed=9)[:60]}), 422,
     ("dog/cut.png",)),
    ("unsupported-format", lambda: make_zip({**_good(), "dog/x.tiff": image_bytes(fmt="TIFF")}), 422,
     ("dog/x.tiff", "PNG, JPEG")),
    ("image-over-pixel-limit", lambda: make_zip({**_good(), "dog/huge.png": _big_image()}), 413,
     ("dog/huge.png", "pixel limit", str(MAX_PIXELS))),
    ("file-at-top-level", lambda: make_zip({**_good(), "readme.png": image_bytes()}), 422, ("readme.png", "class folder")),
    ("archive-over-upload-limit", lambda: _stored({**_good(), "cat/noise.png": _noise(MAX_UPLOAD + 10_000)}), 413,
     ("upload limit", str(MAX_UPLOAD))),
    ("body-far-over-upload-limit", lambda: _stored({**_good(), "cat/noise.png": _noise(MAX_UPLOAD + 2 * 1024 * 1024)}),
     413, ("over the limit",)),
    ("too-many-entries", lambda: make_zip({f"c{i % 2}/{i}.png": image_bytes(i % 2, seed=i) for i in range(MAX_ENTRIES + 5)}),
     413, (f"{MAX_ENTRIES + 5} entries", f"limit of {MAX_ENTRIES}")),
    ("expands-past-size-limit", lambda: make_zip({**_good(), "cat/zeros.png": b"\x00" * (MAX_UNCOMPRESSED + 1024)}), 413,
     ("expands to", "4.0 MiB")),
    ("expansion-ratio", lambda: make_zip({**_good(), "cat/zeros.png": b"\x00" * (2 * 1024 * 1024)}), 413,
     ("expansion ratio",)),
    ("duplicate-class-names", lambda: make_zip({**_good(), "classes.json": b'{"cat": "dog"}'}), 422,
     ("same class name", "'dog'")),
    ("bad-classes-json", lambda: make_zip({**_good(), "classes.json": b"{not json"}), 422, ("classes.json", "JSON")),
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One app for the module on the embedded defaults (SQLite, file://) with small limits."""
    settings = embedded_settings(
        tmp_path_factory.mktemp("datasets"),
        max_upload_bytes=MAX_UPLOAD,
        max_archive_entries=MAX_ENTRIES,
        max_image_pixels=MAX_PIXELS,
        max_uncompressed_bytes=MAX_UNCOMPRESSED,
    )
    with running_app(settings) as client:
        yield Api(client)


@pytest.fixture(scope="module")
def tenant(api: Api) -> dict[str, str]:
    return api.tenant("uploader")


def _stored_objects(api: Api) -> list[str]:
    # tasks of earlier tests of this module's app may still be tuning: their prompts must not
    # land between two listings that are compared
    assert api.state.dispatcher.wait_idle(120), "jobs of earlier tests did not finish"
    root = Path(api.state.settings.object_store_url[len("file://") :])
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _rows(api: Api) -> dict[str, int]:
    """Rows per table, read straight from the database (every tenant)."""
    engine = sa.create_engine(api.state.settings.database_url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("tasks", "datasets")}
    finally:
        engine.dispose()


@pytest.mark.parametrize(("case", "build", "status", "needles"), CASES, ids=[c[0] for c in CASES])
def test_bad_archive_is_rejected_naming_the_problem(
    api: Api, tenant: dict[str, str], case: str, build: Callable[[], bytes], status: int, needles: tuple[str, ...]
) -> None:
    rows = _rows(api)
    r = api.create_task(tenant, "coop", dataset=build(), config={"epochs": 1}, expect=None)
    assert r.status_code == status, (case, r.text)
    detail = r.json()["detail"]
    assert set(r.json()) == {"detail"}
    for needle in needles:
        assert needle in detail, (case, detail)
    assert "Traceback" not in detail and str(Path(api.state.settings.database_url[len("sqlite:///") :]).parent) not in detail
    # Nothing was created or stored, and the service is still healthy.
    assert api.client.get("/v1/tasks", headers=tenant).json()["count"] == 0
    assert _stored_objects(api) == []
    assert _rows(api) == rows == {"tasks": 0, "datasets": 0}
    assert api.client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("form", "status", "needles"),
    [
        ({"method": "coop", "config": '{"epochs": 1, "no_such_key": 3}'}, 422, ("no_such_key",)),
        ({"method": "coop", "config": '{"epochs": "many"}'}, 422, ("epochs",)),
        ({"method": "coop", "config": "[1, 2]"}, 422, ("JSON object",)),
        ({"method": "coop", "config": "{epochs: 1"}, 422, ("not valid JSON",)),
        ({"method": "no-such-method"}, 422, ("no-such-method", "coop", "zeroshot")),
        ({"method": "zeroshot"}, 422, ("classes is required",)),
        ({"method": "zeroshot", "classes": '["cat"]'}, 422, ("at least 2",)),
        ({"method": "zeroshot", "classes": '"cat, dog"'}, 422, ("JSON list",)),
        ({"method": "zeroshot", "classes": '["cat", "cat"]'}, 422, ("'cat' appears twice",)),
        ({"method": "coop"}, 422, ("dataset is required",)),
        ({"method": "coop", "name": ""}, 422, ("name",)),
    ],
    ids=["unknown-config-key", "bad-config-value", "config-not-object", "config-not-json", "unknown-method",
         "zeroshot-without-classes", "zeroshot-one-class", "classes-not-a-list", "duplicate-classes",
         "dataset-missing", "empty-name"],  # fmt: skip
)
def test_bad_form_fields_are_rejected(
    api: Api, tenant: dict[str, str], form: dict[str, str], status: int, needles: tuple[str, ...]
) -> None:
    data = {"name": "t", **form}
    r = api.client.post("/v1/tasks", data=data, headers=tenant)
    assert r.status_code == status, r.text
    for needle in needles:
        assert needle in r.json()["detail"], r.json()
    assert api.client.get("/v1/tasks", headers=tenant).json()["count"] == 0
    assert api.client.get("/healthz").status_code == 200


def test_a_valid_upload_still_tunes_after_all_rejections(api: Api, tenant: dict[str, str]) -> None:
    """Runs after the rejections above (module order): the service is not wedged."""
    assert api.client.get("/healthz").status_code == 200
    # Accepted variants of the format: a wrapping folder, classes.json, junk, nested folders.
    entries: dict[str, bytes | None] = {}
    for label, folder in enumerate(("cat", "dog")):
        for i in range(3):
            entries[f"photos/{folder}/{'sub/' if i == 2 else ''}{i}.png"] = image_bytes(label, seed=i)
    entries["photos/classes.json"] = b'{"cat": "tabby cat"}'
    entries["photos/cat/.DS_Store"] = b"junk"
    entries["__MACOSX/photos/._x"] = b"junk"
    task = api.create_task(tenant, "linear-probe", dataset=make_zip(entries), config={"max_iter": 20}).json()
    assert task["classes"] == ["tabby cat", "dog"]
    t = api.wait_ready(tenant, task["id"])
    assert t["metrics"]["n_train"] + t["metrics"]["n_val"] == 6
    # And the plain test dataset at just under the limits.
    data = dataset_zip(("a", "b"), per_class=4)
    assert len(data) < MAX_UPLOAD
    r = api.create_task(tenant, "coop", dataset=data, config={"epochs": 1, "n_ctx": 2})
    api.wait_ready(tenant, r.json()["id"])
    assert api.client.get("/readyz").status_code == 200


# ----------------------------------------------------------------------------- real-world archives


def test_the_macos_archive_classes_equal_the_nfc_folder_names(api: Api) -> None:
    """Finder's zip (UTF-8 names in decomposed form, no UTF-8 flag, __MACOSX/ litter): the
    task's classes are what the user named the folders, in the form a client types."""
    headers = api.tenant()
    data = finder_zip({"café": [image_bytes(0, seed=1), image_bytes(0, seed=2)],
                       "thé": [image_bytes(1, seed=3), image_bytes(1, seed=4)]})  # fmt: skip
    task = api.create_task(headers, "linear-probe", dataset=data, config={"max_iter": 20}).json()
    assert task["classes"] == ["caf\u00e9", "th\u00e9"] and task["warnings"] == []
    t = api.wait_ready(headers, task["id"])  # the job reads the names the same way
    assert t["classes"] == ["café", "thé"] and t["metrics"]["n_train"] + t["metrics"]["n_val"] == 4


def test_the_same_image_under_two_labels_gets_422_and_leaves_nothing_behind(api: Api) -> None:
    """Create and retrain alike: no task row, no dataset row, no object after the 422."""
    headers = api.tenant()
    photo = image_bytes(0, seed=5)
    bad = make_zip({"cat/tabby.png": photo, "cat/2.png": image_bytes(0, seed=6), "dog/tabby.png": photo})
    rows, objects = _rows(api), _stored_objects(api)
    r = api.create_task(headers, "coop", dataset=bad, config={"epochs": 1}, expect=None)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "'cat/tabby.png' (class 'cat')" in detail and "'dog/tabby.png' (class 'dog')" in detail
    assert _rows(api) == rows and _stored_objects(api) == objects
    assert api.client.get("/v1/tasks", headers=headers).json()["count"] == 0

    # A retrain with such a dataset: refused, and the task keeps its dataset.
    task = api.create_task(headers, "linear-probe", dataset=dataset_zip(("a", "b"), per_class=2),
                           config={"max_iter": 20}).json()  # fmt: skip
    api.wait_ready(headers, task["id"])
    rows, objects = _rows(api), _stored_objects(api)
    r = api.client.post(f"/v1/tasks/{task['id']}/retrain", files={"dataset": ("d.zip", bad, "application/zip")},
                        headers=headers)  # fmt: skip
    assert r.status_code == 422 and "same image" in r.json()["detail"], r.text
    assert _rows(api) == rows and _stored_objects(api) == objects
    assert api.task(headers, task["id"])["dataset_id"] == task["dataset_id"]


def test_duplicates_within_a_class_are_listed_in_the_task_warnings(api: Api) -> None:
    headers = api.tenant()
    entries: dict[str, bytes | None] = {}
    for label, cls in enumerate(("cat", "dog")):
        for i in range(3):
            entries[f"{cls}/{i}.png"] = image_bytes(label, seed=10 + i)
    entries["cat/0 copy.png"] = entries["cat/0.png"]
    entries["cat/0 again.bmp"] = image_bytes(0, seed=10, fmt="BMP")  # re-encoded: same pixels
    entries["dog/2 copy.png"] = entries["dog/2.png"]
    entries["dog/near-miss.png"] = image_bytes(1, seed=99)  # a different picture stays
    expected = [
        "dropped 2 duplicate images in class 'cat': cat/0 copy.png (same as cat/0.png), "
        "cat/0 again.bmp (same as cat/0.png)",
        "dropped 1 duplicate image in class 'dog': dog/2 copy.png (same as dog/2.png)",
    ]
    created = api.create_task(headers, "linear-probe", dataset=make_zip(entries), config={"max_iter": 20}).json()
    assert created["warnings"] == expected
    assert api.task(headers, created["id"])["warnings"] == expected  # GET /v1/tasks/{id}
    listed = api.client.get("/v1/tasks", headers=headers).json()["items"]
    assert [t["warnings"] for t in listed] == [expected]
    t = api.wait_ready(headers, created["id"])
    assert t["warnings"] == expected
    assert t["metrics"]["n_train"] + t["metrics"]["n_val"] == 7  # 3 + 4: each picture once

    # No duplicates: an empty list; zeroshot (no dataset): an empty list.
    clean = api.create_task(headers, "linear-probe", dataset=dataset_zip(("a", "b"), per_class=2),
                            config={"max_iter": 20}).json()  # fmt: skip
    assert clean["warnings"] == [] and api.task(headers, clean["id"])["warnings"] == []
    zs = api.create_task(headers, "zeroshot", classes=["cat", "dog"]).json()
    assert zs["warnings"] == [] and api.task(headers, zs["id"])["warnings"] == []
    api.wait_ready(headers, clean["id"])
