"""create_engine's per-connection settings, and the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database import create_engine
from usersvc.adapters.embedded import (
    EmbeddedDatabaseError,
    start_embedded_postgres,
    stop_embedded_postgres,
)
from usersvc.config import Settings

EngineMaker = Callable[..., AsyncEngine]


async def show(engine: AsyncEngine, setting: str) -> str:
    async with engine.connect() as connection:
        value = (await connection.execute(text(f"SHOW {setting}"))).scalar_one()
    return str(value)


async def test_the_statement_timeout_from_settings_is_in_effect_on_pooled_connections(
    make_engine: EngineMaker,
) -> None:
    engine = make_engine(db_statement_timeout_ms=1234)
    first = await show(engine, "statement_timeout")
    second = await show(engine, "statement_timeout")  # the same connection, from the pool
    assert (first, second) == ("1234ms", "1234ms")


async def test_a_statement_timeout_of_zero_leaves_the_server_setting(
    make_engine: EngineMaker,
) -> None:
    engine = make_engine(db_statement_timeout_ms=0)
    assert await show(engine, "statement_timeout") == "0"


async def test_connections_identify_themselves_as_usersvc(engine: AsyncEngine) -> None:
    assert await show(engine, "application_name") == "usersvc"


async def test_a_failed_statement_names_no_bound_parameter(engine: AsyncEngine) -> None:
    # SQLAlchemy quotes bound parameters in its error texts unless the
    # engine hides them; those texts reach the error mapper's traceback.
    secret = "$2b$04$" + "s" * 53
    with pytest.raises(DBAPIError) as info:
        async with engine.connect() as connection:
            await connection.execute(
                text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, :hash)"),
                {"id": "not-a-uuid", "email": "x@example.com", "hash": secret},
            )
    message = str(info.value)
    assert "INSERT INTO users" in message
    assert (secret in message, "parameters hidden" in message) == (False, True)


async def test_the_pool_is_sized_from_settings(make_engine: EngineMaker) -> None:
    engine = make_engine(db_pool_size=3, db_max_overflow=0)
    assert engine.pool.size() == 3  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def embedded_data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: when the tests run as root, PostgreSQL runs
    # as another user, which cannot enter pytest's private temporary folders.
    with tempfile.TemporaryDirectory(prefix="usersvc-embedded-") as name:
        data_dir = Path(name).resolve()
        # mkdtemp makes it 0700; the server's user must be able to enter it
        # (we own it: opening it is ours to do, not the embedded start's).
        data_dir.chmod(0o755)
        try:
            yield data_dir
        finally:
            stop_embedded_postgres(data_dir)


async def test_the_embedded_postgres_serves_a_usersvc_database(
    embedded_data_dir: Path, test_settings: Settings
) -> None:
    url = await asyncio.to_thread(start_embedded_postgres, embedded_data_dir)
    engine = create_engine(test_settings, url)
    try:
        assert await show(engine, "server_version_num") >= "160000"
        async with engine.connect() as connection:
            database = (await connection.execute(text("SELECT current_database()"))).scalar_one()
    finally:
        await engine.dispose()
    assert database == "usersvc"
    assert str(make_url(url).query["host"]).startswith(str(embedded_data_dir))


async def test_starting_the_embedded_postgres_again_reuses_it(embedded_data_dir: Path) -> None:
    first = await asyncio.to_thread(start_embedded_postgres, embedded_data_dir)
    second = await asyncio.to_thread(start_embedded_postgres, embedded_data_dir)
    assert first == second


def modes(*paths: Path) -> dict[Path, int]:
    """The permission bits of each path and of all its parents up to /."""
    return {
        directory: stat.S_IMODE(directory.stat().st_mode)
        for path in paths
        for directory in (path, *path.parents)
    }


def bundled_binaries() -> Path:
    import pgserver

    return Path(pgserver.__file__).resolve().parent / "pginstall" / "bin"


@pytest.fixture
def private_directory() -> Iterator[Path]:
    """A fresh directory as ``mktemp -d`` makes it (0700, like /root)."""
    with tempfile.TemporaryDirectory(prefix="usersvc-private-") as name:
        private = Path(name).resolve()
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        yield private


def test_the_embedded_start_in_a_private_directory_changes_no_permission_above_it(
    private_directory: Path,
) -> None:
    # A clone inside such a directory: as root, PostgreSQL runs as another
    # user, who cannot pass; the start must say so instead of opening that
    # directory (and /tmp, and the virtualenv's parents) to everyone.
    data_dir = private_directory / "data"
    before = modes(private_directory, bundled_binaries())
    try:
        if os.geteuid() == 0:
            with pytest.raises(EmbeddedDatabaseError, match=re.escape(str(private_directory))):
                start_embedded_postgres(data_dir)
        else:
            url = start_embedded_postgres(data_dir)
            assert make_url(url).database == "usersvc"
    finally:
        stop_embedded_postgres(data_dir)
    assert modes(private_directory, bundled_binaries()) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as another user only for root")
async def test_as_root_the_embedded_start_where_its_user_may_pass_changes_nothing_above(
    private_directory: Path, test_settings: Settings
) -> None:
    # Enter, not list: the least the server's user needs, granted by us.
    await asyncio.to_thread(private_directory.chmod, 0o711)
    data_dir = private_directory / "data"
    before = modes(private_directory, bundled_binaries())
    try:
        url = await asyncio.to_thread(start_embedded_postgres, data_dir)
        engine = create_engine(test_settings, url)
        try:
            assert await show(engine, "server_version_num") >= "160000"
        finally:
            await engine.dispose()
    finally:
        stop_embedded_postgres(data_dir)
    assert modes(private_directory, bundled_binaries()) == before
