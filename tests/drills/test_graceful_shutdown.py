"""SIGTERM while a real ``usersvc serve`` process is under a load of
concurrent calls: no call the server accepted fails, new calls are refused
with UNAVAILABLE, the process exits 0 within the grace period, and it
leaves no connection to PostgreSQL behind.

"Accepted" is read from the server's own access log, which has a line for
every call that reached the service: each of those lines must say OK, and
each OK there must have reached its client as OK. Every other call a client
made must have been refused at the door (UNAVAILABLE without ErrorInfo).

The scenario runs once for the module (a few seconds); each test checks one
of its promises. (tests/e2e/test_process.py drains a single slow call; the
slow drill with a bigger load is tests/drills/test_drills.py.)
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from .support import ShutdownDrill, service_env, sigterm_under_load

GRACE_SECONDS = 10.0
CLIENTS = 6
SUCCESSES_BEFORE_SIGTERM = 60
SERVICE_APPLICATIONS = ["usersvc", "usersvc-revocations", "usersvc-health"]


async def _admin(server_url: str, statement: str) -> None:
    engine = create_async_engine(server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shutdown_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A migrated database of this module's own: the connection count at
    the end must see this server's connections only."""
    from usersvc.adapters.migrations import upgrade_async

    name = f"usersvc_shutdown_{secrets.token_hex(4)}"
    await _admin(pg_server_url, f'CREATE DATABASE "{name}"')
    url = make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    try:
        await upgrade_async(url)
        yield url
    finally:
        await _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def drill(
    shutdown_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> ShutdownDrill:
    base = tmp_path_factory.mktemp("shutdown")
    env = service_env(
        shutdown_database_url,
        base / "data",
        USERSVC_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
    )
    result = await sigterm_under_load(
        env, base / "serve.log", clients=CLIENTS, successes_before=SUCCESSES_BEFORE_SIGTERM
    )
    print(result.tally.report("SIGTERM under load"))
    return result


async def connections_left(database_url: str) -> int:
    """The service's connections to ``database_url``, once they are gone
    (backends leave pg_stat_activity a moment after their client); the
    count that remains after 5 s otherwise."""
    engine = create_async_engine(database_url, poolclass=NullPool)
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = ANY(:names)"
    )
    count = -1
    try:
        for _ in range(250):
            async with engine.connect() as connection:
                count = (
                    await connection.execute(query, {"names": SERVICE_APPLICATIONS})
                ).scalar_one()
            if count == 0:
                break
            await asyncio.sleep(0.02)  # polled: bounded by the loop
    finally:
        await engine.dispose()
    return count


async def test_the_process_exits_0_within_the_grace_period(drill: ShutdownDrill) -> None:
    assert drill.exit_code == 0
    assert drill.exit_seconds < GRACE_SECONDS


async def test_no_call_the_server_accepted_failed(drill: ShutdownDrill) -> None:
    assert drill.server_failures == []
    assert drill.unexpected() == {}


async def test_every_call_the_server_answered_reached_its_client(drill: ShutdownDrill) -> None:
    assert drill.server_ok == drill.client_ok
    assert drill.tally.successes >= SUCCESSES_BEFORE_SIGTERM


async def test_calls_after_the_stop_began_are_refused_with_unavailable(
    drill: ShutdownDrill,
) -> None:
    assert drill.tally.count("UNAVAILABLE") >= CLIENTS


async def test_no_connection_to_postgresql_is_left_open(
    drill: ShutdownDrill, shutdown_database_url: str
) -> None:
    assert await connections_left(shutdown_database_url) == 0
