"""The revocation listener (usersvc.adapters.revocations) without a server:
how it reaches the database (the engine's URL turned into asyncpg.connect
arguments) and how it keeps the cache honest through losses and hangs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.exc import ArgumentError

from usersvc.adapters.database import CONNECT_TIMEOUT_SECONDS
from usersvc.adapters.revocation_channel import REVOCATION_CHANNEL
from usersvc.adapters.revocations import (
    LISTENER_APPLICATION_NAME,
    PostgresRevocationListener,
    asyncpg_connect_arguments,
)
from usersvc.config import Settings
from usersvc.domain.revocations import RevocationCache

SETTINGS = Settings(db_statement_timeout_ms=5000)


def test_connect_arguments_carry_host_port_user_password_and_database() -> None:
    args = asyncpg_connect_arguments(
        "postgresql+asyncpg://svc:s%40cret@db.internal:6543/users", SETTINGS
    )

    assert (args["host"], args["port"], args["user"], args["database"]) == (
        "db.internal",
        6543,
        "svc",
        "users",
    )
    assert args["password"] == "s@cret"


def test_connect_arguments_read_a_unix_socket_directory_from_the_host_query() -> None:
    args = asyncpg_connect_arguments(
        "postgresql+asyncpg://postgres@/users?host=/run/pg&port=5433", SETTINGS
    )

    assert args["host"] == "/run/pg"
    assert args["port"] == 5433


def test_connect_arguments_pass_asyncpg_ssl_through() -> None:
    args = asyncpg_connect_arguments("postgresql+asyncpg://u@h/d?ssl=verify-full", SETTINGS)

    assert args["ssl"] == "verify-full"
    assert "dsn" not in args


def test_connect_arguments_hand_libpq_tls_options_over_as_a_dsn() -> None:
    args = asyncpg_connect_arguments(
        "postgresql+asyncpg://u@h/d?sslmode=verify-ca&sslrootcert=/etc/ca.pem", SETTINGS
    )

    assert args["dsn"] == "postgresql://?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem"
    assert "sslmode" not in args
    assert args["host"] == "h"


def test_connect_arguments_name_the_listener_and_set_the_statement_timeout() -> None:
    args = asyncpg_connect_arguments("postgresql+asyncpg://u@h/d", SETTINGS)

    assert args["server_settings"] == {
        "application_name": LISTENER_APPLICATION_NAME,
        "statement_timeout": "5000",
    }
    assert args["command_timeout"] > 5
    assert args["timeout"] == CONNECT_TIMEOUT_SECONDS


def test_connect_arguments_take_the_connect_timeout_from_the_url_as_a_number() -> None:
    args = asyncpg_connect_arguments("postgresql+asyncpg://u@h/d?timeout=3", SETTINGS)

    assert args["timeout"] == 3.0


def test_connect_arguments_drop_options_only_the_sqlalchemy_dialect_understands() -> None:
    args = asyncpg_connect_arguments(
        "postgresql+asyncpg://u@h/d?prepared_statement_cache_size=0", SETTINGS
    )

    assert "prepared_statement_cache_size" not in args


def test_connect_arguments_refuse_a_url_for_another_driver() -> None:
    with pytest.raises(ArgumentError):
        asyncpg_connect_arguments("postgresql+psycopg://u@h/d", SETTINGS)


# ----------------------------------------------------------------- listener logic
# A fake asyncpg connection drives the listener through losses, hangs and
# reconnects that a real server cannot produce on demand (a half-open TCP
# connection, say). The real-server behaviour is in
# tests/integration/test_revocation_listener.py.

DEADLINE_SECONDS = 5.0
FUTURE = datetime.now(UTC) + timedelta(hours=1)


class FakeConnection:
    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = rows or []
        self.closed = False
        self.closed_gracefully = False
        self.heartbeat_hangs = False
        self.on_fetch: Callable[[FakeConnection], None] | None = None
        self._termination: list[Callable[[Any], None]] = []
        self._listeners: dict[str, Callable[..., None]] = {}

    def add_termination_listener(self, callback: Callable[[Any], None]) -> None:
        self._termination.append(callback)

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None:
        self._listeners[channel] = callback

    # The timeout parameters mirror asyncpg.Connection.
    async def fetch(
        self,
        query: str,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[dict[str, Any]]:
        if self.on_fetch is not None:
            self.on_fetch(self)
        return self.rows

    async def execute(self, query: str, timeout: float | None = None) -> str:  # noqa: ASYNC109
        if self.heartbeat_hangs:
            async with asyncio.timeout(timeout):
                await asyncio.Event().wait()
        return "SELECT 1"

    def is_closed(self) -> bool:
        return self.closed

    def get_server_pid(self) -> int:
        return 4242

    def notify(self, payload: str) -> None:
        callback = self._listeners[REVOCATION_CHANNEL]
        callback(self, 4242, REVOCATION_CHANNEL, payload)

    def drop(self) -> None:
        """What asyncpg does when the server goes away."""
        self.terminate()

    def terminate(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        for callback in self._termination:
            loop.call_soon(callback, self)

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.closed_gracefully = True
        self.terminate()


class Connector:
    """Hands out the given connections in order; raises ``failure`` for
    each None."""

    def __init__(self, *connections: FakeConnection | None) -> None:
        self.queue = list(connections)
        self.calls = 0

    async def __call__(self) -> FakeConnection:
        self.calls += 1
        connection = self.queue.pop(0) if self.queue else None
        if connection is None:
            raise OSError("connection refused")
        return connection


def row(session_id: str) -> dict[str, Any]:
    return {"session_id": uuid.UUID(session_id), "expire_time": FUTURE}


def new_id() -> str:
    return str(uuid.uuid4())


def listener_for(
    cache: RevocationCache, connector: Connector, **overrides: Any
) -> PostgresRevocationListener:
    options: dict[str, Any] = {
        "entry_ttl": timedelta(minutes=16),
        "heartbeat_interval": 0.02,
        "heartbeat_timeout": 0.05,
        "backoff_initial": 0.001,
        "backoff_max": 0.01,
    }
    options.update(overrides)
    return PostgresRevocationListener(cache, connector, **options)


async def eventually(predicate: Callable[[], bool]) -> float:
    """Seconds until ``predicate`` holds; fails after DEADLINE_SECONDS."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(DEADLINE_SECONDS):
        # Polled: the listener's state changes have no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    return loop.time() - start


