"""Database faults a serving process must ride out: its connections killed
under it, and a migration applied while it serves.

(A database that stops and comes back: tests/drills/test_database_outage.py,
on a private PostgreSQL.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    World,
    auth_service_pb2,
    new_email,
    new_password,
    unverified_parts,
    user_pb2,
    user_service_pb2,
)

WAIT_SECONDS = 10.0
SERVICE_APPLICATIONS = ("usersvc", "usersvc-revocations", "usersvc-health")
_KILL_SERVICE_CONNECTIONS = text(
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND application_name = ANY(:names)"
)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Returns once ``predicate`` holds; fails after WAIT_SECONDS."""
    async with asyncio.timeout(WAIT_SECONDS):
        # Polled: the states watched here have no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def kill_service_connections(engine: AsyncEngine) -> int:
    """pg_terminate_backend on every connection a usersvc process holds to
    the test database (the pools, the revocation listeners, the monitors)."""
    async with engine.connect() as connection:
        killed: int = (
            await connection.execute(
                _KILL_SERVICE_CONNECTIONS, {"names": list(SERVICE_APPLICATIONS)}
            )
        ).scalar_one()
    return killed


# ----------------------------------------------------------------- killed connections


async def test_after_every_service_connection_is_killed_the_next_calls_succeed(
    primary: RunningServer, world: World, engine: AsyncEngine
) -> None:
    await world.alice.users.GetUser(user_service_pb2.GetUserRequest(id="me"))
    killed = await kill_service_connections(engine)

    me = await world.alice.users.GetUser(user_service_pb2.GetUserRequest(id="me"))
    renamed = await world.admin.users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=world.bob.id, display_name="Still here"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )
    login = await world.login(world.bob.email, world.bob.password)

    assert killed >= 2  # at least a pooled connection and the listener
    assert me.user.id == world.alice.id
    assert renamed.user.display_name == "Still here"
    assert login.user.id == world.bob.id


async def test_the_revocation_listener_reconnects_after_its_connection_is_killed(
    primary: RunningServer, replica: RunningServer, world: World, engine: AsyncEngine
) -> None:
    listener = primary.container.revocation_listener
    cache = primary.container.revocation_cache
    old_pid = listener.server_pid
    await kill_service_connections(engine)
    await eventually(lambda: cache.healthy and listener.server_pid not in (None, old_pid))

    # Ended through the other replica: only the reconnected feed can tell
    # the primary's cache.
    await Caller(replica.channel, world.bob.token).auth.Logout(auth_service_pb2.LogoutRequest())
    session_id = str(unverified_parts(world.bob.token)[1]["sid"])
    await eventually(lambda: cache.is_revoked(session_id))

    assert cache.healthy


