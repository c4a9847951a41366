"""store.settings: the documented defaults (docs/settings.md), the PROMPTSTORE_ prefix, placeholder secrets refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from store.settings import Settings, get_settings

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("PROMPTSTORE_") and not name.startswith("PROMPTSTORE_TEST"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_embedded_defaults():
    s = Settings()
    assert s.database_url == "sqlite:///./var/promptstore.db"
    assert s.object_store_url == "file://./var/objects"
    assert (s.broker_url, s.redis_url, s.admin_token, s.device) == (None, None, None, None)
    assert s.backbone == "auto"
    assert s.max_upload_bytes == 200 * MiB
    assert s.max_archive_entries == 10_000 and s.max_expansion_ratio == 100.0
    assert s.max_image_pixels == 4096 * 4096 and s.max_uncompressed_bytes == 1024 * MiB
    assert (s.max_classify_images, s.max_batch, s.max_wait_ms, s.queue_size, s.job_threads) == (64, 32, 5, 1024, 1)
    assert s.log_format == "text"
    assert s.is_embedded_db and s.is_local_objects


def test_environment_prefix(monkeypatch):
    monkeypatch.setenv("PROMPTSTORE_DATABASE_URL", "postgresql+psycopg://u:p@db/promptstore")
    monkeypatch.setenv("PROMPTSTORE_OBJECT_STORE_URL", "s3://prompts?endpoint=http://minio:9000")
    monkeypatch.setenv("PROMPTSTORE_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("PROMPTSTORE_MAX_UPLOAD_BYTES", "1000")
    monkeypatch.setenv("PROMPTSTORE_ADMIN_TOKEN", "a-real-secret-value-1234567890")
    s = get_settings()
    assert s is get_settings()  # cached for Depends
    assert not s.is_embedded_db and not s.is_local_objects
    assert s.broker_url == "redis://redis:6379/0" and s.max_upload_bytes == 1000


@pytest.mark.parametrize("token", ["changeme", "CHANGEME", "change-me", "changethis", "secret", "admin", ""])
def test_placeholder_admin_token_refused_outside_local_runs(token):
    with pytest.raises(ValidationError, match="PROMPTSTORE_ADMIN_TOKEN is the placeholder"):
        Settings(database_url="postgresql+psycopg://u@db/p", admin_token=token)
    assert Settings(admin_token=token).admin_token == token  # embedded SQLite: fine


def test_invalid_values_are_named():
    with pytest.raises(ValidationError, match="max_batch"):
        Settings(max_batch=0)
    with pytest.raises(ValidationError, match="log_format"):
        Settings(log_format="xml")
    with pytest.raises(ValidationError, match="OBJECT_STORE_URL"):
        Settings(object_store_url="ftp://x")


def test_store_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, store.settings, store.db, store.models, store.repo, store.objects, store.publish, store.migrate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"