@pytest.fixture
async def stoppable() -> AsyncIterator[list[PostgresRevocationListener]]:
    listeners: list[PostgresRevocationListener] = []
    yield listeners
    for listener in listeners:
        await listener.stop()


async def test_start_loads_the_table_and_reports_the_cache_healthy(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache, sid = RevocationCache(), new_id()
    listener = listener_for(cache, Connector(FakeConnection([row(sid)])))
    stoppable.append(listener)

    healthy = await listener.start()

    assert healthy
    assert cache.is_revoked(sid)


async def test_start_returns_unhealthy_when_the_database_cannot_be_reached(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache = RevocationCache()
    connector = Connector()
    listener = listener_for(cache, connector)
    stoppable.append(listener)

    healthy = await listener.start(ready_timeout=DEADLINE_SECONDS)

    assert not healthy
    assert connector.calls >= 1


async def test_a_notification_marks_its_sessions_revoked(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache, connection = RevocationCache(), FakeConnection()
    listener = listener_for(cache, Connector(connection))
    stoppable.append(listener)
    await listener.start()
    first, second = new_id(), new_id()

    connection.notify(f"{first},{second}")

    assert cache.is_revoked(first)
    assert cache.is_revoked(second)


async def test_a_notification_during_the_reload_survives_the_reload(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache, notified = RevocationCache(), new_id()
    connection = FakeConnection([row(new_id())])
    connection.on_fetch = lambda conn: conn.notify(notified)
    listener = listener_for(cache, Connector(connection))
    stoppable.append(listener)

    await listener.start()

    assert cache.is_revoked(notified)


async def test_a_lost_connection_marks_the_cache_unhealthy_before_any_heartbeat(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache, connection = RevocationCache(), FakeConnection()
    listener = listener_for(cache, Connector(connection), heartbeat_interval=60.0)
    stoppable.append(listener)
    await listener.start()

    connection.drop()
    elapsed = await eventually(lambda: not cache.healthy)

    assert elapsed < 1.0


async def test_a_feed_that_stops_answering_heartbeats_is_marked_unhealthy_within_a_second(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache, connection = RevocationCache(), FakeConnection()
    listener = listener_for(
        cache, Connector(connection), heartbeat_interval=0.25, heartbeat_timeout=0.5
    )
    stoppable.append(listener)
    await listener.start()

    connection.heartbeat_hangs = True
    elapsed = await eventually(lambda: not cache.healthy)

    assert elapsed < 1.0
    assert connection.closed


async def test_after_a_loss_the_listener_reconnects_and_reloads_what_it_missed(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache, missed = RevocationCache(), new_id()
    first, second = FakeConnection(), FakeConnection([row(missed)])
    listener = listener_for(cache, Connector(first, None, None, second))
    stoppable.append(listener)
    await listener.start()

    first.drop()
    await eventually(lambda: listener.reloads == 2)

    assert cache.healthy
    assert cache.is_revoked(missed)


async def test_connect_failures_are_retried_until_the_database_is_back(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache = RevocationCache()
    connector = Connector(None, None, None, FakeConnection())
    listener = listener_for(cache, connector)
    stoppable.append(listener)

    await listener.start()
    await eventually(lambda: cache.healthy)

    assert connector.calls == 4


async def test_stop_closes_the_connection_gracefully_and_leaves_the_cache_unhealthy() -> None:
    cache, connection = RevocationCache(), FakeConnection()
    listener = listener_for(cache, Connector(connection))
    await listener.start()

    await listener.stop()

    assert connection.closed_gracefully
    assert not cache.healthy
    assert listener.server_pid is None


async def test_starting_a_running_listener_is_refused(
    stoppable: list[PostgresRevocationListener],
) -> None:
    listener = listener_for(RevocationCache(), Connector(FakeConnection()))
    stoppable.append(listener)
    await listener.start()

    with pytest.raises(RuntimeError):
        await listener.start()


async def test_a_connection_that_worked_is_retried_at_once_after_a_streak_of_failures(
    stoppable: list[PostgresRevocationListener],
) -> None:
    # Nine failed attempts first: the backoff has grown to about 0.25-0.5 s.
    cache, first, second = RevocationCache(), FakeConnection(), FakeConnection()
    connector = Connector(*([None] * 9), first, second)
    listener = listener_for(cache, connector, backoff_initial=0.001, backoff_max=30.0)
    stoppable.append(listener)
    await listener.start()
    await eventually(lambda: listener.reloads == 1)

    first.drop()
    elapsed = await eventually(lambda: listener.reloads == 2)

    assert elapsed < 0.2


async def test_expired_entries_are_pruned_in_the_background(
    stoppable: list[PostgresRevocationListener],
) -> None:
    cache = RevocationCache()
    expired = {"session_id": uuid.uuid4(), "expire_time": datetime.now(UTC) - timedelta(seconds=1)}
    listener = listener_for(cache, Connector(FakeConnection([expired])), prune_interval=0.01)
    stoppable.append(listener)
    await listener.start()
    loaded = len(cache)

    await eventually(lambda: len(cache) == 0)

    assert loaded == 1
