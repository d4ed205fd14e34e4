"""Alembic environment: async migrations on the asyncpg driver.

The URL comes from, in order: ``config.attributes["url"]`` (set by
``usersvc.adapters.migrations``), then through Settings
``USERSVC_MIGRATION_DATABASE_URL`` (a role allowed to change the schema) and
``USERSVC_DATABASE_URL``.

Migrations run in one transaction that first takes an advisory lock, so
replicas that start together migrate one after the other: the later ones find
the schema current and do nothing.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from usersvc.adapters.migrations import MIGRATION_LOCK_KEY
from usersvc.adapters.orm import metadata
from usersvc.config import Settings

config = context.config

# Programmatic callers keep their own logging set-up: fileConfig would replace
# it (and silence every logger created before).
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def database_url() -> str:
    """Raises RuntimeError when no URL is configured; SettingsError when the
    environment is invalid."""
    url = config.attributes.get("url")
    if url:
        return str(url)
    settings = Settings.from_env()
    url = settings.migration_database_url or settings.database_url
    if url:
        return url
    raise RuntimeError(
        "no database to migrate: set USERSVC_MIGRATION_DATABASE_URL or "
        "USERSVC_DATABASE_URL, or run `usersvc migrate`"
    )


def configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (``alembic upgrade head --sql``)."""
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    configure(connection=connection)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def run_async_migrations() -> None:
    # No statement_timeout or pooling here: a migration may legitimately run
    # long, and it needs exactly one connection.
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    # A fresh event loop: callers already inside one use asyncio.to_thread.
    asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
