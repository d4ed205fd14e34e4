"""SqlAlchemyUnitOfWork: transaction boundaries, connection release, and the
translation of connection failures into DatabaseUnavailable."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.users import patch_user
from usersvc.adapters import migrations
from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.domain.errors import DatabaseUnavailable
from usersvc.domain.models import NewUser, User, UserPatch
from usersvc.domain.ports import UnitOfWorkFactory

NewUserFactory = Callable[..., NewUser]
UserMaker = Callable[..., Awaitable[User]]
LockWait = Callable[[int], Awaitable[None]]


async def stored(uow_factory: UnitOfWorkFactory, user_id: uuid.UUID) -> User | None:
    async with uow_factory() as uow:
        return await uow.users.get(user_id)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (at most 5 s) for a condition that another task makes true."""
    async with asyncio.timeout(5):
        # Polling: the pool's counters offer nothing to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_changes_are_rolled_back_when_the_block_ends_without_commit(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    async with uow_factory() as uow:
        user = await uow.users.add(new_user())
    assert await stored(uow_factory, user.id) is None


async def test_changes_are_rolled_back_when_the_block_raises(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(display_name="before")

    async def update_then_fail() -> None:
        async with uow_factory() as uow:
            await patch_user(uow, user.id, UserPatch(display_name="after"))
            raise LookupError

    with pytest.raises(LookupError):
        await update_then_fail()
    assert await stored(uow_factory, user.id) == user


async def test_committed_changes_are_visible_to_later_units_of_work(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    async with uow_factory() as uow:
        user = await uow.users.add(new_user())
        await uow.commit()
    assert await stored(uow_factory, user.id) == user


async def test_rollback_discards_earlier_changes_and_later_ones_can_commit(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    async with uow_factory() as uow:
        discarded = await uow.users.add(new_user())
        await uow.rollback()
        kept = await uow.users.add(new_user())
        await uow.commit()
    assert await stored(uow_factory, discarded.id) is None
    assert await stored(uow_factory, kept.id) == kept


async def test_a_unit_of_work_cannot_be_entered_twice(uow_factory: UnitOfWorkFactory) -> None:
    uow = uow_factory()
    async with uow:
        pass
    with pytest.raises(RuntimeError):
        async with uow:
            pass


async def test_commit_outside_the_block_raises_runtime_error(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(RuntimeError):
        await uow_factory().commit()


async def test_the_connection_returns_to_the_pool_when_the_block_ends(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    checked_out_inside: list[int] = []

    async def lock_then_fail() -> None:
        async with uow_factory() as uow:
            await uow.users.get(user.id, for_update=True)
            checked_out_inside.append(engine.pool.checkedout())  # type: ignore[attr-defined]
            raise LookupError

    with pytest.raises(LookupError):
        await lock_then_fail()
    assert checked_out_inside == [1]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_cancelled_unit_of_work_releases_its_connection_and_its_locks(
    engine: AsyncEngine,
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
    wait_for_lock_waiters: LockWait,
) -> None:
    user = await make_user()

    async def lock_and_update() -> None:
        async with uow_factory() as uow:
            await patch_user(uow, user.id, UserPatch(display_name="cancelled"))
            await uow.users.get(user.id, for_update=True)
            await uow.commit()

    async with uow_factory() as holder:
        await holder.users.get(user.id, for_update=True)
        blocked = asyncio.create_task(lock_and_update())
        await wait_for_lock_waiters(1)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
    await until(lambda: engine.pool.checkedout() == 0)  # type: ignore[attr-defined]
    async with asyncio.timeout(5), uow_factory() as uow:
        relocked = await uow.users.get(user.id, for_update=True)
    assert relocked == user


async def test_an_unreachable_database_raises_database_unavailable(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port any more: connections are refused.
    engine = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres")
    async with make_uow_factory(engine)() as uow:
        with pytest.raises(DatabaseUnavailable) as caught:
            await uow.users.get(uuid.uuid4())
    assert isinstance(caught.value.__cause__, OSError)


async def test_an_exhausted_pool_raises_database_unavailable(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    engine = make_engine(db_pool_size=1, db_max_overflow=0, db_pool_timeout_seconds=0.1)
    uow_factory = make_uow_factory(engine)
    async with uow_factory() as holder:
        await holder.users.get(uuid.uuid4())
        async with uow_factory() as starved:
            with pytest.raises(DatabaseUnavailable):
                await starved.users.get(uuid.uuid4())


async def test_a_statement_over_the_statement_timeout_raises_database_unavailable(
    make_engine: Callable[..., AsyncEngine], uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    impatient = make_uow_factory(make_engine(db_statement_timeout_ms=200))
    async with uow_factory() as holder:
        await holder.users.get(user.id, for_update=True)
        async with impatient() as uow:
            with pytest.raises(DatabaseUnavailable):
                await uow.users.get(user.id, for_update=True)


async def test_a_connection_killed_by_the_server_raises_database_unavailable(
    engine: AsyncEngine, make_engine: Callable[..., AsyncEngine], make_user: UserMaker
) -> None:
    user = await make_user()
    victim_engine = make_engine(db_pool_size=1, db_max_overflow=0)
    async with make_uow_factory(victim_engine)() as uow:
        await uow.users.get(user.id)
        async with engine.connect() as admin:
            killed = await admin.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND state = 'idle in transaction'"
                )
            )
            assert killed.scalar_one() == 1
        with pytest.raises(DatabaseUnavailable):
            await uow.users.get(user.id)
    assert victim_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_statement_made_stale_by_a_schema_change_fails_once_as_unavailable(
    empty_database_url: str, make_engine: Callable[..., AsyncEngine], new_user: NewUserFactory
) -> None:
    await migrations.upgrade_async(empty_database_url)
    engine = make_engine(empty_database_url, db_pool_size=1, db_max_overflow=0)
    uow_factory = make_uow_factory(engine)
    async with uow_factory() as uow:
        user = await uow.users.add(new_user())
        await uow.commit()
    assert await stored(uow_factory, user.id) == user  # prepares and caches the statement
    async with engine.begin() as connection:
        # What a migration might do: the cached plan's result type changes.
        await connection.exec_driver_sql("ALTER TABLE users ALTER COLUMN display_name TYPE varchar")

    with pytest.raises(DatabaseUnavailable):
        await stored(uow_factory, user.id)
    assert await stored(uow_factory, user.id) == user
