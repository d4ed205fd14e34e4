"""The sequencer's floor (migration 0009): a pass reads its queue from
event_sequencer.txid_floor up, raises the floor once it took every row it
could see, and never loses the event of a transaction that commits late.

Each test migrates a database of its own: the floor is cluster-wide state
(the oldest running transaction id), and nothing else numbers there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from usersvc.adapters import migrations
from usersvc.adapters.events import EVENTS_CHANNEL, SEQUENCER_LOCK_KEY, sequence_pending

# How long another transaction of the cluster (another test database, a
# benchmark) may keep the oldest running transaction id below ours.
FLOOR_WAIT_SECONDS = 15.0

# The numbering function's read of its queue (migration 0009), the floor and
# the batch as parameters.
PENDING_SQL = (
    "SELECT ctid, position FROM events "
    "WHERE sequence IS NULL AND txid >= $1 ORDER BY position LIMIT $2"
)

_INSERT = text(
    "INSERT INTO events (id, type) "
    "SELECT gen_random_uuid(), 'usersvc.auth.login_failed.v1' FROM generate_series(1, :n) "
    "RETURNING txid"
)


@pytest.fixture
async def events_engine(empty_database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a database of this test's own, migrated to head."""
    await migrations.upgrade_async(empty_database_url)
    engine = create_async_engine(empty_database_url, pool_size=2, max_overflow=2)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _insert(engine: AsyncEngine, count: int) -> int:
    """``count`` unnumbered events in one committed transaction; its txid."""
    async with engine.begin() as conn:
        txids = set((await conn.execute(_INSERT, {"n": count})).scalars())
    [txid] = txids
    return int(txid)


async def _floor(engine: AsyncEngine) -> int | None:
    async with engine.connect() as conn:
        floor = await conn.scalar(text("SELECT txid_floor FROM event_sequencer WHERE id = 1"))
    return None if floor is None else int(floor)


async def _pending(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM events WHERE sequence IS NULL")))


async def _raise_floor_past(engine: AsyncEngine, txid: int) -> int:
    """Passes until the floor is above ``txid``: once every transaction up to
    it has ended (others in the cluster may still run for a moment), a pass
    that numbers every row it sees raises it (an empty pass writes nothing),
    so each pass is given one event of its own. Returns the floor."""
    deadline = asyncio.get_running_loop().time() + FLOOR_WAIT_SECONDS
    while True:
        await _insert(engine, 1)
        assert await sequence_pending(engine) == 1
        floor = await _floor(engine)
        if floor is not None and floor > txid:
            return floor
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the floor stayed at {floor}, not above {txid}")
        await asyncio.sleep(0.05)


async def _wait_for_oldest_running_above(engine: AsyncEngine, txid: int) -> None:
    """Until every transaction of the cluster up to ``txid`` has ended."""
    query = text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    deadline = asyncio.get_running_loop().time() + FLOOR_WAIT_SECONDS
    while True:
        async with engine.connect() as conn:
            if int(await conn.scalar(query)) > txid:
                return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"a transaction at or below {txid} is still running")
        await asyncio.sleep(0.05)


async def test_a_pass_that_numbers_everything_raises_the_floor_and_the_next_finds_nothing(
    events_engine: AsyncEngine,
) -> None:
    engine = events_engine
    old_floor = await _raise_floor_past(engine, 0)
    inserted_by = await _insert(engine, 30)
    await _wait_for_oldest_running_above(engine, inserted_by)

    async with engine.begin() as conn:
        # The oldest running id as the pass begins: the floor it stores is
        # at least this (the pass's own snapshot is taken after this one).
        oldest_before = int(
            await conn.scalar(text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))
        )
        numbered = await conn.scalar(
            text("SELECT usersvc_number_events(:key, 1000, :channel)"),
            {"key": SEQUENCER_LOCK_KEY, "channel": EVENTS_CHANNEL},
        )
    new_floor = await _floor(engine)
    second = await sequence_pending(engine)

    assert old_floor < inserted_by < oldest_before
    assert numbered == 30
    assert new_floor is not None
    assert new_floor >= oldest_before > old_floor
    assert (second, await _pending(engine)) == (0, 0)


async def test_an_open_transaction_holds_the_floor_down_and_its_event_is_numbered_after_commit(
    events_engine: AsyncEngine,
) -> None:
    engine = events_engine
    floors: list[int | None] = []
    numbered: list[int] = []
    async with engine.connect() as held:
        await held.begin()
        # One event now, one more after other transactions' events were
        # numbered (and the floor could have moved).
        [held_txid] = (await held.execute(_INSERT, {"n": 1})).scalars()
        for _ in range(3):
            await _insert(engine, 2)
            numbered.append(await sequence_pending(engine))
            floors.append(await _floor(engine))
        [event_txid] = (await held.execute(_INSERT, {"n": 1})).scalars()
        for _ in range(2):
            await _insert(engine, 2)
            numbered.append(await sequence_pending(engine))
            floors.append(await _floor(engine))
        await held.commit()
    after_commit = await sequence_pending(engine)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(text("SELECT txid, sequence FROM events ORDER BY sequence"))
        ).all()

    assert event_txid == held_txid
    assert numbered == [2, 2, 2, 2, 2]
    assert all(floor is not None and floor <= held_txid for floor in floors), (floors, held_txid)
    assert after_commit == 2
    # Nothing lost, nothing twice, and the late events after the others.
    assert [sequence for _, sequence in rows] == list(range(1, 13))
    assert rows[-2:] == [(held_txid, 11), (held_txid, 12)]


