"""The read lane (usersvc.adapters.read_lane) against PostgreSQL: the same
users as the repository's path, missing and deleted users alike, one
statement per read, and what happens when connections die or reads are
cancelled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.read_lane import SqlAlchemyUserReader
from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.domain.errors import DatabaseUnavailable, TokenRevoked
from usersvc.domain.models import Principal, PrincipalKind, User
from usersvc.domain.ports import UnitOfWorkFactory
from usersvc.domain.role_checks import RoleCheck

UserMaker = Callable[..., Awaitable[User]]


@asynccontextmanager
async def driver_queries(engine: AsyncEngine) -> AsyncIterator[list[str]]:
    """The queries asyncpg runs on ``engine``'s connections checked out
    while the block runs (the lane's statements and the pre-ping)."""
    queries: list[str] = []
    watched: list[Any] = []

    def record(query: Any) -> None:
        queries.append(" ".join(str(query.query).split()))

    def watch(dbapi_connection: Any, *_: Any) -> None:
        driver = dbapi_connection.driver_connection
        if driver not in watched:
            watched.append(driver)
            driver.add_query_logger(record)

    # Inserted first: it must see the pre-ping that the engine's own
    # checkout listener sends.
    event.listen(engine.sync_engine.pool, "checkout", watch, insert=True)
    try:
        yield queries
        # asyncpg hands logged queries to the loggers on the next loop turn.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    finally:
        event.remove(engine.sync_engine.pool, "checkout", watch)
        for driver in watched:
            driver.remove_query_logger(record)


async def kill_idle_connections(admin: AsyncEngine) -> int:
    async with admin.connect() as connection:
        result = await connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND state = 'idle' "
                "AND application_name = 'usersvc' AND pid <> pg_backend_pid()"
            )
        )
        return int(result.scalar_one())