async def test_killing_the_monitors_connection_does_not_mark_the_database_down(
    primary: RunningServer, world: World, engine: AsyncEngine
) -> None:
    monitor = primary.container.database_monitor
    assert monitor is not None
    changes: list[bool] = []

    async def record(available: bool) -> None:
        changes.append(available)

    monitor.add_listener(record)
    try:
        probes = monitor.probes
        await kill_service_connections(engine)
        await eventually(lambda: monitor.probes >= probes + 2)
        health = await health_pb2_grpc.HealthStub(primary.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    finally:
        monitor.remove_listener(record)

    assert changes == []
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# ----------------------------------------------------------------- migration while serving

CLIENTS = 3
ROUNDS_BEFORE = 2
ROUNDS_AFTER = 3
# A column added to every table while the service serves: the kind of
# change an expand/contract migration makes.
_MIGRATION = [
    f"ALTER TABLE {table} ADD COLUMN added_while_serving text"
    for table in ("users", "sessions", "session_revocations", "idempotency_keys")
]


@pytest_asyncio.fixture(loop_scope="session")
async def scratch_server(
    empty_database_url: str, e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    """A server on a database of its own (the test alters its tables), with
    a pool of two, so every client's statements meet the same connections
    (and their cached prepared statements) before and after the migration."""
    from usersvc.adapters.migrations import upgrade_async

    await upgrade_async(empty_database_url)
    settings = dataclasses.replace(
        e2e_settings,
        database_url=empty_database_url,
        db_pool_size=2,
        db_max_overflow=0,
        rate_limit_rps=0,
        auth_rate_limit_rps=0,
    )
    async with running_server(settings, recorder) as running:
        yield running


async def one_round(world: World, admin: Caller) -> None:
    """Every kind of statement the service prepares: inserts, reads by id
    and email, a filtered list, an update, logins, refreshes, a revocation
    and an idempotent create."""
    recorder = world.recorder
    password = new_password(recorder)
    email = new_email("migrating")
    created = await admin.users.CreateUser(
        user_service_pb2.CreateUserRequest(
            email=email, password=password, request_id=str(uuid.uuid4())
        )
    )
    user_id = created.user.id
    await admin.users.GetUser(user_service_pb2.GetUserRequest(id=user_id))
    await admin.users.LookupUser(user_service_pb2.LookupUserRequest(email=email))
    await admin.users.ListUsers(user_service_pb2.ListUsersRequest(filter=f'email = "{email}"'))
    await admin.users.BatchGetUsers(user_service_pb2.BatchGetUsersRequest(ids=[user_id]))
    await admin.users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user_id, display_name="Migrated"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )
    login = await world.anonymous.auth.Login(
        auth_service_pb2.LoginRequest(email=email, password=password)
    )
    refreshed = await world.anonymous.auth.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=login.refresh_token)
    )
    user = Caller(admin.channel, refreshed.access_token)
    await user.users.GetUser(user_service_pb2.GetUserRequest(id="me"))
    await user.auth.Logout(auth_service_pb2.LogoutRequest())
    await admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=user_id))


async def migrate(database_url: str) -> None:
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            for statement in _MIGRATION:
                await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


async def test_a_column_added_while_serving_makes_no_call_fail(
    scratch_server: RunningServer, empty_database_url: str, recorder: ResponseRecorder
) -> None:
    world = World(
        user_service=scratch_server.container.user_service,
        channel=scratch_server.channel,
        recorder=recorder,
    )
    admin = await world.account("admin", roles=("user", "admin"))
    migrated = asyncio.Event()
    warmed: list[asyncio.Event] = [asyncio.Event() for _ in range(CLIENTS)]
    failures: list[BaseException] = []
    rounds_after = [0] * CLIENTS

    async def client(index: int) -> None:
        for n in range(ROUNDS_BEFORE):
            await guarded(one_round(world, admin))
            if n == ROUNDS_BEFORE - 1:
                warmed[index].set()
        await migrated.wait()
        for _ in range(ROUNDS_AFTER):
            await guarded(one_round(world, admin))
            rounds_after[index] += 1

    async def guarded(call: Awaitable[None]) -> None:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            failures.append(exc)

    clients = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    async with asyncio.timeout(60):
        await asyncio.gather(*(event.wait() for event in warmed))
        await migrate(empty_database_url)
        migrated.set()
        await asyncio.gather(*clients)

    assert failures == []
    assert rounds_after == [ROUNDS_AFTER] * CLIENTS


async def test_a_statement_naming_no_columns_would_fail_after_the_same_migration(
    scratch_server: RunningServer, empty_database_url: str
) -> None:
    """The control: on the service's own engine, ``SELECT *`` falls into
    the trap the test above shows our statements avoid."""
    from sqlalchemy.exc import NotSupportedError

    engine = scratch_server.container.engine

    async def select_star_on_both_pooled_connections() -> None:
        for _ in range(2):
            async with engine.begin() as connection:
                await connection.execute(text("SELECT * FROM users LIMIT 1"))

    await select_star_on_both_pooled_connections()
    await migrate(empty_database_url)

    with pytest.raises(NotSupportedError, match="cached statement plan is invalid"):
        await select_star_on_both_pooled_connections()
