"""Alembic environment: the URL comes from ``store.settings`` (PROMPTSTORE_DATABASE_URL)
unless ``store.migrate`` passes one; SQLite uses batch mode so ALTERs work there too."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import DateTime
from sqlalchemy.pool import NullPool

from store import models  # noqa: F401  (registers every table on Base.metadata)
from store.db import Base, UTCDateTime, make_engine

config = context.config

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from store.settings import Settings

    return Settings().database_url


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render our UTCDateTime as a plain timezone-aware DateTime: migrations must not import
    application types that may change later."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure_kwargs(url: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "compare_type": True,
        "compare_server_default": False,
        "render_as_batch": url.startswith("sqlite"),
        "render_item": render_item,
    }


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **configure_kwargs(url))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **configure_kwargs(str(connection.engine.url)))
        with context.begin_transaction():
            context.run_migrations()
        return
    url = database_url()
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, **configure_kwargs(url))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
