"""Database fixtures shared by every test tier.

Nothing here touches a database until a test asks for one of the fixtures,
and the module imports only the standard library and pytest, so unit tests
run without PostgreSQL and without paying for SQLAlchemy's import.

The server: ``USERSVC_TEST_DATABASE_URL`` (a postgresql+asyncpg URL of a
server where the tests may CREATE DATABASE), else an embedded PostgreSQL under
``./.usersvc/test-pgdata``. Each test session gets a fresh database
``usersvc_test_<random>`` migrated to head, dropped at the end.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from usersvc.config import Settings
    from usersvc.domain.ports import UnitOfWorkFactory

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE_URL_ENV = "USERSVC_TEST_DATABASE_URL"
EMBEDDED_TEST_DATA_DIR = PROJECT_ROOT / ".usersvc" / "test-pgdata"


def database_url_for(server_url: str, database: str) -> str:
    """``server_url`` pointed at another database on the same server."""
    from sqlalchemy.engine import make_url

    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


async def run_admin_sql(server_url: str, *statements: str) -> None:
    """Run statements outside a transaction (CREATE/DROP DATABASE need that)
    on a connection of its own."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            for statement in statements:
                await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


async def create_database(server_url: str, prefix: str = "usersvc_test") -> str:
    """Create an empty database with a random name; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    await run_admin_sql(server_url, f'CREATE DATABASE "{name}"')
    return database_url_for(server_url, name)


async def drop_database(server_url: str, database_url: str) -> None:
    """Drop the database of ``database_url``; FORCE terminates the sessions
    still connected to it first (PostgreSQL 13+)."""
    from sqlalchemy.engine import make_url

    name = make_url(database_url).database
    await run_admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
async def no_task_left_pending() -> AsyncIterator[None]:
    """A test fails when an asyncio task it (or one of its function-scoped
    fixtures) started is still pending on the session loop after its last
    fixture was torn down; the leftovers are cancelled, so the next test
    starts clean. Session and module fixtures are set up before this one,
    so their long-lived tasks are not counted."""
    from support.tasks import cancel, describe, left_pending, live_tasks

    before = live_tasks()
    yield
    leftovers = await left_pending(before)
    if leftovers:
        await cancel(leftovers)
        pytest.fail(
            "asyncio tasks left pending by this test:\n"
            + "\n".join(f"  {describe(task)}" for task in leftovers),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of a PostgreSQL server where the tests may create databases."""
    url = os.environ.get(TEST_DATABASE_URL_ENV, "").strip()
    if url:
        return url
    from usersvc.adapters.embedded import start_embedded_postgres

    EMBEDDED_TEST_DATA_DIR.mkdir(parents=True, exist_ok=True)
    return start_embedded_postgres(EMBEDDED_TEST_DATA_DIR, database="postgres")


@pytest.fixture(scope="session")
async def database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh database for this test session, migrated to head."""
    from usersvc.adapters.migrations import upgrade_async

    url = await create_database(pg_server_url)
    try:
        await upgrade_async(url)
        yield url
    finally:
        await drop_database(pg_server_url, url)


@pytest.fixture
async def empty_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh database without any schema, dropped after the test."""
    url = await create_database(pg_server_url, prefix="usersvc_scratch")
    try:
        yield url
    finally:
        await drop_database(pg_server_url, url)


@pytest.fixture(scope="session")
async def served_with_admin(
    pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, str]]:
    """For suites that take nothing but an address (tests/contract, which
    imports none of our code and asks for this fixture by name): ``usersvc
    migrate``, ``create-admin`` and ``serve`` as subprocesses (through
    tests/support/servers.py) on a fresh database with sign-up open.
    Yields ``address``, ``admin_email`` and ``admin_password``."""
    from support.servers import run_usersvc, serve_env, serve_process

    url = await create_database(pg_server_url, prefix="usersvc_served")
    workdir = tmp_path_factory.mktemp("served-with-admin")
    admin_email = "contract-admin@example.com"
    admin_password = f"contract admin {secrets.token_hex(8)}"
    env = serve_env(
        url,
        workdir / "data",
        log_format="text",
        USERSVC_ALLOW_SIGNUP="true",
        # Such suites sign up and log in from one address within moments.
        USERSVC_AUTH_RATE_LIMIT_RPS="1000",
        USERSVC_AUTH_RATE_LIMIT_BURST="1000",
    )
    try:
        for command in (["migrate"], ["create-admin", "--email", admin_email]):
            done = await run_usersvc(
                {**env, "USERSVC_ADMIN_PASSWORD": admin_password}, *command, cwd=workdir
            )
            assert done.returncode == 0, f"usersvc {command}: {done.stdout}{done.stderr}"
        async with serve_process(env, workdir / "serve.log", cwd=workdir, stop="sigterm") as server:
            yield {
                "address": server.address,
                "admin_email": admin_email,
                "admin_password": admin_password,
            }
    finally:
        await drop_database(pg_server_url, url)


@pytest.fixture(scope="session")
def test_settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for tests: cheap bcrypt, a pool big enough for concurrency
    tests, the session's database."""
    from usersvc.config import Settings

    return Settings(
        database_url=database_url,
        db_pool_size=10,
        db_max_overflow=20,
        db_pool_timeout_seconds=30.0,
        db_statement_timeout_ms=5000,
        bcrypt_rounds=4,
        data_dir=tmp_path_factory.mktemp("usersvc-data"),
    )


@pytest.fixture(scope="session")
async def engine(test_settings: Settings, database_url: str) -> AsyncIterator[AsyncEngine]:
    """The AsyncEngine the service would build for the test database."""
    from usersvc.adapters.database import create_engine

    engine = create_engine(test_settings, database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def clean_db(engine: AsyncEngine) -> None:
    """Empty every table of the schema before the test."""
    from sqlalchemy.exc import DBAPIError

    from usersvc.adapters.database_errors import sqlstate_of
    from usersvc.adapters.orm import metadata

    tables = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
    # A served process's background work (the events feed numbering, the
    # relay moving its mark) can hold one of these tables while TRUNCATE
    # waits for it and holds another: PostgreSQL then ends one side with
    # deadlock_detected (40P01), which is safe to run again.
    for attempt in range(3):
        try:
            async with engine.begin() as connection:
                await connection.exec_driver_sql(
                    f"TRUNCATE TABLE {tables} RESTART IDENTITY CASCADE"
                )
            return
        except DBAPIError as error:
            if attempt == 2 or sqlstate_of(error) != "40P01":
                raise


@pytest.fixture
def uow_factory(engine: AsyncEngine) -> UnitOfWorkFactory:
    """Fresh SQLAlchemy units of work on the test database."""
    from usersvc.adapters.unit_of_work import make_uow_factory

    return make_uow_factory(engine)


# `make test` deselects the tests marked slow (`-m "not slow"`); the summary
# says how many and how to run them, so a skip is never silent.
_deselected_slow: list[str] = []


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected_slow.extend(item.nodeid for item in items if item.get_closest_marker("slow"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _deselected_slow:
        terminalreporter.write_line(
            f"{len(_deselected_slow)} tests marked slow were deselected; "
            "`make test SLOW=1` runs them (docs/testing.md)",
            yellow=True,
        )
