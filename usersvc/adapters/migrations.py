"""Schema migrations, callable from code (``usersvc migrate``, ``usersvc
serve`` on an embedded database, the test fixtures).

The functions are synchronous: Alembic's env.py runs the async driver in a
fresh event loop with ``asyncio.run``. From inside a running loop call them
through ``asyncio.to_thread`` (or use the ``*_async`` wrappers here). Alembic
keeps its migration context in module globals: run one migration at a time per
process (replicas in separate processes are fine; they take turns on an
advisory lock).

The scripts are part of the package (``usersvc/migrations/``: env.py,
script.py.mako, versions/), so a wheel install, such as the container
image's, migrates as well as a checkout does. The Config is built here in
code; ``alembic.ini`` at the top of the repository only serves developers who
run the ``alembic`` command line there (``alembic revision --autogenerate``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import alembic.command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

SCRIPT_LOCATION = Path(__file__).resolve().parent.parent / "migrations"

# Key of the PostgreSQL advisory lock env.py holds while migrating ("usersvc"
# in ASCII), so replicas starting together migrate one after the other.
MIGRATION_LOCK_KEY = 0x75736572737663


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config for this project, usable from any working directory
    and without an ini file; ``url`` overrides the environment. Raises
    FileNotFoundError when the package lacks its migration scripts (a broken
    build)."""
    if not (SCRIPT_LOCATION / "env.py").is_file():
        raise FileNotFoundError(f"migration scripts not found at {SCRIPT_LOCATION}")
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # The version files are found by path; "os" is what alembic.ini says too.
    config.set_main_option("path_separator", "os")
    config.attributes["configure_logger"] = False
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``. Must not be called
    from a thread that runs an event loop. Raises alembic.util.CommandError
    for an unknown revision; SQLAlchemy/asyncpg errors (OSError among them)
    when the database is unreachable or a migration fails, in which case the
    migration's transaction is rolled back."""
    alembic.command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` for
    an empty schema). Same threading rule and errors as ``upgrade``."""
    alembic.command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at; None before the first
    migration. Same threading rule as ``upgrade``. Raises SQLAlchemy/asyncpg
    errors when the database is unreachable."""
    return asyncio.run(_current(url))


def head() -> str | None:
    """The newest revision of the scripts. Raises FileNotFoundError."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade_async(url: str, revision: str = "head") -> None:
    """``upgrade`` in a worker thread, for callers inside an event loop."""
    await asyncio.to_thread(upgrade, url, revision)


async def downgrade_async(url: str, revision: str) -> None:
    """``downgrade`` in a worker thread, for callers inside an event loop."""
    await asyncio.to_thread(downgrade, url, revision)


async def current_async(url: str) -> str | None:
    """``current`` in a worker thread, for callers inside an event loop."""
    return await asyncio.to_thread(current, url)


async def _current(url: str) -> str | None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_revision_of)
    finally:
        await engine.dispose()


def _revision_of(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()
