"""Schema migrations, callable from code (``usersvc migrate``, ``usersvc
serve`` on an embedded database, the test fixtures).

The functions are synchronous: Alembic's env.py runs the async driver in a
fresh event loop with ``asyncio.run``. From inside a running loop call them
through ``asyncio.to_thread`` (or use the ``*_async`` wrappers here). Alembic
keeps its migration context in module globals: run one migration at a time per
process (replicas in separate processes are fine; they take turns on an
advisory lock).

The scripts live in the repository's top-level ``alembic/`` (env.py,
script.py.mako, versions/, as ``alembic init`` lays them out) and are
installed as the package ``usersvc_migrations`` (pyproject.toml maps the
directory to that name), so a wheel install, such as the container image's,
migrates as well as a checkout does. The Config is built here in code;
``alembic.ini`` at the top of the repository serves developers who run the
``alembic`` command line there (``alembic revision --autogenerate``).
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import alembic.command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

# The installed name of the top-level alembic/ directory. It has no
# __init__.py (so `import alembic` in the repository still gets the library),
# which makes it a namespace package: found by spec, never imported.
SCRIPTS_PACKAGE = "usersvc_migrations"

# Key of the PostgreSQL advisory lock env.py holds while migrating ("usersvc"
# in ASCII), so replicas starting together migrate one after the other.
MIGRATION_LOCK_KEY = 0x75736572737663


def script_location() -> Path:
    """The directory holding env.py, script.py.mako and versions/. Raises
    FileNotFoundError when the install lacks the migration scripts (a broken
    build)."""
    spec = importlib.util.find_spec(SCRIPTS_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "env.py").is_file():
            return Path(location).resolve()
    raise FileNotFoundError(f"migration scripts ({SCRIPTS_PACKAGE}) not installed")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config for this project, usable from any working directory
    and without an ini file; ``url`` overrides the environment. Raises
    FileNotFoundError when the install lacks its migration scripts."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
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
