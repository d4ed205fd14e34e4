"""The login lockout statements of SqlAlchemyUserRepository against
PostgreSQL: finding, counting failures, locking, lengths that match
usersvc.domain.lockout, and concurrent failures that end exactly where as
many sequential ones do."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import User
from usersvc.domain.ports import UnitOfWorkFactory

UserMaker = Callable[..., Awaitable[User]]

NOW = datetime(2030, 1, 1, tzinfo=UTC)
POLICY = LockoutPolicy(max_failures=3, lockout_seconds=60, max_lockout_seconds=1000)


@dataclass(frozen=True)
class LockState:
    failed_login_count: int
    lock_count: int
    locked_until: datetime | None


async def lock_state(engine: AsyncEngine, user_id: uuid.UUID) -> LockState:
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT failed_login_count, lock_count, locked_until FROM users WHERE id = :id"
                ),
                {"id": user_id},
            )
        ).one()
    return LockState(*row)


async def fail(
    uow_factory: UnitOfWorkFactory,
    user_id: uuid.UUID,
    now: datetime = NOW,
    policy: LockoutPolicy = POLICY,
) -> datetime | None:
    async with uow_factory() as uow:
        result = await uow.users.count_login_failure(user_id, now=now, policy=policy)
        await uow.commit()
    return result


async def test_finding_a_login_returns_the_credentials_and_writes_nothing(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    async with uow_factory() as uow:
        found = await uow.users.find_login("ANN@example.com")
    assert found is not None
    assert (found.credentials.user, found.locked_until) == (user, None)
    assert found.credentials.password_hash.startswith("$2b$")
    assert await lock_state(engine, user.id) == LockState(0, 0, None)


async def test_finding_a_login_tells_the_end_of_the_lock(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures):
        await fail(uow_factory, user.id)
    async with uow_factory() as uow:
        found = await uow.users.find_login("ann@example.com")
        assert await uow.users.find_login("nobody@example.com") is None
    assert found is not None
    assert found.locked_until == NOW + timedelta(seconds=60)


async def test_a_failure_is_counted(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    assert await fail(uow_factory, user.id) is None
    assert await lock_state(engine, user.id) == LockState(1, 0, None)


async def test_the_failure_that_reaches_the_maximum_locks_from_now_for_the_first_length(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures - 1):
        assert await fail(uow_factory, user.id) is None
    assert await fail(uow_factory, user.id) == NOW + timedelta(seconds=60)
    assert await lock_state(engine, user.id) == LockState(0, 1, NOW + timedelta(seconds=60))


async def test_a_failure_during_a_lock_is_not_counted_and_changes_nothing(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures):
        await fail(uow_factory, user.id)
    before = await lock_state(engine, user.id)
    assert await fail(uow_factory, user.id, NOW + timedelta(seconds=59)) is None
    assert await lock_state(engine, user.id) == before


async def test_once_a_lock_ends_failures_count_again_and_the_next_lock_lasts_twice_as_long(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures):
        await fail(uow_factory, user.id)
    later = NOW + timedelta(seconds=60)
    for _ in range(POLICY.max_failures):
        result = await fail(uow_factory, user.id, later)
    assert result == later + timedelta(seconds=120)
    assert (await lock_state(engine, user.id)).lock_count == 2


async def test_repeated_locks_last_as_long_as_the_policy_says_up_to_its_maximum(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(email="ann@example.com")
    now = NOW
    lengths = []
    for _ in range(7):
        for _ in range(POLICY.max_failures):
            result = await fail(uow_factory, user.id, now)
        assert result is not None
        lengths.append((result - now).total_seconds())
        now = result
    assert lengths == [POLICY.lock_seconds(n) for n in range(7)]
    assert lengths[-1] == POLICY.max_lockout_seconds


async def test_an_account_locked_countless_times_gets_the_maximum_without_overflow(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE users SET lock_count = 2000000000 WHERE id = :id"), {"id": user.id}
        )
    for _ in range(POLICY.max_failures):
        result = await fail(uow_factory, user.id)
    assert result == NOW + timedelta(seconds=POLICY.max_lockout_seconds)


async def test_a_failure_of_an_unknown_id_writes_nothing(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    assert await fail(uow_factory, uuid.UUID(int=0)) is None
    assert await lock_state(engine, user.id) == LockState(0, 0, None)


async def test_clearing_resets_the_count_the_lock_and_the_lock_count_but_not_the_version(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures + 1):
        await fail(uow_factory, user.id, NOW - timedelta(hours=1))
    async with uow_factory() as uow:
        assert await uow.users.clear_login_failures(user.id) is True
        await uow.commit()
    assert await lock_state(engine, user.id) == LockState(0, 0, None)
    async with uow_factory() as uow:
        assert await uow.users.get(user.id) == user


async def test_clearing_unless_locked_leaves_a_locked_account_alone(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures):
        await fail(uow_factory, user.id)
    before = await lock_state(engine, user.id)
    async with uow_factory() as uow:
        assert await uow.users.clear_login_failures(user.id, unless_locked_at=NOW) is False
        await uow.commit()
    assert await lock_state(engine, user.id) == before


async def test_clearing_an_unknown_user_returns_false(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.users.clear_login_failures(uuid.uuid4()) is False


async def test_concurrent_failures_are_each_counted_once(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    roomy = LockoutPolicy(max_failures=50, lockout_seconds=60, max_lockout_seconds=60)
    await asyncio.gather(*(fail(uow_factory, user.id, policy=roomy) for _ in range(20)))
    assert (await lock_state(engine, user.id)).failed_login_count == 20


@pytest.mark.parametrize("failures", [5, 20])
async def test_concurrent_failures_leave_the_state_that_as_many_sequential_ones_leave(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine, failures: int
) -> None:
    sequential = await make_user(email="seq@example.com")
    concurrent = await make_user(email="con@example.com")
    for _ in range(failures):
        await fail(uow_factory, sequential.id)
    results = await asyncio.gather(*(fail(uow_factory, concurrent.id) for _ in range(failures)))
    expected = await lock_state(engine, sequential.id)
    assert expected == LockState(
        failures % POLICY.max_failures if failures < POLICY.max_failures else 0,
        1 if failures >= POLICY.max_failures else 0,
        NOW + timedelta(seconds=60) if failures >= POLICY.max_failures else None,
    )
    assert await lock_state(engine, concurrent.id) == expected
    # Exactly one of them started the lock.
    assert sum(result is not None for result in results) == (
        1 if failures >= POLICY.max_failures else 0
    )


async def test_counting_a_failure_makes_the_commit_skip_the_wal_flush_wait(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    # Otherwise a registered email's failed login would be slower than an
    # unknown one's by a WAL flush: a timing oracle.
    user = await make_user(email="ann@example.com")
    async with uow_factory() as uow:
        await uow.users.count_login_failure(user.id, now=NOW, policy=POLICY)
        setting = await uow._session.execute(text("SHOW synchronous_commit"))  # type: ignore[attr-defined]
        assert setting.scalar_one() == "off"


async def test_clearing_unless_locked_clears_an_account_whose_lock_has_ended(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures):
        await fail(uow_factory, user.id)
    async with uow_factory() as uow:
        later = NOW + timedelta(seconds=60)
        assert await uow.users.clear_login_failures(user.id, unless_locked_at=later) is True
        await uow.commit()
    assert await lock_state(engine, user.id) == LockState(0, 0, None)


async def test_clearing_without_a_time_ends_a_lock(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures):
        await fail(uow_factory, user.id)
    async with uow_factory() as uow:
        assert await uow.users.clear_login_failures(user.id) is True
        await uow.commit()
    assert await lock_state(engine, user.id) == LockState(0, 0, None)
