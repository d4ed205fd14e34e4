"""PostgreSQL goes away and comes back, under an in-process server that
the tests can look into: calls fail fast with UNAVAILABLE /
DATABASE_UNAVAILABLE, health says NOT_SERVING, the service recovers by
itself within two seconds, and nothing acknowledged is lost.

The database is a private cluster (tests/clusters.py), stopped, crashed and
started here; a hanging database is a proxy in front of it that stops
forwarding. The same faults under load against a real process:
tests/drills/test_drills.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from clusters import PostgresCluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from support.servers import in_process

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.adapters.db_monitor import SLOW_SECONDS

from .conftest import start, stop
from .support import FreezableProxy, new_email, new_password, reason_of, signing_key_pem

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_NAMES = ("", "usersvc.v1.UserService", "usersvc.v1.AuthService")
# The requirements.
FAIL_FAST_SECONDS = 1.0
RECOVERY_SECONDS = 2.0
# How long the tests keep looking before they call a miss a miss.
WATCH_SECONDS = 10.0
UNAVAILABLE_MESSAGE = "database unavailable; retry later"


@dataclass
class Outcome:
    code: grpc.StatusCode
    reason: str
    details: str
    seconds: float


@dataclass
class Served:
    container: Any  # usersvc.bootstrap.Container
    channel: grpc.aio.Channel

    @property
    def users(self) -> Any:
        return user_service_pb2_grpc.UserServiceStub(self.channel)

    @property
    def auth(self) -> Any:
        return auth_service_pb2_grpc.AuthServiceStub(self.channel)

    async def health(self, service: str = "") -> int:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        status: int = reply.status
        return status

    async def sign_up(self) -> tuple[str, str]:
        """A new user, logged in: (id, access token)."""
        email, password = new_email("outage"), new_password()
        created = await self.users.CreateUser(
            user_service_pb2.CreateUserRequest(email=email, password=password), timeout=5
        )
        login = await self.auth.Login(
            auth_service_pb2.LoginRequest(email=email, password=password), timeout=5
        )
        return created.user.id, login.access_token

    def create(self) -> Any:
        request = user_service_pb2.CreateUserRequest(email=new_email(), password=new_password())
        return self.users.CreateUser(request, timeout=5)


@asynccontextmanager
async def in_process_server(
    database_url: str, data_dir: Path, *, bcrypt_rounds: int = 4
) -> AsyncIterator[Served]:
    from usersvc.config import Settings

    settings = Settings(
        database_url=database_url,
        data_dir=data_dir,
        bcrypt_rounds=bcrypt_rounds,
        jwt_private_key_pem=signing_key_pem(),
        rate_limit_rps=0,
        auth_rate_limit_rps=0,
    )
    async with in_process(settings) as running:
        yield Served(running.container, running.channel)


@pytest.fixture
async def served(
    pg: PostgresCluster, cluster_database_url: str, tmp_path: Path
) -> AsyncIterator[Served]:
    async with in_process_server(cluster_database_url, tmp_path) as running:
        yield running


async def outcome(call: Awaitable[Any]) -> Outcome:
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return Outcome(
            error.code(), reason_of(error), error.details() or "", time.monotonic() - started
        )
    return Outcome(grpc.StatusCode.OK, "", "", time.monotonic() - started)


async def seconds_until(
    condition: Callable[[], Awaitable[bool]], limit: float = WATCH_SECONDS
) -> float:
    """Seconds until ``condition()`` holds, asked every 20 ms; fails the
    test after ``limit``."""
    started = time.monotonic()
    async with asyncio.timeout(limit):
        # Polled: what is measured is when the answer changes.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # the measurement's resolution
    return time.monotonic() - started


async def users_stored(database_url: str, ids: list[str]) -> int:
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            found: int = (
                await connection.execute(
                    text("SELECT count(*) FROM users WHERE id = ANY(:ids)"),
                    {"ids": [uuid.UUID(i) for i in ids]},
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    return found


async def test_calls_fail_fast_with_database_unavailable_while_postgresql_is_stopped(
    pg: PostgresCluster, served: Served
) -> None:
    user_id, token = await served.sign_up()
    bearer = (("authorization", f"Bearer {token}"),)
    await stop(pg)

    outcomes = [
        await outcome(served.create()),
        await outcome(
            served.auth.Login(auth_service_pb2.LoginRequest(email="a@example.com", password="x"))
        ),
        await outcome(
            served.users.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer)
        ),
        await outcome(
            served.users.GetUser(user_service_pb2.GetUserRequest(id=user_id), metadata=bearer)
        ),
    ]

    assert {(o.code, o.reason, o.details) for o in outcomes} == {
        (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", UNAVAILABLE_MESSAGE)
    }
    assert max(o.seconds for o in outcomes) < FAIL_FAST_SECONDS


async def test_a_create_is_refused_before_its_password_is_hashed_while_postgresql_is_down(
    pg: PostgresCluster, cluster_database_url: str, tmp_path: Path
) -> None:
    # Cost 14: a hash takes most of a second here, so an answer well under
    # that proves none was computed.
    async with in_process_server(cluster_database_url, tmp_path, bcrypt_rounds=14) as slow:
        await stop(pg)
        await seconds_until(lambda: _health_is(slow, NOT_SERVING))
        refused = await outcome(slow.create())

    assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    assert refused.seconds < 0.3


async def test_health_reports_not_serving_soon_after_postgresql_stops(
    pg: PostgresCluster, served: Served
) -> None:
    await stop(pg)
    seconds = await seconds_until(lambda: _health_is(served, NOT_SERVING))

    statuses = [await served.health(name) for name in HEALTH_NAMES]

    assert seconds < RECOVERY_SECONDS
    assert statuses == [NOT_SERVING] * len(HEALTH_NAMES)


async def test_the_service_recovers_by_itself_within_two_seconds_of_postgresql_returning(
    pg: PostgresCluster, served: Served
) -> None:
    _, token = await served.sign_up()
    bearer = (("authorization", f"Bearer {token}"),)
    await stop(pg)
    await seconds_until(lambda: _health_is(served, NOT_SERVING))

    await start(pg)
    until_write = await seconds_until(lambda: _succeeds(served.create()))
    until_serving = await seconds_until(lambda: _health_is(served, SERVING))
    me = await served.users.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer)

    assert until_write < RECOVERY_SECONDS
    assert until_serving < RECOVERY_SECONDS
    assert me.user.id


async def test_writes_acknowledged_before_a_crash_of_postgresql_are_there_after_it(
    pg: PostgresCluster, served: Served, cluster_database_url: str
) -> None:
    ids = [(await served.create()).user.id for _ in range(20)]

    await stop(pg, "immediate")
    await start(pg)

    assert await users_stored(cluster_database_url, ids) == len(ids)


async def test_a_database_that_stops_answering_is_noticed_and_calls_then_fail_fast(
    pg: PostgresCluster, cluster_database_url: str, tmp_path: Path
) -> None:
    proxy = FreezableProxy("127.0.0.1", pg.port)
    await proxy.start()
    url = cluster_database_url.replace(f":{pg.port}/", f":{proxy.port}/")
    try:
        async with in_process_server(url, tmp_path) as hanging:
            await hanging.sign_up()
            proxy.freeze()
            noticed = await seconds_until(
                lambda: _health_is(hanging, NOT_SERVING), limit=SLOW_SECONDS + WATCH_SECONDS
            )
            refused = await outcome(hanging.create())
            # Let the held bytes through, so the connections close cleanly.
            proxy.thaw()
    finally:
        await proxy.close()

    # Late probes trip the breaker only once they have gone on for
    # SLOW_SECONDS, counted from the end of the first late probe (one probe
    # cycle, interval plus timeout: 0.5 s + 1 s by default, after the
    # freeze) to the end of the first late probe past the window (up to one
    # more cycle).
    assert noticed < SLOW_SECONDS + 2 * (0.5 + 1.0)
    assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    assert refused.seconds < 0.5


async def _health_is(served: Served, status: int) -> bool:
    return await served.health() == status


async def _succeeds(call: Awaitable[Any]) -> bool:
    try:
        await call
    except grpc.aio.AioRpcError:
        return False
    return True