async def _buffers(conn: AsyncConnection, floor: int) -> int:
    """Shared buffers the pending SELECT touches from ``floor``, as the
    function runs it (enable_seqscan off, set by the caller; a generic plan
    of its parameters, and a custom one): the most of the two."""
    touched = 0
    await conn.execute(text(f"PREPARE pending_from(bigint, integer) AS {PENDING_SQL}"))
    for mode in ("force_generic_plan", "force_custom_plan"):
        await conn.execute(text(f"SET LOCAL plan_cache_mode = {mode}"))
        explained = await conn.scalar(
            text(
                f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE pending_from({int(floor)}, 1000)"
            )
        )
        [plan] = json.loads(explained) if isinstance(explained, str) else explained
        top = plan["Plan"]
        touched = max(touched, top["Shared Hit Blocks"] + top["Shared Read Blocks"])
    await conn.execute(text("DEALLOCATE pending_from"))
    return touched


_BLOCKS_FETCHED = text(
    "SELECT pg_stat_get_xact_blocks_fetched('events'::regclass)"
    " + pg_stat_get_xact_blocks_fetched('ix_events_unsequenced'::regclass)"
)


async def _blocks_of_a_pass(engine: AsyncEngine, *, without_floor_row: bool) -> tuple[int, int]:
    """One call of the numbering function, rolled back (its rows stay
    pending): how many it numbered, and how many blocks of the events table
    and its queue index it read (hits and reads; the backend's counts, not
    reported while its transaction runs, before and after the call)."""
    async with engine.connect() as conn:
        transaction = await conn.begin()
        if without_floor_row:
            await conn.execute(text("DELETE FROM event_sequencer"))
        before = await conn.scalar(_BLOCKS_FETCHED)
        numbered = await conn.scalar(
            text("SELECT usersvc_number_events(:key, 1000, :channel)"),
            {"key": SEQUENCER_LOCK_KEY, "channel": EVENTS_CHANNEL},
        )
        after = await conn.scalar(_BLOCKS_FETCHED)
        await transaction.rollback()
    return int(numbered), int(after) - int(before)


async def test_a_pass_reads_the_queue_from_the_floor_not_past_the_events_numbered_before(
    events_engine: AsyncEngine,
) -> None:
    engine = events_engine
    async with engine.connect() as connection:
        old_snapshot = await connection.execution_options(isolation_level="REPEATABLE READ")
        # A snapshot older than the numbering keeps every numbered row's old
        # version and its queue entry (vacuum can neither remove them nor an
        # index scan mark them dead), as between two vacuums. A transaction
        # without an id of its own does not hold the floor.
        await old_snapshot.begin()
        await old_snapshot.execute(text("SELECT count(*) FROM events"))
        last = 0
        for _ in range(40):  # 10,000 events, numbered in passes
            last = await _insert(engine, 250)
            assert await sequence_pending(engine, batch=1000) == 250
        floor = await _raise_floor_past(engine, last)
        await _insert(engine, 5)
        async with engine.begin() as conn:
            await conn.execute(text("SET LOCAL enable_seqscan = off"))
            select_from_floor = await _buffers(conn, floor)
            select_from_start = await _buffers(conn, 0)
        pass_from_floor = await _blocks_of_a_pass(engine, without_floor_row=False)
        pass_from_start = await _blocks_of_a_pass(engine, without_floor_row=True)
        numbered = await sequence_pending(engine)
        await old_snapshot.rollback()

    # From the start (floor 0, as without the floor's row) the read visits
    # the dead entries: the control, showing that the setup left them in
    # place. From the floor, only the new rows'.
    assert select_from_start > 150, select_from_start
    assert select_from_floor < 50, (select_from_floor, select_from_start)
    (numbered_from_floor, blocks_from_floor) = pass_from_floor
    (numbered_from_start, blocks_from_start) = pass_from_start
    assert (numbered_from_floor, numbered_from_start, numbered) == (5, 5, 5)
    assert blocks_from_start > 150, pass_from_start
    assert blocks_from_floor < 50, (pass_from_floor, pass_from_start)


async def test_a_full_batch_leaves_the_floor_where_it_was(events_engine: AsyncEngine) -> None:
    # A pass that stopped at its batch has not seen every row: the rows it
    # left are below the oldest running transaction, and must stay above
    # the floor until a later pass numbers them.
    engine = events_engine
    await _raise_floor_past(engine, 0)
    inserted_by = await _insert(engine, 10)
    await _wait_for_oldest_running_above(engine, inserted_by)

    first = await sequence_pending(engine, batch=4)
    floor_after_full_batch = await _floor(engine)
    rest = [await sequence_pending(engine, batch=4) for _ in range(3)]

    assert floor_after_full_batch is not None
    assert floor_after_full_batch <= inserted_by
    assert [first, *rest] == [4, 4, 2, 0]
    assert await _pending(engine) == 0


