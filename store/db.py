"""Engine, sessions and the declarative base.

``Base.metadata`` is what Alembic autogenerates from; production code never calls
``create_all`` (tests may).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

#: Deterministic constraint names, so migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Timezone-aware now in UTC."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store only timezone-aware timestamps")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dt.datetime: UTCDateTime(),
        dict[str, Any]: JSON(none_as_null=True),
        list[Any]: JSON(none_as_null=True),
    }


def make_engine(
    url: str, *, connect_timeout: float | None = None, timeout: float | None = None, **kwargs: Any
) -> Engine:
    """An engine for ``url``. SQLite gets foreign keys, WAL and a busy timeout; the parent
    folder of a SQLite file is created (the embedded default lives in ./var). Postgres gets
    bounded waits (``connect_timeout``, ``timeout``: settings ``db_connect_timeout``,
    ``db_timeout``; see ``_postgres_engine``)."""
    u = make_url(url)
    from store.textinput import loads_stored

    # whatever a JSON column holds (NaN, a lone surrogate, 100,000 levels) reads as a safe value
    kwargs.setdefault("json_deserializer", loads_stored)
    if u.get_backend_name() == "sqlite":
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", 30)
        memory = u.database in (None, "", ":memory:")
        if memory:
            kwargs.setdefault("poolclass", StaticPool)
        else:
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            from store.textinput import decode_stored_text

            dbapi_conn.text_factory = decode_stored_text  # invalid UTF-8 in a TEXT column reads as U+FFFD
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if u.get_backend_name() == "postgresql" and u.get_driver_name() == "psycopg":
        return _postgres_engine(url, kwargs, connect_timeout=connect_timeout, timeout=timeout)
    return create_engine(url, **kwargs)


#: Defaults of ``PROMPTSTORE_DB_CONNECT_TIMEOUT`` and ``PROMPTSTORE_DB_TIMEOUT`` (store.settings).
DEFAULT_DB_CONNECT_TIMEOUT = 3.0
DEFAULT_DB_TIMEOUT = 5.0
#: A server that does not answer at all (frozen, partitioned) is given up this long after
#: its own statement_timeout would have cancelled the statement.
CLIENT_TIMEOUT_MARGIN_S = 1.0


def _postgres_engine(url: str, kwargs: dict[str, Any], *, connect_timeout: float | None, timeout: float | None) -> Engine:
    """Postgres through psycopg 3 with every wait bounded: connect (``connect_timeout``, also the
    wait for a pooled connection), each statement on the server (``statement_timeout``,
    ``lock_timeout``), and each wait for the server's answer on the client (``timeout`` plus a
    margin: a frozen server cancels nothing). A client-side timeout closes the connection and
    raises ``DatabaseTimeout`` (a psycopg ``OperationalError``, so SQLAlchemy discards the
    connection and the API answers 503)."""
    connect_timeout = DEFAULT_DB_CONNECT_TIMEOUT if connect_timeout is None else float(connect_timeout)
    timeout = DEFAULT_DB_TIMEOUT if timeout is None else float(timeout)
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("connect_timeout", max(2, math.ceil(connect_timeout)))
    ms = max(1, int(timeout * 1000))
    options = connect_args.get("options", "")
    connect_args["options"] = f"{options} -c statement_timeout={ms} -c lock_timeout={ms}".strip()
    if "poolclass" not in kwargs:  # the default QueuePool: wait this long for a free connection
        kwargs.setdefault("pool_timeout", connect_timeout)
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    connection_class = bounded_pg_connection_class(timeout + CLIENT_TIMEOUT_MARGIN_S)

    @event.listens_for(engine, "do_connect")
    def _bounded_connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return connection_class.connect(*cargs, **cparams)

    return engine


def bounded_pg_connection_class(wait_s: float) -> Any:
    """A ``psycopg.Connection`` whose every wait on the server gives up after ``wait_s``."""
    import psycopg
    from psycopg import errors as pg_errors

    from store.timeouts import DATABASE, DependencyTimeout

    class DatabaseTimeout(psycopg.OperationalError, DependencyTimeout):
        def __init__(self, seconds: float) -> None:
            DependencyTimeout.__init__(self, DATABASE, seconds)

    class BoundedConnection(psycopg.Connection):  # type: ignore[type-arg]
        def wait(self, gen: Any, interval: Any = None, timeout: float | None = None) -> Any:  # type: ignore[override]
            kw: dict[str, Any] = {"timeout": wait_s if timeout is None else min(timeout, wait_s)}
            if interval is not None:
                kw["interval"] = interval
            try:
                return super().wait(gen, **kw)
            except pg_errors._WaitTimeout:
                self.pgconn.finish()  # the protocol is mid-answer: this connection is unusable
                raise DatabaseTimeout(kw["timeout"]) from None

    return BoundedConnection


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (handlers return them)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


_sessionmakers_lock = threading.Lock()
_sessionmakers: dict[tuple[str, float | None, float | None], sessionmaker[Session]] = {}


def get_sessionmaker(
    database_url: str, *, connect_timeout: float | None = None, timeout: float | None = None
) -> sessionmaker[Session]:
    """The process's sessionmaker for ``database_url`` with these timeouts (settings
    ``db_connect_timeout``, ``db_timeout``; None: their defaults), made on first use and then
    shared by the API and the jobs of this process."""
    key = (database_url, connect_timeout, timeout)
    with _sessionmakers_lock:
        sm = _sessionmakers.get(key)
        if sm is None:
            sm = make_sessionmaker(make_engine(database_url, connect_timeout=connect_timeout, timeout=timeout))
            _sessionmakers[key] = sm
        return sm


@contextmanager
def session_scope(sm: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error, always close."""
    session = sm()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
