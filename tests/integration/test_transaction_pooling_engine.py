"""The engine in transaction-pooling mode (USERSVC_DB_TRANSACTION_POOLING),
seen from PostgreSQL directly: nothing it does outlives a transaction on its
server connection, so a transaction pool may hand the next transaction to
any other one. The same service code through a real PgBouncer is in
tests/e2e/test_pgbouncer.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.domain.listing import Filter, ListQuery, Ordering
from usersvc.domain.models import User

UserMaker = Callable[..., Awaitable[User]]

PREPARED = text("SELECT count(*) FROM pg_prepared_statements")


async def _use_repositories(engine: AsyncEngine, make_user: UserMaker) -> None:
    user = await make_user()
    uow_factory = make_uow_factory(engine)
    for _ in range(3):
        async with uow_factory() as uow:
            await uow.users.get(user.id)
            await uow.users.get_by_email(user.email)
            await uow.users.list(ListQuery(Filter(), Ordering(), False, 10))


async def _prepared_statements(engine: AsyncEngine) -> int:
    # pool_size=1: this is the very connection the repositories used.
    async with engine.connect() as connection:
        count: int = (await connection.execute(PREPARED)).scalar_one()
    return count


async def test_no_prepared_statement_survives_its_transaction(
    make_engine: Callable[..., AsyncEngine], make_user: UserMaker
) -> None:
    engine = make_engine(db_transaction_pooling=True, db_pool_size=1, db_max_overflow=0)

    await _use_repositories(engine, make_user)

    assert await _prepared_statements(engine) == 0


async def test_without_the_mode_statements_stay_prepared_on_the_connection(
    make_engine: Callable[..., AsyncEngine], make_user: UserMaker
) -> None:
    engine = make_engine(db_transaction_pooling=False, db_pool_size=1, db_max_overflow=0)

    await _use_repositories(engine, make_user)

    assert await _prepared_statements(engine) > 0


async def test_the_statement_timeout_comes_from_the_role_not_from_the_connection(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    pooled = make_engine(db_transaction_pooling=True, db_statement_timeout_ms=4321)
    direct = make_engine(db_transaction_pooling=False, db_statement_timeout_ms=4321)

    async with pooled.connect() as connection:
        pooled_timeout = (await connection.execute(text("SHOW statement_timeout"))).scalar_one()
        role_default = (
            await connection.execute(
                text("SELECT reset_val FROM pg_settings WHERE name = 'statement_timeout'")
            )
        ).scalar_one()
    async with direct.connect() as connection:
        direct_timeout = (await connection.execute(text("SHOW statement_timeout"))).scalar_one()

    assert direct_timeout == "4321ms"
    assert pooled_timeout != "4321ms"
    assert pooled_timeout == ("0" if role_default == "0" else f"{role_default}ms")