async def test_without_the_floor_row_a_pass_reads_from_zero_and_writes_the_row_again(
    events_engine: AsyncEngine,
) -> None:
    engine = events_engine
    floor = await _raise_floor_past(engine, 0)
    await _insert(engine, 3)
    async with engine.begin() as conn:
        # Rows below any floor (as the migration leaves those waiting).
        await conn.execute(
            text("INSERT INTO events (id, type, txid) SELECT gen_random_uuid(), 't', 0")
        )
        await conn.execute(text("DELETE FROM event_sequencer"))

    numbered = await sequence_pending(engine)

    assert numbered == 4
    assert await _pending(engine) == 0
    recreated = await _floor(engine)
    assert recreated is not None
    assert recreated >= floor


async def test_a_pass_with_nothing_to_number_writes_nothing(events_engine: AsyncEngine) -> None:
    # Its write would take a transaction id, which would raise the oldest
    # running one, so every empty pass (a feed polls each second) would
    # write again.
    engine = events_engine
    await _raise_floor_past(engine, 0)
    async with engine.connect() as conn:
        before = await conn.scalar(text("SELECT xmin::text FROM event_sequencer"))
        await conn.execute(text("SELECT txid_current()"))  # the ids move on
        await conn.commit()
    numbered = [await sequence_pending(engine) for _ in range(3)]
    async with engine.connect() as conn:
        after = await conn.scalar(text("SELECT xmin::text FROM event_sequencer"))

    assert numbered == [0, 0, 0]
    assert after == before


async def test_with_the_floor_in_place_rows_below_it_are_not_read(
    events_engine: AsyncEngine,
) -> None:
    # The floor is what the queue is read from: a row with a txid below it
    # (which no transaction writes: the default is its own id) stays.
    engine = events_engine
    await _raise_floor_past(engine, 0)
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO events (id, type, txid) SELECT gen_random_uuid(), 't', 0")
        )
    assert (await sequence_pending(engine), await _pending(engine)) == (0, 1)


async def _scalars(url: str, statement: str) -> list[Any]:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement))
            return list(result.scalars()) if result.returns_rows else []
    finally:
        await engine.dispose()


_QUEUE_INDEX = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_events_unsequenced'"
_EVENT_COLUMNS = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_name = 'events' ORDER BY ordinal_position"
)
_SEQUENCER_TABLE = (
    "SELECT table_name FROM information_schema.tables WHERE table_name = 'event_sequencer'"
)
_NUMBER = "SELECT usersvc_number_events(1, 100, 'c')"


async def test_rows_waiting_at_the_migration_are_numbered_and_the_downgrade_restores_0008(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await migrations.upgrade_async(url, "0008")
    index_0008 = await _scalars(url, _QUEUE_INDEX)
    columns_0008 = await _scalars(url, _EVENT_COLUMNS)
    await _scalars(
        url,
        "INSERT INTO events (id, type, sequence) SELECT gen_random_uuid(), 'numbered', g "
        "FROM generate_series(1, 3) g",
    )
    await _scalars(
        url,
        "INSERT INTO events (id, type) SELECT gen_random_uuid(), 'waiting' "
        "FROM generate_series(1, 4)",
    )

    await migrations.upgrade_async(url, "0009")
    waiting_txids = await _scalars(url, "SELECT txid FROM events WHERE sequence IS NULL")
    numbered = await _scalars(url, _NUMBER)
    order = await _scalars(url, "SELECT sequence FROM events ORDER BY position")
    floor = await _scalars(url, "SELECT txid_floor FROM event_sequencer")
    again = await _scalars(url, _NUMBER)
    index_0009 = await _scalars(url, _QUEUE_INDEX)

    await migrations.downgrade_async(url, "0008")
    index_down = await _scalars(url, _QUEUE_INDEX)
    columns_down = await _scalars(url, _EVENT_COLUMNS)
    sequencer_down = await _scalars(url, _SEQUENCER_TABLE)
    # 0008's function again: it numbers without the column or the floor.
    await _scalars(url, "INSERT INTO events (id, type) SELECT gen_random_uuid(), 'after'")
    numbered_down = await _scalars(url, _NUMBER)

    assert waiting_txids == [0, 0, 0, 0]
    assert (numbered, again) == ([4], [0])
    assert order == [1, 2, 3, 4, 5, 6, 7]
    assert floor[0] > 0
    assert "(txid) WHERE (sequence IS NULL)" in index_0009[0]
    assert '("position") WHERE (sequence IS NULL)' in index_0008[0]
    assert (index_down, columns_down, sequencer_down) == (index_0008, columns_0008, [])
    assert numbered_down == [1]
