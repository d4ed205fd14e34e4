"""Brute-force protection over gRPC: accounts lock after repeated failed
logins, for a time that grows on repeat, with the one INVALID_CREDENTIALS
answer throughout; counts are kept in the database, exact under concurrent
attempts on two replicas.

The servers here read the time of locks from a clock the tests move, so no
test waits for a lock to end."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    RpcFailure,
    World,
    auth_service_pb2,
    expect_bad_credentials,
    user_service_pb2,
)

MAX_FAILURES = 3
LOCKOUT_SECONDS = 60
MAX_LOCKOUT_SECONDS = 240
WRONG = "Not-the-password-1!"


class MovableClock:
    """time.time, plus however far a test has moved it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclasses.dataclass
class Lockouts:
    server: RunningServer
    clock: MovableClock
    world: World
    engine: AsyncEngine

    @property
    def anonymous(self) -> Caller:
        return Caller(self.server.channel, None)

    async def account(self) -> tuple[str, str, str]:
        """A new user: (id, email, password)."""
        return await self.world.seed_user()

    async def login(self, email: str, password: str) -> auth_service_pb2.LoginResponse:
        return await self.anonymous.auth.Login(
            auth_service_pb2.LoginRequest(email=email, password=password)
        )

    async def refused(self, email: str, password: str = WRONG) -> RpcFailure:
        return await expect_bad_credentials(self.login(email, password))

    async def fail(self, email: str, times: int) -> None:
        for _ in range(times):
            await self.refused(email)

    async def counters(self, user_id: str) -> tuple[int, int, bool]:
        """(failed_login_count, lock_count, locked now by the server's clock)."""
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(
                    text(
                        "SELECT failed_login_count, lock_count, locked_until "
                        "FROM users WHERE id = :id"
                    ),
                    {"id": user_id},
                )
            ).one()
        locked = row[2] is not None and row[2].timestamp() > self.clock()
        return row[0], row[1], locked


