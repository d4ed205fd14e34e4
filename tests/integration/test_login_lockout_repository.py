"""The login lockout statements of SqlAlchemyUserRepository against
PostgreSQL: counting, locking, lengths that match usersvc.domain.lockout,
and exact counts under concurrency."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import User
from usersvc.domain.ports import LoginAttempt, UnitOfWorkFactory

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


async def attempt(
    uow_factory: UnitOfWorkFactory,
    email: str,
    now: datetime = NOW,
    policy: LockoutPolicy = POLICY,
) -> LoginAttempt | None:
    async with uow_factory() as uow:
        result = await uow.users.start_login_attempt(email, now=now, policy=policy)
        await uow.commit()
    return result


async def test_an_attempt_is_counted_and_returns_the_users_credentials(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    result = await attempt(uow_factory, "ann@example.com")
    assert result is not None
    assert (result.credentials.user, result.locked_until) == (user, None)
    assert result.credentials.password_hash.startswith("$2b$")
    assert await lock_state(engine, user.id) == LockState(1, 0, None)


async def test_the_attempt_that_reaches_the_maximum_locks_from_now_for_the_first_length(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures - 1):
        result = await attempt(uow_factory, "ann@example.com")
        assert result is not None
        assert result.locked_until is None
    last = await attempt(uow_factory, "ann@example.com")
    assert last is not None
    assert last.locked_until == NOW + timedelta(seconds=60)
    assert await lock_state(engine, user.id) == LockState(0, 1, NOW + timedelta(seconds=60))


async def test_an_attempt_during_a_lock_is_refused_and_changes_nothing(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures):
        await attempt(uow_factory, "ann@example.com")
    before = await lock_state(engine, user.id)
    assert await attempt(uow_factory, "ann@example.com", NOW + timedelta(seconds=59)) is None
    assert await lock_state(engine, user.id) == before


async def test_once_a_lock_ends_attempts_count_again_and_the_next_lock_lasts_twice_as_long(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures):
        await attempt(uow_factory, "ann@example.com")
    later = NOW + timedelta(seconds=60)
    for _ in range(POLICY.max_failures):
        result = await attempt(uow_factory, "ann@example.com", later)
        assert result is not None
    assert result.locked_until == later + timedelta(seconds=120)
    assert (await lock_state(engine, user.id)).lock_count == 2


async def test_repeated_locks_last_as_long_as_the_policy_says_up_to_its_maximum(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    await make_user(email="ann@example.com")
    now = NOW
    lengths = []
    for _ in range(7):
        for _ in range(POLICY.max_failures):
            result = await attempt(uow_factory, "ann@example.com", now)
        assert result is not None
        assert result.locked_until is not None
        lengths.append((result.locked_until - now).total_seconds())
        now = result.locked_until
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
        result = await attempt(uow_factory, "ann@example.com")
    assert result is not None
    assert result.locked_until == NOW + timedelta(seconds=POLICY.max_lockout_seconds)


async def test_an_unknown_email_returns_none_and_writes_no_row(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    assert await attempt(uow_factory, "nobody@example.com") is None
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM users"))).scalar_one() == 0


async def test_email_case_variants_count_against_the_one_user(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    await attempt(uow_factory, "ANN@example.com")
    await attempt(uow_factory, "Ann@Example.COM")
    assert (await lock_state(engine, user.id)).failed_login_count == 2


async def test_clearing_resets_the_count_the_lock_and_the_lock_count_but_not_the_version(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    for _ in range(POLICY.max_failures + 1):
        await attempt(uow_factory, "ann@example.com", NOW - timedelta(hours=1))
    async with uow_factory() as uow:
        assert await uow.users.clear_login_failures(user.id) is True
        await uow.commit()
    assert await lock_state(engine, user.id) == LockState(0, 0, None)
    async with uow_factory() as uow:
        assert await uow.users.get(user.id) == user


async def test_clearing_an_unknown_user_returns_false(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.users.clear_login_failures(uuid.uuid4()) is False


async def test_concurrent_attempts_are_each_counted_once(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    roomy = LockoutPolicy(max_failures=50, lockout_seconds=60, max_lockout_seconds=60)
    results = await asyncio.gather(
        *(attempt(uow_factory, "ann@example.com", policy=roomy) for _ in range(20))
    )
    assert all(result is not None for result in results)
    assert (await lock_state(engine, user.id)).failed_login_count == 20


async def test_concurrent_attempts_beyond_the_maximum_get_exactly_the_maximum_and_one_lock(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    user = await make_user(email="ann@example.com")
    results = await asyncio.gather(*(attempt(uow_factory, "ann@example.com") for _ in range(20)))
    admitted = [result for result in results if result is not None]
    assert len(admitted) == POLICY.max_failures
    assert sum(result.locked_until is not None for result in admitted) == 1
    assert await lock_state(engine, user.id) == LockState(0, 1, NOW + timedelta(seconds=60))


async def test_counting_an_attempt_makes_the_commit_skip_the_wal_flush_wait(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    # Otherwise a registered email's failed login would be slower than an
    # unknown one's by a WAL flush: a timing oracle.
    await make_user(email="ann@example.com")
    async with uow_factory() as uow:
        await uow.users.start_login_attempt("ann@example.com", now=NOW, policy=POLICY)
        setting = await uow._session.execute(text("SHOW synchronous_commit"))  # type: ignore[attr-defined]
        assert setting.scalar_one() == "off"
