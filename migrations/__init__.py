"""Alembic migrations for the store (see store/migrate.py; `promptstore migrate`)."""
