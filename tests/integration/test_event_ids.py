"""Event ids are time-ordered UUIDs (version 7, migration 0010), made by the
statements that write events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from usersvc.adapters import migrations
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.models import NewUser
from usersvc.domain.ports import UnitOfWorkFactory


def _millis(event_id: uuid.UUID) -> int:
    return event_id.int >> 80


async def _functions_named_uuid7(url: str) -> int:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            query = text("SELECT count(*) FROM pg_proc WHERE proname = 'usersvc_uuid7'")
            return int(await conn.scalar(query))
    finally:
        await engine.dispose()


async def test_the_events_of_a_write_have_version_7_ids_of_their_time(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine, clean_db: None
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    async with uow_factory() as uow:
        for n in range(50):
            await uow.users.add(
                NewUser(email=f"ids-{n}@example.com", password_hash="x", display_name="",
                        roles=("user",), labels={}),
                events=[EventDraft(EventType.USER_CREATED)],
            )  # fmt: skip
        await uow.commit()
    after = datetime.now(UTC) + timedelta(seconds=1)
    async with engine.connect() as conn:
        ids = list((await conn.execute(text("SELECT id FROM events ORDER BY position"))).scalars())

    assert len(ids) == len(set(ids)) == 50
    assert {event_id.version for event_id in ids} == {7}
    assert {event_id.variant for event_id in ids} == {uuid.RFC_4122}
    stamps = [_millis(event_id) for event_id in ids]
    assert stamps == sorted(stamps)
    assert before.timestamp() * 1000 <= stamps[0] <= stamps[-1] <= after.timestamp() * 1000


async def test_ten_thousand_ids_in_one_statement_are_distinct_and_in_time_order(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as conn:
        ids = list(
            (
                await conn.execute(
                    text("SELECT usersvc_uuid7() FROM generate_series(1, 10000) ORDER BY 1")
                )
            ).scalars()
        )
        generated = list(
            (
                await conn.execute(
                    text("SELECT usersvc_uuid7() AS id FROM generate_series(1, 2000)")
                )
            ).scalars()
        )

    assert len(set(ids)) == 10000
    assert {event_id.version for event_id in ids} == {7}
    # Made one after the other: their milliseconds never go back.
    stamps = [_millis(event_id) for event_id in generated]
    assert stamps == sorted(stamps)


async def test_the_downgrade_to_0009_drops_the_function(empty_database_url: str) -> None:
    url = empty_database_url
    await migrations.upgrade_async(url, "0010")
    present = await _functions_named_uuid7(url)
    await migrations.downgrade_async(url, "0009")
    gone = await _functions_named_uuid7(url)

    assert (present, gone) == (1, 0)
