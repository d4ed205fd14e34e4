"""A first page's total_size on PostgreSQL (docs/api.md, List rules): exact up to
10,000 matches, an estimate within 10% beyond, without counting every
match. Both regimes need a real table and its statistics, so they are
tested here with tens of thousands of rows written in one statement."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.read_lane import SqlAlchemyUserReader
from usersvc.domain.filtering import parse_filter
from usersvc.domain.listing import Filter, ListQuery, Ordering
from usersvc.domain.ports import UnitOfWorkFactory

CAP = 10_000
FAKE_HASH = "$2b$04$abcdefghijklmnopqrstuu5Zk6d2uQ7g4QKJvLr7b3g3ZxJQkYx5e"

_INSERT = text(
    """
    INSERT INTO users (id, email, password_hash, display_name, roles, create_time,
                       update_time, delete_time)
    SELECT gen_random_uuid(), :prefix || n || '@example.com', :hash, :name, ARRAY['user'],
           now(), now(), CASE WHEN :deleted THEN now() END
    FROM generate_series(1, :count) AS n
    """
)


async def add_users(
    engine: AsyncEngine, count: int, *, name: str, prefix: str, deleted: bool = False
) -> None:
    """``count`` users named ``name`` in one statement, then the table's
    statistics brought up to date, as autovacuum would soon do."""
    async with engine.begin() as connection:
        await connection.execute(
            _INSERT,
            {"prefix": prefix, "hash": FAKE_HASH, "name": name, "deleted": deleted, "count": count},
        )
        # The cumulative statistics (live rows) are flushed when this
        # session next goes idle, at once rather than up to a second later.
        await connection.execute(text("SELECT pg_stat_force_next_flush()"))
    async with engine.begin() as connection:
        await connection.execute(text("ANALYZE users"))
        await connection.execute(text("SELECT pg_stat_force_next_flush()"))


async def total(
    uow_factory: UnitOfWorkFactory, filter: Filter | None = None, *, show_deleted: bool = False
) -> int:
    async with uow_factory() as uow:
        return await uow.users.count_matches(
            filter or Filter(), show_deleted=show_deleted, exact_up_to=CAP
        )


def within_ten_percent(estimate: int, actual: int) -> bool:
    return abs(estimate - actual) <= actual // 10


async def test_up_to_the_cap_the_total_is_exact(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory
) -> None:
    await add_users(engine, CAP, name="bulk", prefix="a")
    assert await total(uow_factory) == CAP


async def test_a_filter_matching_few_rows_of_a_large_table_is_counted_exactly(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory
) -> None:
    await add_users(engine, 30_000, name="many", prefix="a")
    await add_users(engine, 2_345, name="few", prefix="b")
    assert await total(uow_factory, parse_filter('display_name = "few"')) == 2_345


async def test_beyond_the_cap_an_unfiltered_total_is_within_ten_percent(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory
) -> None:
    await add_users(engine, 30_000, name="bulk", prefix="a")
    estimate = await total(uow_factory)
    assert estimate > CAP
    assert within_ten_percent(estimate, 30_000)


async def test_the_estimate_leaves_deleted_users_out_unless_asked(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory
) -> None:
    await add_users(engine, 24_000, name="live", prefix="a")
    await add_users(engine, 6_000, name="gone", prefix="b", deleted=True)
    assert within_ten_percent(await total(uow_factory), 24_000)
    assert within_ten_percent(await total(uow_factory, show_deleted=True), 30_000)


async def lane_total(engine: AsyncEngine, *, show_deleted: bool = False) -> int | None:
    """The total the read lane's first page (no filter) reports, or None
    when it leaves the count to its caller."""
    query = ListQuery(Filter(), Ordering(), show_deleted, 50)
    listed = await SqlAlchemyUserReader(engine).list_unfiltered(query, count_up_to=CAP)
    assert len(listed.page.users) == 50
    return listed.total_size


async def test_a_first_page_on_the_read_lane_carries_the_estimate_in_its_statement(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory
) -> None:
    await add_users(engine, 24_000, name="live", prefix="a")
    await add_users(engine, 6_000, name="gone", prefix="b", deleted=True)
    live = await lane_total(engine)
    assert live is not None
    assert within_ten_percent(live, 24_000)
    assert live == await total(uow_factory)
    every = await lane_total(engine, show_deleted=True)
    assert every is not None
    assert within_ten_percent(every, 30_000)


async def test_under_twice_the_cap_the_read_lane_leaves_the_count_to_its_caller(
    engine: AsyncEngine,
) -> None:
    await add_users(engine, 15_000, name="bulk", prefix="a")
    assert await lane_total(engine) is None


async def test_beyond_the_cap_a_filtered_total_is_within_ten_percent(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory
) -> None:
    await add_users(engine, 20_000, name="payments", prefix="a")
    await add_users(engine, 10_000, name="search", prefix="b")
    estimate = await total(uow_factory, parse_filter('display_name = "payments"'))
    assert estimate > CAP
    assert within_ten_percent(estimate, 20_000)


async def test_one_match_past_the_cap_is_never_reported_as_within_it(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory
) -> None:
    await add_users(engine, CAP + 1, name="edge", prefix="a")
    await add_users(engine, 5_000, name="other", prefix="b")
    estimate = await total(uow_factory, parse_filter('display_name = "edge"'))
    assert estimate > CAP
    assert within_ten_percent(estimate, CAP + 1)


@pytest.mark.parametrize("show_deleted", [False, True])
async def test_with_stale_statistics_the_count_still_says_more_than_the_cap(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, show_deleted: bool
) -> None:
    # Statistics reset (as after a crash): the table looks empty to them,
    # so the rows are counted, up to the cap, and the answer stays above it.
    await add_users(engine, 12_000, name="bulk", prefix="a")
    async with engine.begin() as connection:
        await connection.execute(
            text("SELECT pg_stat_reset_single_table_counters('users'::regclass)")
        )
    assert await total(uow_factory, show_deleted=show_deleted) > CAP
