"""SqlAlchemyIdempotencyRepository: the first response of a request id."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.domain.models import User
from usersvc.domain.ports import IdempotencyKeyTaken, IdempotencyRecord, UnitOfWorkFactory

UserMaker = Callable[..., Awaitable[User]]
LockWait = Callable[[int], Awaitable[None]]


async def store(
    uow_factory: UnitOfWorkFactory, scope: str, key: str, record: IdempotencyRecord
) -> None:
    async with uow_factory() as uow:
        await uow.idempotency.add(scope, key, record)
        await uow.commit()


async def test_an_unknown_key_has_no_record(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.idempotency.get("CreateUser", "nope") is None


async def test_a_stored_record_reads_back_with_equal_users(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    disabled = await make_user(labels={"team": "a"}, roles=("user", "admin"))
    async with uow_factory() as uow:
        disabled = await uow.users.set_disabled(disabled.id, True)
        await uow.commit()
    record = IdempotencyRecord(fingerprint="sha256:abc", users=(await make_user(), disabled))
    await store(uow_factory, "BatchCreateUsers", "req-1", record)
    async with uow_factory() as uow:
        assert await uow.idempotency.get("BatchCreateUsers", "req-1") == record


async def test_a_stored_record_contains_no_password_hash(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user(password_hash="$2b$04$secret-hash-value")
    await store(uow_factory, "CreateUser", "req-2", IdempotencyRecord("fp", (user,)))
    async with engine.connect() as connection:
        raw = (
            await connection.execute(text("SELECT response::text FROM idempotency_keys"))
        ).scalar_one()
    assert "secret-hash-value" not in raw
    assert "password" not in raw


async def test_storing_a_key_twice_raises_idempotency_key_taken(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await store(uow_factory, "CreateUser", "req-3", IdempotencyRecord("first", ()))
    with pytest.raises(IdempotencyKeyTaken):
        await store(uow_factory, "CreateUser", "req-3", IdempotencyRecord("second", ()))
    async with uow_factory() as uow:
        kept = await uow.idempotency.get("CreateUser", "req-3")
    assert kept is not None
    assert kept.fingerprint == "first"


async def test_the_same_key_in_another_scope_is_a_different_key(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await store(uow_factory, "caller-a", "req-4", IdempotencyRecord("a", ()))
    await store(uow_factory, "caller-b", "req-4", IdempotencyRecord("b", ()))
    async with uow_factory() as uow:
        a = await uow.idempotency.get("caller-a", "req-4")
        b = await uow.idempotency.get("caller-b", "req-4")
    assert a is not None
    assert b is not None
    assert (a.fingerprint, b.fingerprint) == ("a", "b")


async def test_a_concurrent_add_waits_and_loses_to_the_first_commit(
    uow_factory: UnitOfWorkFactory, wait_for_lock_waiters: LockWait
) -> None:
    async with uow_factory() as first:
        await first.idempotency.add("CreateUser", "req-5", IdempotencyRecord("first", ()))
        second = asyncio.create_task(
            store(uow_factory, "CreateUser", "req-5", IdempotencyRecord("second", ()))
        )
        await wait_for_lock_waiters(1)
        await first.commit()
    with pytest.raises(IdempotencyKeyTaken):
        await second


async def test_a_concurrent_add_wins_when_the_first_rolls_back(
    uow_factory: UnitOfWorkFactory, wait_for_lock_waiters: LockWait
) -> None:
    async with uow_factory() as first:
        await first.idempotency.add("CreateUser", "req-6", IdempotencyRecord("first", ()))
        second = asyncio.create_task(
            store(uow_factory, "CreateUser", "req-6", IdempotencyRecord("second", ()))
        )
        await wait_for_lock_waiters(1)
    await second
    async with uow_factory() as uow:
        kept = await uow.idempotency.get("CreateUser", "req-6")
    assert kept is not None
    assert kept.fingerprint == "second"
