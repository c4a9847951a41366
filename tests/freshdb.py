"""``fresh_pg_url``: a new, empty, never migrated Postgres database for one test (dropped
afterwards), for tests that check the whole index (``promptstore fsck`` lists every row without
its object, so the session's shared ``pg_url``, which other tests fill, will not do) or a
database's migration state. Import the fixture into a test module:
``from freshdb import fresh_pg_url``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    import psycopg

    def connect() -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True,
                               connect_timeout=5)  # fmt: skip

    try:
        admin = connect()
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres at 127.0.0.1:5432 is not available: {exc}", pytrace=False)
    name = f"promptstore_fresh_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with connect() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
