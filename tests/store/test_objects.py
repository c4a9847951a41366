"""store.objects on both backends: local files and SeaweedFS S3 through the minio client."""

from __future__ import annotations

import os
import threading

import pytest

from store.objects import (
    InvalidKey,
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    S3ObjectStore,
    dataset_key,
    open_object_store,
    prompt_key,
    sha256_hex,
)
from store.settings import Settings


def test_put_get_exists_delete(object_store: ObjectStore):
    assert isinstance(object_store, ObjectStore)
    object_store.ping()
    key = "prompts/t1/k1/" + "a" * 64 + ".safetensors"
    assert object_store.exists(key) is False
    object_store.put(key, b"\x00hello\xff")
    assert object_store.exists(key) is True
    assert object_store.get(key) == b"\x00hello\xff"
    object_store.delete(key)
    assert object_store.exists(key) is False
    object_store.delete(key)  # deleting a missing object is fine


def test_missing_key(object_store: ObjectStore):
    with pytest.raises(ObjectNotFound, match="no object 'nothing/here'"):
        object_store.get("nothing/here")
    assert object_store.exists("nothing/here") is False


def test_empty_and_large_objects(object_store: ObjectStore):
    object_store.put("empty", b"")
    assert object_store.get("empty") == b""
    big = os.urandom(9 * 1024 * 1024)  # above the filer chunk size and minio's part size
    object_store.put("big.bin", big)
    assert object_store.get("big.bin") == big


def test_overwrite_is_atomic_for_readers(object_store: ObjectStore):
    """Readers racing a writer see one whole version or the other, never a mix or a prefix."""
    a, b = b"A" * (2 * 1024 * 1024), b"B" * (2 * 1024 * 1024 + 7)
    object_store.put("hot", a)
    seen: set[bytes] = set()
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = object_store.get("hot")
            if data not in (a, b):
                bad.append(f"{len(data)} bytes, starts {data[:1]!r} ends {data[-1:]!r}")
            seen.add(data[:1])

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            object_store.put("hot", b if i % 2 == 0 else a)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == []
    assert object_store.get("hot") == a


@pytest.mark.parametrize(
    "key",
    ["", "../escape", "a/../../escape", "/etc/passwd", "a//b", "a/./b", ".hidden", "a/.tmp-x", "a\\b",
     "a/b/", "nul\x00byte", "sp ace", "x" * 2000, "C:/windows"],
)  # fmt: skip
def test_keys_that_could_escape_are_refused(object_store: ObjectStore, key: str):
    for op in (lambda: object_store.put(key, b"x"), lambda: object_store.get(key),
               lambda: object_store.exists(key), lambda: object_store.delete(key)):  # fmt: skip
        with pytest.raises(InvalidKey):
            op()


def test_local_symlink_out_of_the_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalObjectStore(tmp_path / "root")
    store.ping()
    os.symlink(outside, tmp_path / "root" / "link")
    with pytest.raises(InvalidKey, match="outside"):
        store.get("link/secret")
    with pytest.raises(InvalidKey):
        store.put("link/new", b"x")
    assert not (outside / "new").exists()


def test_local_write_failure_keeps_old_object_and_no_temp_files(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path / "root")
    store.put("a/b", b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.put("a/b", b"new")
    monkeypatch.undo()
    assert store.get("a/b") == b"old"
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["b"]


def test_local_delete_prunes_empty_folders(tmp_path):
    store = LocalObjectStore(tmp_path / "root")
    store.put("prompts/t/k/x.safetensors", b"1")
    store.put("prompts/t/other", b"2")
    store.delete("prompts/t/k/x.safetensors")
    assert not (tmp_path / "root" / "prompts" / "t" / "k").exists()
    assert (tmp_path / "root" / "prompts" / "t" / "other").exists()
    assert (tmp_path / "root").is_dir()


def test_local_relative_url_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_object_store("file://./var/objects")
    assert isinstance(store, LocalObjectStore)
    store.put("k", b"v")
    assert (tmp_path / "var" / "objects" / "k").read_bytes() == b"v"
    monkeypatch.chdir("/")
    assert store.get("k") == b"v"  # resolved once, at open time


def test_local_ping_fails_clearly_on_unwritable_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ObjectStoreError, match="cannot be created"):
        LocalObjectStore(blocker / "objects").ping()


