"""Retention of the events table (usersvc.adapters.event_retention): old
events go, except the newest, unnumbered ones, and, when a relay publishes,
those after its mark (event_relay_mark)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.event_retention import delete_expired_events
from usersvc.adapters.events import sequence_pending


async def _old_events(engine: AsyncEngine, count: int, *, days_ago: int = 100) -> None:
    """``count`` numbered events about nobody, created ``days_ago`` days ago."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO events (id, type, create_time) "
                "SELECT gen_random_uuid(), 'usersvc.auth.login_failed.v1', "
                "now() - make_interval(days => :days) FROM generate_series(1, :n)"
            ),
            {"n": count, "days": days_ago},
        )
    while await sequence_pending(engine):
        pass


async def _mark(engine: AsyncEngine, published_through: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO event_relay_mark (id, published_through) VALUES (1, :n)"),
            {"n": published_through},
        )


async def _kept(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        rows = await conn.scalars(text("SELECT sequence FROM events ORDER BY sequence"))
        return list(rows)


async def test_with_a_relay_only_events_up_to_its_mark_are_deleted(engine: AsyncEngine) -> None:
    await _old_events(engine, 5)
    await _mark(engine, 3)

    deleted = await delete_expired_events(engine, retention_days=90, keep_unpublished=True)

    assert (deleted, await _kept(engine)) == (3, [4, 5])


async def test_with_a_relay_and_no_mark_yet_nothing_is_deleted(engine: AsyncEngine) -> None:
    await _old_events(engine, 3)

    deleted = await delete_expired_events(engine, retention_days=90, keep_unpublished=True)

    assert (deleted, await _kept(engine)) == (0, [1, 2, 3])


async def test_without_a_relay_old_events_go_but_the_newest_stays(engine: AsyncEngine) -> None:
    await _old_events(engine, 4)

    deleted = await delete_expired_events(engine, retention_days=90, keep_unpublished=False)

    assert (deleted, await _kept(engine)) == (3, [4])


async def test_events_younger_than_the_retention_stay(engine: AsyncEngine) -> None:
    await _old_events(engine, 2)
    await _old_events(engine, 2, days_ago=10)
    await _mark(engine, 4)

    deleted = await delete_expired_events(engine, retention_days=90, keep_unpublished=True)

    assert (deleted, await _kept(engine)) == (2, [3, 4])
