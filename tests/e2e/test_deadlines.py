"""The caller's deadline bounds the database work; without one, the
server's statement timeout does.

A call is made slow legitimately: a transaction of the test holds the
target's row lock, so the server's UPDATE waits for it. The lock is still
held when the checks run, so a query that had merely finished could not
pass them: it must have been cancelled inside PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest_asyncio
from google.protobuf import field_mask_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    World,
    expect_error,
    fails,
    user_pb2,
    user_service_pb2,
)

# Backends of this database, other than the test's own lock holder, that
# wait for a lock: the server's UPDATE while it is still running.
_WAITING_QUERIES = text(
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> :holder "
    "AND state = 'active' AND wait_event_type = 'Lock'"
)


@asynccontextmanager
async def row_locked(engine: AsyncEngine, user_id: str) -> AsyncIterator[AsyncConnection]:
    """Holds ``user_id``'s row lock (FOR UPDATE) until the block ends."""
    async with engine.connect() as holder:
        transaction = await holder.begin()
        await holder.execute(
            text("SELECT id FROM users WHERE id = :id FOR UPDATE"), {"id": uuid.UUID(user_id)}
        )
        try:
            yield holder
        finally:
            await transaction.rollback()


async def waiting_queries(holder: AsyncConnection) -> int:
    pid = (await holder.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    count: int = (await holder.execute(_WAITING_QUERIES, {"holder": pid})).scalar_one()
    return count


async def settled(server: RunningServer, holder: AsyncConnection) -> tuple[int, int]:
    """(waiting queries, checked-out connections) once both are 0, or as
    they are after 2 s. The server answers DEADLINE_EXCEEDED after its
    clean-up, but on a busy machine the client's own timer may end the call
    first, so the clean-up is given a moment; the lock is still held, so a
    query that was not cancelled would still be waiting then."""
    pool = server.container.engine.pool
    waiting, checked_out = -1, -1
    for _ in range(100):
        waiting, checked_out = await waiting_queries(holder), pool.checkedout()
        if waiting == checked_out == 0:
            break
        await asyncio.sleep(0.02)  # polled: bounded by the loop
    return waiting, checked_out


def rename(caller: Caller, user_id: str, name: str, **kwargs: Any) -> Any:
    return caller.users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user_id, display_name=name),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        **kwargs,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def generous_margin(
    e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    """A server that gives up 400 ms before the caller's deadline: its
    answer arrives first even on a busy machine, so the test can read it."""
    settings = dataclasses.replace(e2e_settings, deadline_margin_ms=400)
    async with running_server(settings, recorder) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def short_statement_timeout(
    e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    """A server on the test database whose statements time out after 300 ms."""
    settings = dataclasses.replace(e2e_settings, db_statement_timeout_ms=300)
    async with running_server(settings, recorder) as running:
        yield running


async def test_a_query_past_the_deadline_is_cancelled_in_postgresql_and_its_connection_returned(
    primary: RunningServer, world: World, engine: AsyncEngine
) -> None:
    async with row_locked(engine, world.bob.id) as holder:
        failure = await fails(rename(world.admin, world.bob.id, "Too late", timeout=0.3))
        waiting, checked_out = await settled(primary, holder)

    assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waiting == 0
    assert checked_out == 0


async def test_the_caller_gets_deadline_exceeded_with_error_info(
    generous_margin: RunningServer, world: World, engine: AsyncEngine
) -> None:
    admin = Caller(generous_margin.channel, world.admin.token)
    async with row_locked(engine, world.bob.id):
        await expect_error(
            rename(admin, world.bob.id, "Too late", timeout=1.0),
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "DEADLINE_EXCEEDED",
        )


async def test_a_call_cut_short_by_its_deadline_changes_nothing(
    world: World, engine: AsyncEngine
) -> None:
    async with row_locked(engine, world.bob.id):
        failure = await fails(rename(world.admin, world.bob.id, "Too late", timeout=0.3))

    assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await world.get_as_admin(world.bob.id)).display_name == "Bob"


async def test_the_pooled_connection_serves_the_next_call_after_a_deadline(
    world: World, engine: AsyncEngine
) -> None:
    async with row_locked(engine, world.bob.id):
        await fails(rename(world.admin, world.bob.id, "Too late", timeout=0.3))

    renamed = await rename(world.admin, world.bob.id, "In time")

    assert renamed.user.display_name == "In time"


async def test_without_a_deadline_the_statement_timeout_answers_database_unavailable(
    short_statement_timeout: RunningServer, world: World, engine: AsyncEngine
) -> None:
    admin = Caller(short_statement_timeout.channel, world.admin.token)
    async with row_locked(engine, world.bob.id) as holder:
        started = time.monotonic()
        failure = await expect_error(
            rename(admin, world.bob.id, "Never", timeout=None),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        elapsed = time.monotonic() - started
        still_waiting = await waiting_queries(holder)
        checked_out = short_statement_timeout.container.engine.pool.checkedout()

    assert elapsed < 3.0  # 300 ms of statement timeout, not a hang
    assert still_waiting == 0
    assert checked_out == 0
    assert failure.details == "database unavailable; retry later"  # no SQL, no stack


async def test_a_deadline_longer_than_the_statement_timeout_still_ends_at_the_statement_timeout(
    short_statement_timeout: RunningServer, world: World, engine: AsyncEngine
) -> None:
    admin = Caller(short_statement_timeout.channel, world.admin.token)
    async with row_locked(engine, world.bob.id):
        started = time.monotonic()
        await expect_error(
            rename(admin, world.bob.id, "Never", timeout=20),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        elapsed = time.monotonic() - started

    assert elapsed < 3.0
