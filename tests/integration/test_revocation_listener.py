"""The revocation listener and checker against a real PostgreSQL
(usersvc.adapters.revocations): notifications reach the cache, a revocation
missed while disconnected is recovered by the reload, an unhealthy cache
falls back to the database, and stop() leaves no connection behind."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.revocation_channel import REVOCATION_CHANNEL
from usersvc.adapters.revocations import (
    LISTENER_APPLICATION_NAME,
    CachedRevocationChecker,
    Connector,
    PostgresRevocationListener,
    asyncpg_connector,
)
from usersvc.config import Settings
from usersvc.domain.revocations import RevocationCache

DEADLINE_SECONDS = 10.0

ListenerMaker = Callable[..., PostgresRevocationListener]


async def eventually(predicate: Callable[[], bool]) -> None:
    """Returns once ``predicate`` holds; fails after DEADLINE_SECONDS."""
    async with asyncio.timeout(DEADLINE_SECONDS):
        # Polled: the listener's state changes have no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def revoke(engine: AsyncEngine, session_id: str, *, notify: bool = True) -> None:
    """What a revoking transaction does: the log row and, on commit, the
    notification."""
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO session_revocations (session_id, expire_time) "
                "VALUES (:sid, now() + interval '15 minutes')"
            ),
            {"sid": uuid.UUID(session_id)},
        )
        if notify:
            await connection.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": REVOCATION_CHANNEL, "payload": session_id},
            )


async def backend_alive(engine: AsyncEngine, pid: int) -> bool:
    async with engine.connect() as connection:
        result = await connection.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        )
        return bool(result.scalar_one())


class Gate:
    """Wraps a connector so a test can hold reconnects back."""

    def __init__(self, connect: Connector) -> None:
        self._connect = connect
        self.open = asyncio.Event()
        self.open.set()
        self.waiting = asyncio.Event()

    async def __call__(self) -> Any:
        if not self.open.is_set():
            self.waiting.set()
            await self.open.wait()
        return await self._connect()


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def connector(test_settings: Settings, database_url: str) -> Connector:
    return asyncpg_connector(database_url, test_settings)


@pytest.fixture
async def make_listener(connector: Connector) -> AsyncIterator[ListenerMaker]:
    """Builds listeners (fast reconnects) and stops them after the test."""
    listeners: list[PostgresRevocationListener] = []

    def make(
        cache: RevocationCache, connect: Connector | None = None, **overrides: Any
    ) -> PostgresRevocationListener:
        options: dict[str, Any] = {
            "entry_ttl": timedelta(minutes=16),
            "backoff_initial": 0.01,
            "backoff_max": 0.1,
        }
        options.update(overrides)
        listener = PostgresRevocationListener(cache, connect or connector, **options)
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        await listener.stop()


async def test_revocations_already_in_the_table_are_loaded_on_start(
    engine: AsyncEngine, make_listener: ListenerMaker
) -> None:
    sid = new_id()
    await revoke(engine, sid, notify=False)
    cache = RevocationCache()

    healthy = await make_listener(cache).start()

    assert healthy
    assert cache.is_revoked(sid)


async def test_expired_revocations_are_not_loaded(
    engine: AsyncEngine, make_listener: ListenerMaker
) -> None:
    sid = new_id()
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO session_revocations (session_id, revoke_time, expire_time) "
                "VALUES (:sid, now() - interval '1 hour', now() - interval '1 second')"
            ),
            {"sid": uuid.UUID(sid)},
        )
    cache = RevocationCache()

    await make_listener(cache).start()

    assert not cache.is_revoked(sid)


async def test_a_committed_revocation_reaches_the_cache_through_notify(
    engine: AsyncEngine, make_listener: ListenerMaker
) -> None:
    cache = RevocationCache()
    await make_listener(cache).start()
    sid = new_id()

    await revoke(engine, sid)

    await eventually(lambda: cache.is_revoked(sid))


async def test_a_rolled_back_revocation_is_never_announced(
    engine: AsyncEngine, make_listener: ListenerMaker
) -> None:
    cache = RevocationCache()
    await make_listener(cache).start()
    rolled_back, committed = new_id(), new_id()

    async with engine.connect() as connection:
        await connection.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": REVOCATION_CHANNEL, "payload": rolled_back},
        )
        await connection.rollback()
    # Notifications arrive in commit order: once the later one is in, the
    # earlier one would have been too.
    await revoke(engine, committed)
    await eventually(lambda: cache.is_revoked(committed))

    assert not cache.is_revoked(rolled_back)


async def test_a_revocation_committed_while_disconnected_is_honoured_after_reconnect(
    engine: AsyncEngine, make_listener: ListenerMaker, connector: Connector
) -> None:
    cache, gate = RevocationCache(), Gate(connector)
    listener = make_listener(cache, gate)
    await listener.start()
    pid = listener.server_pid
    assert pid is not None
    gate.open.clear()

    async with engine.connect() as connection:
        await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    await eventually(lambda: not cache.healthy)
    async with asyncio.timeout(DEADLINE_SECONDS):
        await gate.waiting.wait()
    # Nobody listens now: this notification is lost for good.
    sid = new_id()
    await revoke(engine, sid)
    missed_while_down = cache.is_revoked(sid)
    gate.open.set()
    await eventually(lambda: cache.healthy)

    assert not missed_while_down
    assert cache.is_revoked(sid)
    assert listener.reloads == 2
    assert listener.server_pid not in (None, pid)


async def test_a_terminated_backend_marks_the_cache_unhealthy_without_waiting_for_a_heartbeat(
    engine: AsyncEngine, make_listener: ListenerMaker, connector: Connector
) -> None:
    cache, gate = RevocationCache(), Gate(connector)
    listener = make_listener(cache, gate, heartbeat_interval=3600.0)
    await listener.start()
    pid = listener.server_pid
    gate.open.clear()
    loop = asyncio.get_running_loop()

    async with engine.connect() as connection:
        await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    terminated_at = loop.time()
    await eventually(lambda: not cache.healthy)

    assert loop.time() - terminated_at < 1.0


async def test_an_unhealthy_checker_answers_from_the_database(engine: AsyncEngine) -> None:
    cache = RevocationCache()
    checker = CachedRevocationChecker(cache, engine)
    revoked, live = new_id(), new_id()
    await revoke(engine, revoked, notify=False)

    answers = (await checker.is_revoked(revoked), await checker.is_revoked(live))

    assert answers == (True, False)
    assert checker.database_checks == 2


async def test_the_database_fallback_ignores_expired_revocations(engine: AsyncEngine) -> None:
    sid = new_id()
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO session_revocations (session_id, revoke_time, expire_time) "
                "VALUES (:sid, now() - interval '1 hour', now() - interval '1 second')"
            ),
            {"sid": uuid.UUID(sid)},
        )
    checker = CachedRevocationChecker(RevocationCache(), engine)

    assert not await checker.is_revoked(sid)


async def test_a_revocation_found_in_the_database_is_remembered(engine: AsyncEngine) -> None:
    cache = RevocationCache()
    checker = CachedRevocationChecker(cache, engine)
    sid = new_id()
    await revoke(engine, sid, notify=False)

    await checker.is_revoked(sid)
    again = await checker.is_revoked(sid)

    assert again
    assert checker.database_checks == 1


async def test_a_session_id_that_is_no_uuid_is_not_revoked_and_costs_no_query(
    engine: AsyncEngine,
) -> None:
    checker = CachedRevocationChecker(RevocationCache(), engine)

    assert not await checker.is_revoked("not-a-uuid")
    assert checker.database_checks == 0


async def test_a_healthy_checker_sends_no_statement_to_the_database(
    engine: AsyncEngine, make_listener: ListenerMaker
) -> None:
    cache = RevocationCache()
    await make_listener(cache).start()
    checker = CachedRevocationChecker(cache, engine)
    revoked = new_id()
    await revoke(engine, revoked)
    await eventually(lambda: cache.is_revoked(revoked))
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        answers = [await checker.is_revoked(sid) for sid in (revoked, new_id(), new_id())]
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)

    assert answers == [True, False, False]
    assert statements == []
    assert checker.database_checks == 0


async def test_a_stopped_listener_sends_the_checker_to_the_database(
    engine: AsyncEngine, make_listener: ListenerMaker
) -> None:
    cache = RevocationCache()
    listener = make_listener(cache)
    await listener.start()
    checker = CachedRevocationChecker(cache, engine)
    await listener.stop()
    sid = new_id()
    await revoke(engine, sid, notify=False)

    assert await checker.is_revoked(sid)
    assert checker.database_checks == 1


async def test_stop_leaves_no_listener_connection_on_the_server(
    engine: AsyncEngine, make_listener: ListenerMaker
) -> None:
    listener = make_listener(RevocationCache())
    await listener.start()
    pid = listener.server_pid
    assert pid is not None
    assert await backend_alive(engine, pid)

    await listener.stop()

    # The backend exits just after the client's goodbye, not with it.
    async with asyncio.timeout(DEADLINE_SECONDS):
        while await backend_alive(engine, pid):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert listener.server_pid is None


async def test_the_listener_connection_is_named_in_pg_stat_activity(
    engine: AsyncEngine, make_listener: ListenerMaker
) -> None:
    listener = make_listener(RevocationCache())
    await listener.start()

    async with engine.connect() as connection:
        name = (
            await connection.execute(
                text("SELECT application_name FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": listener.server_pid},
            )
        ).scalar_one()

    assert name == LISTENER_APPLICATION_NAME
