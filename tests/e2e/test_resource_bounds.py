"""Resource bounds of a real server: oversized messages refused before any
work, a bounded number of calls in progress, bounded waits for a pooled
connection, and error statuses that stay small enough for clients to read.

The per-field maxima are in test_field_limits.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    World,
    auth_service_pb2,
    create_request,
    expect_error,
    fails,
    user_service_pb2,
)

MIB = 1024 * 1024
# grpc clients refuse trailers above 16 KiB and, by default, start refusing
# them at random above 8 KiB.
CLIENT_METADATA_SOFT_LIMIT = 8 * 1024
POOL_TIMEOUT_SECONDS = 0.5


def _dsn(database_url: str) -> str:
    """The plain libpq form of a SQLAlchemy URL, for asyncpg.connect."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


async def _completed(call: Awaitable[Any]) -> Any:
    # grpc's call objects are awaitable but not coroutines; tasks need one.
    return await call


class Gate:
    """Holds calls inside a service method until opened; counts arrivals."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.open = asyncio.Event()

    def wrap(self, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def held(**kwargs: Any) -> Any:
            self.arrived += 1
            if self.arrived >= self.expected:
                self.all_arrived.set()
            await self.open.wait()
            return await method(**kwargs)

        return held


@pytest_asyncio.fixture(loop_scope="session")
async def two_call_server(
    e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    settings = dataclasses.replace(e2e_settings, max_concurrent_rpcs=2)
    async with running_server(settings, recorder) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def one_connection_server(
    e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    settings = dataclasses.replace(
        e2e_settings,
        db_pool_size=1,
        db_max_overflow=0,
        db_pool_timeout_seconds=POOL_TIMEOUT_SECONDS,
    )
    async with running_server(settings, recorder) as running:
        yield running


# -- message size --------------------------------------------------------------------------


async def test_a_two_mebibyte_request_is_refused_before_the_handler_runs(
    world: World, primary: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    handled: list[Any] = []
    service = primary.container.user_service
    original = service.create_user

    async def spy(**kwargs: Any) -> Any:
        handled.append(kwargs)
        return await original(**kwargs)

    monkeypatch.setattr(service, "create_user", spy)
    request = create_request(world.recorder, display_name="d" * (2 * MIB))

    failure = await fails(world.admin.users.CreateUser(request))

    assert failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert handled == []


async def test_the_server_keeps_serving_after_refusing_an_oversized_request(
    world: World,
) -> None:
    huge = create_request(world.recorder, display_name="d" * (2 * MIB))
    await fails(world.admin.users.CreateUser(huge))

    reply = await world.admin.users.CreateUser(create_request(world.recorder))

    assert reply.user.id


# -- error size ------------------------------------------------------------------------------


async def test_thousands_of_violations_still_arrive_as_a_readable_invalid_argument(
    world: World,
) -> None:
    # Six violations an item: email, display_name, three unknown roles and a
    # weak password.
    items = [
        user_service_pb2.CreateUserRequest(
            email=f"bad{i}", password="x", display_name="\x00", roles=["a", "b", "c"]
        )
        for i in range(1000)
    ]

    failure = await expect_error(
        world.admin.users.BatchCreateUsers(
            user_service_pb2.BatchCreateUsersRequest(requests=items)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )

    shown = len(failure.violation_fields)
    omitted = int(failure.error_infos[0].metadata["omitted_violations"])
    assert failure.violation_fields[0] == "requests[0].email"
    assert shown + omitted == 6000
    trailer_bytes = sum(len(k) + len(v) for k, v in failure.trailing_metadata)
    assert trailer_bytes + len(failure.details.encode()) < CLIENT_METADATA_SOFT_LIMIT


# -- concurrency ---------------------------------------------------------------------------


async def test_calls_beyond_the_concurrency_limit_are_refused_at_once(
    world: World, two_call_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = two_call_server.container.user_service
    gate = Gate(expected=2)
    monkeypatch.setattr(service, "get_user", gate.wrap(service.get_user))
    alice = Caller(two_call_server.channel, world.alice.token, "alice")
    held = [
        asyncio.create_task(
            _completed(alice.users.GetUser(user_service_pb2.GetUserRequest(id="me")))
        )
        for _ in range(2)
    ]
    try:
        await asyncio.wait_for(gate.all_arrived.wait(), timeout=10)
        started = time.perf_counter()
        refused = await fails(alice.auth.GetJwks(auth_service_pb2.GetJwksRequest()))
        elapsed = time.perf_counter() - started
    finally:
        gate.open.set()
        replies = await asyncio.gather(*held)

    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert elapsed < 1.0
    assert [reply.user.id for reply in replies] == [world.alice.id] * 2


async def test_calls_are_served_again_once_the_calls_in_progress_finish(
    world: World, two_call_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = two_call_server.container.user_service
    gate = Gate(expected=2)
    monkeypatch.setattr(service, "get_user", gate.wrap(service.get_user))
    alice = Caller(two_call_server.channel, world.alice.token, "alice")
    held = [
        asyncio.create_task(
            _completed(alice.users.GetUser(user_service_pb2.GetUserRequest(id="me")))
        )
        for _ in range(2)
    ]
    await asyncio.wait_for(gate.all_arrived.wait(), timeout=10)
    await fails(alice.auth.GetJwks(auth_service_pb2.GetJwksRequest()))
    gate.open.set()
    await asyncio.gather(*held)

    reply = await alice.auth.GetJwks(auth_service_pb2.GetJwksRequest())

    assert reply.jwks_json


# -- connection pool -----------------------------------------------------------------------


async def _wait_until_blocked_by(locker: Any, database_url: str) -> None:
    """Polls (with a deadline: PostgreSQL has no event for it) until some
    backend waits for a lock that ``locker`` holds."""
    monitor = await asyncpg.connect(_dsn(database_url))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            blocked = await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                locker.get_server_pid(),
            )
            if blocked:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("no call reached the locked row")
    finally:
        await monitor.close()


async def test_a_call_that_finds_no_free_connection_fails_unavailable_after_the_pool_timeout(
    world: World, one_connection_server: RunningServer, database_url: str
) -> None:
    admin = Caller(one_connection_server.channel, world.admin.token, "admin")
    locker = await asyncpg.connect(_dsn(database_url))
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute(
            "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(world.alice.id)
        )
        # Takes the only pooled connection, then waits for the row lock.
        update = asyncio.create_task(
            _completed(
                admin.users.UpdateUser(
                    user_service_pb2.UpdateUserRequest(
                        user={"id": world.alice.id, "display_name": "After the lock"},
                        update_mask={"paths": ["display_name"]},
                    )
                )
            )
        )
        await _wait_until_blocked_by(locker, database_url)
        started = time.perf_counter()
        failure = await fails(admin.users.GetUser(user_service_pb2.GetUserRequest(id=world.bob.id)))
        waited = time.perf_counter() - started
        await transaction.rollback()
        updated = await update
    finally:
        await locker.close()

    assert (failure.code, failure.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
    )
    assert POOL_TIMEOUT_SECONDS * 0.9 <= waited < POOL_TIMEOUT_SECONDS + 2
    assert updated.user.display_name == "After the lock"