async def test_get_returns_the_user_the_repository_returns(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    stored = await make_user(display_name="Ada", roles=("user", "admin"), labels={"team": "x"})
    async with uow_factory() as uow:
        through_repository = await uow.users.get(stored.id)

    through_lane = await SqlAlchemyUserReader(engine).get(stored.id)

    assert through_lane == through_repository == stored
    assert through_lane is not None
    assert through_repository is not None
    assert type(through_lane.id) is type(through_repository.id)
    assert type(through_lane.labels) is type(through_repository.labels)
    assert type(through_lane.roles) is type(through_repository.roles)


async def test_get_by_email_matches_case_insensitively_like_the_repository(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    stored = await make_user(email="Grace@Example.com")
    async with uow_factory() as uow:
        through_repository = await uow.users.get_by_email("grace@example.com")

    through_lane = await SqlAlchemyUserReader(engine).get_by_email("grace@example.com")

    assert through_lane == through_repository == stored


async def test_get_many_returns_the_stored_users_among_the_ids(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    first, second = await make_user(), await make_user()
    ids = [second.id, uuid.uuid4(), first.id, second.id]
    async with uow_factory() as uow:
        through_repository = await uow.users.get_many(ids)

    through_lane = await SqlAlchemyUserReader(engine).get_many(ids)

    def by_id(users: list[Any]) -> dict[uuid.UUID, Any]:
        return {user.id: user for user in users}

    assert by_id(through_lane) == by_id(through_repository) == {first.id: first, second.id: second}
    assert len(through_lane) == 2


async def test_get_many_of_no_ids_asks_nothing(engine: AsyncEngine) -> None:
    async with driver_queries(engine) as queries:
        assert await SqlAlchemyUserReader(engine).get_many([]) == []
    assert queries == []


async def test_missing_users_are_none_on_both_paths(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory
) -> None:
    reader = SqlAlchemyUserReader(engine)
    missing = uuid.uuid4()
    async with uow_factory() as uow:
        assert await uow.users.get(missing) is None
        assert await uow.users.get_by_email("nobody@example.com") is None
    assert await reader.get(missing) is None
    assert await reader.get_by_email("nobody@example.com") is None
    assert await reader.get_many([missing]) == []


async def test_deleted_users_are_returned_with_their_delete_time_like_the_repository(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    stored = await make_user()
    async with uow_factory() as uow:
        deleted = await uow.users.set_deleted(stored.id, True)
        await uow.commit()

    through_lane = await SqlAlchemyUserReader(engine).get(stored.id)

    assert through_lane == deleted
    assert through_lane is not None
    assert through_lane.delete_time is not None


async def test_a_read_is_one_statement_without_a_transaction_or_a_ping(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    stored = await make_user()
    reader = SqlAlchemyUserReader(engine)
    await reader.get(stored.id)  # the pool holds a connection now

    async with driver_queries(engine) as queries:
        await reader.get(stored.id)

    assert len(queries) == 1
    assert queries[0].startswith("SELECT users.id")
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_other_checkouts_are_still_pinged_once(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))

    async with driver_queries(engine) as queries, engine.connect() as connection:
        await connection.execute(text("SELECT 2"))

    # The pre-ping first, once; then SQLAlchemy's transaction around its
    # statement (a prepared statement, which asyncpg does not log).
    assert queries[0] == "SELECT 1"
    assert queries.count("SELECT 1") == 1


async def test_a_read_after_its_connection_was_killed_succeeds_on_a_fresh_one(
    make_engine: Callable[..., AsyncEngine], engine: AsyncEngine, make_user: UserMaker
) -> None:
    stored = await make_user()
    lane_engine = make_engine(db_pool_size=2, db_max_overflow=0)
    reader = SqlAlchemyUserReader(lane_engine)
    await asyncio.gather(reader.get(stored.id), reader.get(stored.id))  # two pooled
    assert await kill_idle_connections(engine) >= 2

    assert await reader.get(stored.id) == stored
    assert await reader.get(stored.id) == stored
    assert lane_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_write_after_its_pooled_connection_was_killed_succeeds_through_the_pre_ping(
    make_engine: Callable[..., AsyncEngine], engine: AsyncEngine, make_user: UserMaker
) -> None:
    stored = await make_user()
    uow_engine = make_engine(db_pool_size=1, db_max_overflow=0)
    async with make_uow_factory(uow_engine)() as uow:
        await uow.users.get(stored.id)
    assert await kill_idle_connections(engine) >= 1

    async with make_uow_factory(uow_engine)() as uow:
        assert await uow.users.get(stored.id) == stored


async def test_an_unreachable_database_raises_database_unavailable(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    unreachable = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    reader = SqlAlchemyUserReader(unreachable)
    with pytest.raises(DatabaseUnavailable):
        await reader.get(uuid.uuid4())


class FakeAvailability:
    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.failures = 0

    def ensure_available(self) -> None:
        if self.down:
            raise DatabaseUnavailable()

    def report_failure(self) -> None:
        self.failures += 1


async def test_the_breaker_refuses_before_any_connection_is_taken(engine: AsyncEngine) -> None:
    availability = FakeAvailability(down=True)
    async with driver_queries(engine) as queries:
        with pytest.raises(DatabaseUnavailable):
            await SqlAlchemyUserReader(engine, availability).get(uuid.uuid4())
    assert queries == []


async def test_a_connection_failure_is_reported_to_the_breaker(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    availability = FakeAvailability()
    unreachable = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailable):
        await SqlAlchemyUserReader(unreachable, availability).get(uuid.uuid4())
    assert availability.failures == 1


async def test_a_read_cancelled_mid_statement_returns_nothing_broken_to_the_pool(
    make_engine: Callable[..., AsyncEngine], make_user: UserMaker
) -> None:
    stored = await make_user()
    slow_engine = make_engine(db_pool_size=1, db_max_overflow=0)
    reader = SqlAlchemyUserReader(slow_engine)
    # A statement that takes a while: the lane runs the repository's SQL
    # with its one argument, so a slow email comparison stands in for it.
    reader._by_email = (
        "SELECT * FROM (SELECT u.*, pg_sleep(5) FROM users u) AS slow WHERE email = $1"
    )
    task = asyncio.create_task(reader.get_by_email(stored.email))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert slow_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await reader.get(stored.id) == stored


async def test_through_a_transaction_pool_each_read_runs_in_a_read_only_transaction(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    stored = await make_user()
    reader = SqlAlchemyUserReader(engine, transaction_pooling=True)
    await reader.get(stored.id)

    async with driver_queries(engine) as queries:
        assert await reader.get(stored.id) == stored

    assert queries[0] == "BEGIN READ ONLY;"
    assert queries[1].startswith("SELECT users.id")
    assert queries[2] == "COMMIT;"


# -- the role re-check of a privileged token, in the read's own statement -------------------


def admin_check(account: User) -> RoleCheck:
    """The pending re-check of a token of ``account`` claiming "admin"."""
    principal = Principal(
        kind=PrincipalKind.USER, subject=str(account.id), roles=frozenset({"user", "admin"})
    )
    return RoleCheck.of(principal)


async def test_a_checked_read_is_one_statement_that_also_passes_the_check(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    admin = await make_user(roles=("user", "admin"))
    target = await make_user()
    reader = SqlAlchemyUserReader(engine)
    await reader.get(target.id)  # the pool holds a connection now
    check = admin_check(admin)

    async with driver_queries(engine) as queries:
        assert await reader.get(target.id, role_check=check) == target

    assert check.passed is True
    assert len(queries) == 1
    assert "holder" in queries[0]
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_every_checked_read_answers_like_the_plain_read(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    admin = await make_user(roles=("user", "admin"))
    first, second = await make_user(), await make_user()
    reader = SqlAlchemyUserReader(engine)
    missing = uuid.uuid4()

    assert await reader.get_by_email(first.email.upper(), role_check=admin_check(admin)) == first
    assert await reader.get(missing, role_check=admin_check(admin)) is None
    assert await reader.get_by_email("nobody@example.com", role_check=admin_check(admin)) is None
    found = await reader.get_many([first.id, missing, second.id], role_check=admin_check(admin))
    assert sorted(found, key=lambda user: user.email) == sorted(
        [first, second], key=lambda user: user.email
    )
    assert await reader.get_many([missing], role_check=admin_check(admin)) == []


@pytest.mark.parametrize("change", ["demoted", "disabled", "deleted", "purged"])
async def test_a_checked_read_refuses_a_token_its_account_no_longer_backs(
    engine: AsyncEngine, make_user: UserMaker, change: str
) -> None:
    admin = await make_user(roles=("user", "admin"))
    target = await make_user()
    async with engine.begin() as connection:
        statement = {
            "demoted": "UPDATE users SET roles = ARRAY['user'] WHERE id = :id",
            "disabled": "UPDATE users SET disable_time = now() WHERE id = :id",
            "deleted": "UPDATE users SET delete_time = now() WHERE id = :id",
            "purged": "DELETE FROM users WHERE id = :id",
        }[change]
        await connection.execute(text(statement), {"id": admin.id})
    reader = SqlAlchemyUserReader(engine)

    for read in (
        lambda check: reader.get(target.id, role_check=check),
        lambda check: reader.get_by_email(target.email, role_check=check),
        lambda check: reader.get_many([target.id], role_check=check),
    ):
        check = admin_check(admin)
        with pytest.raises(TokenRevoked):
            await read(check)
        assert check.passed is False