def test_open_object_store_urls():
    s3 = open_object_store("s3://bucket-a?endpoint=http://127.0.0.1:8333&region=eu-west-1", "ak", "sk")
    assert isinstance(s3, S3ObjectStore)
    assert (s3.bucket, s3.endpoint) == ("bucket-a", "http://127.0.0.1:8333")
    assert "sk" not in s3.location and "ak" not in s3.location
    assert open_object_store("s3://b?endpoint=https://minio.example:9000").endpoint == "https://minio.example:9000"
    assert open_object_store("s3://b?endpoint=minio:9000&secure=false").endpoint == "http://minio:9000"
    with pytest.raises(ObjectStoreError, match="unknown option"):
        open_object_store("s3://b?endpoint=http://x:1&acces_key=oops")
    with pytest.raises(ObjectStoreError, match="unsupported object store URL"):
        open_object_store("ftp://x")
    with pytest.raises(ObjectStoreError, match="needs a path"):
        open_object_store("file://")


def test_open_object_store_takes_credentials_from_settings(s3_server):
    settings = Settings(
        object_store_url=s3_server.url_for("pstest-settings"),
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    store = open_object_store(settings)
    store.put("k", b"v")
    assert s3_server.client().bucket_exists("pstest-settings")  # created on first use
    assert store.get("k") == b"v"


def test_s3_wrong_credentials_fail_without_leaking_the_secret(s3_server):
    store = open_object_store(s3_server.url_for("pstest-badcreds"), s3_server.access_key, "wrong-secret-value")
    with pytest.raises(ObjectStoreError) as info:
        store.ping()
    assert "wrong-secret-value" not in str(info.value)
    assert "SignatureDoesNotMatch" in str(info.value) or "Access" in str(info.value)


def test_s3_unreachable_endpoint_fails_clearly():
    store = S3ObjectStore("b", endpoint="http://127.0.0.1:9", access_key="a", secret_key="b", connect_timeout=1)
    with pytest.raises(ObjectStoreError, match="127.0.0.1:9"):
        store.ping()


def test_content_addressed_keys():
    digest = sha256_hex(b"abc")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert prompt_key("t", "k", digest) == f"prompts/t/k/{digest}.safetensors"
    assert dataset_key("t", digest) == f"datasets/t/{digest}.zip"
    with pytest.raises(InvalidKey):
        prompt_key("..", "k", digest)


# ----------------------------------------------------------------------------- list and stat


def test_list_and_stat_see_every_object_with_its_size_and_time(object_store) -> None:
    """What the garbage collector reads (store.consistency): keys under a prefix, sizes and
    last-modified times (timezone-aware); a rewrite never moves the time backwards."""
    object_store.put("datasets/t1/a.zip", b"aaa")
    object_store.put("datasets/t2/b.zip", b"bb")
    object_store.put("prompts/t1/task/c.safetensors", b"c")
    assert sorted(i.key for i in object_store.list("datasets/")) == ["datasets/t1/a.zip", "datasets/t2/b.zip"]
    assert sorted(i.key for i in object_store.list("")) == [
        "datasets/t1/a.zip", "datasets/t2/b.zip", "prompts/t1/task/c.safetensors",
    ]
    assert [i.key for i in object_store.list("datasets/t2/")] == ["datasets/t2/b.zip"]
    assert list(object_store.list("nothing/here/")) == []
    info = object_store.stat("datasets/t1/a.zip")
    assert info is not None and info.size == 3 and info.last_modified.tzinfo is not None
    assert {i.key: i.size for i in object_store.list("datasets/")}["datasets/t1/a.zip"] == 3
    assert object_store.stat("datasets/t1/none.zip") is None
    object_store.put("datasets/t1/a.zip", b"aaa")
    assert object_store.stat("datasets/t1/a.zip").last_modified >= info.last_modified
    object_store.delete("datasets/t1/a.zip")
    assert object_store.stat("datasets/t1/a.zip") is None
    assert sorted(i.key for i in object_store.list("datasets/")) == ["datasets/t2/b.zip"]


def test_local_list_skips_writes_in_progress(tmp_path) -> None:
    from store.objects import LocalObjectStore

    store = LocalObjectStore(tmp_path / "objects")
    store.put("datasets/t/a.zip", b"a")
    (tmp_path / "objects" / "datasets" / "t" / ".tmp-partial").write_bytes(b"half")
    assert [i.key for i in store.list("datasets/")] == ["datasets/t/a.zip"]
