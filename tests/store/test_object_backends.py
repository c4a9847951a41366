"""The object-store registry (issue "One renovation of the house", item 7): one backend per URL
scheme, each declaring its transient errors and opening itself from a URL and the settings."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import store.objects as objects
from store.objects import BACKENDS, ObjectStoreError, backend_for, known_schemes, open_object_store, transient_errors
from store.settings import Settings


def test_every_backend_declares_its_scheme_and_transient_errors() -> None:
    assert set(known_schemes()) >= {"file", "s3"}
    for scheme in BACKENDS:
        cls = backend_for(scheme)
        assert cls.scheme == scheme
        assert isinstance(cls.transient_errors, tuple)
        assert all(isinstance(e, type) and issubclass(e, BaseException) for e in cls.transient_errors)
        assert set(cls.transient_errors) <= set(transient_errors())


def test_the_worker_retries_what_the_backends_call_transient() -> None:
    from worker.jobs import TRANSIENT_ERRORS

    assert set(transient_errors()) <= set(TRANSIENT_ERRORS)


def test_file_backend_from_url(tmp_path: Path) -> None:
    store = open_object_store(f"file://{tmp_path}")
    assert type(store).__name__ == "LocalObjectStore" and store.location == f"file://{tmp_path.resolve()}"
    with pytest.raises(ObjectStoreError, match="needs a path"):
        open_object_store("file://")


def test_unknown_scheme_is_refused_by_the_store_and_the_settings() -> None:
    with pytest.raises(ObjectStoreError, match=r"file://PATH or s3://"):
        open_object_store("gs://bucket")
    with pytest.raises(ValueError, match=r"not supported; use file://PATH or s3://"):
        Settings(object_store_url="gs://bucket")


def test_s3_credentials_come_from_generic_settings_or_their_s3_synonyms() -> None:
    url = "s3://bucket?endpoint=http://127.0.0.1:9"
    assert Settings(s3_access_key="a", s3_secret_key="b").object_store_credentials() == ("a", "b")
    generic = Settings(object_store_access_key="A", object_store_secret_key="B", s3_access_key="a")
    assert generic.object_store_credentials() == ("A", "B")
    store = open_object_store(Settings(object_store_url=url, object_store_access_key="A", object_store_secret_key="B"))
    assert store.client._provider.retrieve().access_key == "A"  # type: ignore[attr-defined]


def test_a_new_backend_is_one_module_and_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    class MemoryStore(objects.LocalObjectStore):
        scheme = "mem"
        transient_errors = (Boom,)

        @classmethod
        def from_url(cls, url, settings=None, *, access_key=None, secret_key=None):  # type: ignore[no-untyped-def]
            return cls(tmp_path / url[len("mem://") :])

    module = types.ModuleType("psmem_backend")
    module.MemoryStore = MemoryStore  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "psmem_backend", module)
    monkeypatch.setitem(BACKENDS, "mem", "psmem_backend:MemoryStore")
    assert Settings(object_store_url="mem://x").object_store_url == "mem://x"
    store = open_object_store("mem://x")
    store.put("a/b", b"1")
    assert store.get("a/b") == b"1"
    assert Boom in transient_errors()