def lockout_settings(e2e_settings: Any, max_failures: int = MAX_FAILURES) -> Any:
    return dataclasses.replace(
        e2e_settings,
        login_max_failures=max_failures,
        login_lockout_seconds=LOCKOUT_SECONDS,
        login_lockout_max_seconds=MAX_LOCKOUT_SECONDS,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def locking_server(
    e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[tuple[RunningServer, MovableClock]]:
    clock = MovableClock()
    async with running_server(
        lockout_settings(e2e_settings), recorder, lockout_clock=clock
    ) as running:
        yield running, clock


@pytest_asyncio.fixture(loop_scope="session")
async def lockouts(
    locking_server: tuple[RunningServer, MovableClock], world: World, engine: AsyncEngine
) -> Lockouts:
    server, clock = locking_server
    return Lockouts(server, clock, world, engine)


async def test_after_the_maximum_of_failures_the_right_password_is_refused_the_same_way(
    lockouts: Lockouts,
) -> None:
    _, email, password = await lockouts.account()
    wrong = await lockouts.refused(email)
    await lockouts.fail(email, MAX_FAILURES - 1)

    right = await lockouts.refused(email, password)

    assert (right.code, right.details, right.error_infos) == (
        wrong.code,
        wrong.details,
        wrong.error_infos,
    )
    assert right.retry_infos == ()


async def test_fewer_failures_than_the_maximum_leave_the_account_usable(
    lockouts: Lockouts,
) -> None:
    _, email, password = await lockouts.account()
    await lockouts.fail(email, MAX_FAILURES - 1)
    response = await lockouts.login(email, password)
    assert response.user.email == email


async def test_the_account_opens_again_when_the_lock_ends(lockouts: Lockouts) -> None:
    _, email, password = await lockouts.account()
    await lockouts.fail(email, MAX_FAILURES)
    lockouts.clock.advance(LOCKOUT_SECONDS - 1)
    await lockouts.refused(email, password)
    lockouts.clock.advance(1)
    response = await lockouts.login(email, password)
    assert response.access_token


async def test_attempts_during_a_lock_neither_count_nor_extend_it(lockouts: Lockouts) -> None:
    user_id, email, password = await lockouts.account()
    await lockouts.fail(email, MAX_FAILURES)
    before = await lockouts.counters(user_id)
    lockouts.clock.advance(LOCKOUT_SECONDS / 2)
    await lockouts.fail(email, 5)
    assert await lockouts.counters(user_id) == before
    lockouts.clock.advance(LOCKOUT_SECONDS / 2)
    assert (await lockouts.login(email, password)).access_token


async def test_a_repeat_lock_lasts_twice_as_long(lockouts: Lockouts) -> None:
    _, email, password = await lockouts.account()
    await lockouts.fail(email, MAX_FAILURES)
    lockouts.clock.advance(LOCKOUT_SECONDS)
    await lockouts.fail(email, MAX_FAILURES)
    lockouts.clock.advance(2 * LOCKOUT_SECONDS - 1)
    await lockouts.refused(email, password)
    lockouts.clock.advance(1)
    assert (await lockouts.login(email, password)).access_token


async def test_locks_stop_growing_at_the_maximum(lockouts: Lockouts) -> None:
    user_id, email, password = await lockouts.account()
    for length in (LOCKOUT_SECONDS, 2 * LOCKOUT_SECONDS, 4 * LOCKOUT_SECONDS):
        await lockouts.fail(email, MAX_FAILURES)
        lockouts.clock.advance(length)
    await lockouts.fail(email, MAX_FAILURES)
    assert (await lockouts.counters(user_id))[1] == 4
    lockouts.clock.advance(MAX_LOCKOUT_SECONDS)
    assert (await lockouts.login(email, password)).access_token


async def test_a_success_resets_the_failure_count(lockouts: Lockouts) -> None:
    user_id, email, password = await lockouts.account()
    await lockouts.fail(email, MAX_FAILURES - 1)
    await lockouts.login(email, password)
    assert await lockouts.counters(user_id) == (0, 0, False)
    await lockouts.fail(email, MAX_FAILURES - 1)
    assert (await lockouts.login(email, password)).access_token


async def test_email_case_variants_share_one_counter(lockouts: Lockouts) -> None:
    user_id, email, password = await lockouts.account()
    local, _, domain = email.partition("@")
    await lockouts.refused(email.upper())
    await lockouts.refused(f"{local}@{domain.upper()}")
    await lockouts.refused(email.title())
    assert await lockouts.counters(user_id) == (0, 1, True)
    await lockouts.refused(email, password)


async def test_failures_for_an_unknown_email_leave_no_trace(lockouts: Lockouts) -> None:
    async with lockouts.engine.connect() as connection:
        before = (
            await connection.execute(text("SELECT id, failed_login_count, lock_count FROM users"))
        ).all()
    await lockouts.fail("nobody-here@example.com", MAX_FAILURES + 2)
    async with lockouts.engine.connect() as connection:
        after = (
            await connection.execute(text("SELECT id, failed_login_count, lock_count FROM users"))
        ).all()
    assert sorted(after) == sorted(before)


async def test_failed_logins_and_a_lock_leave_the_users_etag_alone(lockouts: Lockouts) -> None:
    user_id, email, _ = await lockouts.account()
    admin = Caller(lockouts.server.channel, lockouts.world.admin.token)
    before = await admin.users.GetUser(user_service_pb2.GetUserRequest(id=user_id))
    await lockouts.fail(email, MAX_FAILURES)
    after = await admin.users.GetUser(user_service_pb2.GetUserRequest(id=user_id))
    assert after.user.etag == before.user.etag


async def outcome(lockouts: Lockouts, email: str, password: str) -> str:
    try:
        await lockouts.login(email, password)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


@pytest.mark.parametrize("logins", [5, 20])
async def test_concurrent_logins_with_the_right_password_all_succeed_and_never_lock(
    lockouts: Lockouts, logins: int
) -> None:
    user_id, email, password = await lockouts.account()
    outcomes = await asyncio.gather(*(outcome(lockouts, email, password) for _ in range(logins)))
    print(f"\n{logins} concurrent right-password logins over gRPC: {outcomes.count('OK')} OK")
    assert outcomes == ["OK"] * logins
    assert await lockouts.counters(user_id) == (0, 0, False)


@pytest.mark.parametrize("logins", [5, 20])
async def test_concurrent_wrong_passwords_lock_exactly_as_sequential_ones(
    lockouts: Lockouts, logins: int
) -> None:
    sequential_id, sequential_email, _ = await lockouts.account()
    concurrent_id, concurrent_email, password = await lockouts.account()
    # Each one answered INVALID_CREDENTIALS (refused checks the reason).
    await lockouts.fail(sequential_email, logins)
    await asyncio.gather(*(lockouts.refused(concurrent_email) for _ in range(logins)))
    expected = await lockouts.counters(sequential_id)
    found = await lockouts.counters(concurrent_id)
    print(f"\n{logins} wrong logins over gRPC: sequential {expected}, concurrent {found}")
    assert expected == (0, 1, True)
    assert found == expected
    await lockouts.refused(concurrent_email, password)


async def test_twenty_concurrent_failures_on_two_replicas_are_counted_exactly(
    e2e_settings: Any, recorder: ResponseRecorder, world: World, engine: AsyncEngine
) -> None:
    settings = lockout_settings(e2e_settings, max_failures=50)
    clock = MovableClock()
    async with (
        running_server(settings, recorder, lockout_clock=clock) as first,
        running_server(settings, recorder, lockout_clock=clock) as second,
    ):
        user_id, email, _ = await world.seed_user()
        callers = [Caller(first.channel, None), Caller(second.channel, None)]

        async def wrong(caller: Caller) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await caller.auth.Login(auth_service_pb2.LoginRequest(email=email, password=WRONG))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        await asyncio.gather(*(wrong(callers[i % 2]) for i in range(20)))
        counters = await Lockouts(first, clock, world, engine).counters(user_id)
    assert counters == (20, 0, False)
