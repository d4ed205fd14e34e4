"""Numbering events without a NOTIFY in the writing transaction, against
PostgreSQL: the unit of work wakes the sequencer after commits that wrote
events (usersvc.adapters.event_wakeup), the feeds of other processes learn
of the numbers, and the poll covers a wake-up that never came. The feeds
here poll once a minute, so only a wake-up can deliver in time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.users import patch_user
from usersvc.adapters.event_feed import PostgresEventFeed
from usersvc.adapters.event_wakeup import SequencerWakeup, notify_through
from usersvc.adapters.events import SqlAlchemyEventReader, sequence_pending, with_events
from usersvc.adapters.orm import users_table
from usersvc.adapters.repository.user_rows import USER_COLUMNS, user_from_row
from usersvc.adapters.revocations import asyncpg_connector
from usersvc.adapters.unit_of_work import make_session_factory, make_uow_factory
from usersvc.adapters.write_lane import SqlAlchemyUserWriter
from usersvc.config import Settings
from usersvc.domain.event_filter import parse_event_filter
from usersvc.domain.events import CallContext, EventDraft, EventQuery, EventType
from usersvc.domain.models import User, UserPatch
from usersvc.domain.ports import UnitOfWorkFactory, UserUpdate

UserMaker = Callable[..., Awaitable[User]]
FeedMaker = Callable[..., Awaitable[PostgresEventFeed]]
# Far beyond what the tests wait: only a wake-up numbers events in time.
NEVER_POLL = 60.0
# How long a wake-up may take on a loaded machine (the poll would take 60 s).
DELIVERED_WITHIN = 10.0
UPDATED = [EventDraft(EventType.USER_UPDATED, changed_fields=("display_name",))]


@pytest.fixture
async def make_feed(
    database_url: str, test_settings: Settings, engine: AsyncEngine
) -> AsyncIterator[FeedMaker]:
    """Started feeds, each on a connection of its own, listening before
    the test goes on; stopped after it."""
    feeds: list[PostgresEventFeed] = []
    # Start from nothing to number: a feed numbers what is pending when it
    # connects, which would hide whether a wake-up came.
    while await sequence_pending(engine):
        pass

    async def make(poll_interval: float = NEVER_POLL) -> PostgresEventFeed:
        feed = PostgresEventFeed(
            asyncpg_connector(database_url, test_settings), poll_interval=poll_interval
        )
        feeds.append(feed)
        await feed.start()
        assert await feed.wait_listening(DELIVERED_WITHIN)
        return feed

    yield make
    for feed in feeds:
        await feed.stop()


async def _rename(uow_factory: UnitOfWorkFactory, user: User, name: str) -> None:
    async with uow_factory() as uow:
        await patch_user(uow, user.id, UserPatch(display_name=name), events=UPDATED)
        await uow.commit()


async def _numbered_after(feed: PostgresEventFeed, top: int) -> float:
    """Seconds until ``feed`` knows of a number above ``top``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await feed.wait_beyond(top, DELIVERED_WITHIN)
    assert feed.latest > top, f"nothing numbered above {top} in {DELIVERED_WITHIN} s"
    return loop.time() - started


async def test_a_commit_with_events_wakes_once_and_one_without_events_or_rolled_back_never(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    woken: list[None] = []
    uow_factory = make_uow_factory(engine, events_committed=lambda: woken.append(None))

    async with uow_factory() as uow:  # rolled back: nothing to number
        await patch_user(uow, user.id, UserPatch(display_name="a"), events=UPDATED)
    async with uow_factory() as uow:  # committed without events
        await patch_user(uow, user.id, UserPatch(display_name="b"))
        await uow.commit()
    async with uow_factory() as uow:  # rolled back, then committed without events
        await patch_user(uow, user.id, UserPatch(display_name="c"), events=UPDATED)
        await uow.rollback()
        await patch_user(uow, user.id, UserPatch(display_name="d"))
        await uow.commit()
    assert woken == []

    async with uow_factory() as uow:
        await patch_user(uow, user.id, UserPatch(display_name="e"), events=UPDATED)
        await patch_user(uow, user.id, UserPatch(display_name="f"), events=UPDATED)
        await uow.commit()
    assert woken == [None]


async def test_an_update_on_the_write_lane_wakes_once_it_wrote_its_event_and_never_when_refused(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    woken: list[None] = []
    writer = SqlAlchemyUserWriter(engine, events_committed=lambda: woken.append(None))
    stale = UserUpdate(user.id, UserPatch(display_name="a"), expected_version=user.version + 7)
    fresh = UserUpdate(user.id, UserPatch(display_name="b"), expected_version=user.version)

    refused = await writer.update(stale, events=[EventDraft(EventType.USER_UPDATED)])
    assert (refused.after, woken) == (None, [])

    written = await writer.update(fresh, events=[EventDraft(EventType.USER_UPDATED)])
    assert written.after is not None
    assert woken == [None]


async def test_an_event_committed_by_a_process_without_a_feed_reaches_another_feed_at_once(
    engine: AsyncEngine, make_user: UserMaker, make_feed: FeedMaker
) -> None:
    user = await make_user()
    elsewhere = await make_feed()
    top = elsewhere.latest
    # A process that runs no feed (a command such as create-admin).
    wakeup = SequencerWakeup(notify=notify_through(engine))
    uow_factory = make_uow_factory(engine, events_committed=wakeup.events_committed)
    try:
        await _rename(uow_factory, user, "Ada")
        await _numbered_after(elsewhere, top)
    finally:
        await wakeup.aclose()

    assert wakeup.notifications == 1
    [event] = await SqlAlchemyEventReader(engine).list(EventQuery(parse_event_filter(""), top, 10))
    assert (event.type, event.user_id) == (EventType.USER_UPDATED.value, user.id)


async def test_an_event_numbered_by_this_process_wakes_a_reader_on_another_replica(
    engine: AsyncEngine, make_user: UserMaker, make_feed: FeedMaker
) -> None:
    user = await make_user()
    here, replica = await make_feed(), await make_feed()
    top = replica.latest
    wakeup = SequencerWakeup(feed=here, notify=notify_through(engine))
    uow_factory = make_uow_factory(engine, events_committed=wakeup.events_committed)
    try:
        await _rename(uow_factory, user, "Ada")
        # A WatchEvents stream on the replica waits exactly so.
        await _numbered_after(replica, top)
        await _numbered_after(here, top)
    finally:
        await wakeup.aclose()

    assert here.latest == replica.latest == top + 1
    assert wakeup.notifications == 0  # this process's feed was woken directly


async def test_an_event_whose_wake_up_was_lost_is_numbered_by_the_poll(
    engine: AsyncEngine, make_user: UserMaker, make_feed: FeedMaker
) -> None:
    user = await make_user()
    feed = await make_feed(poll_interval=0.2)
    top = feed.latest
    silent = make_uow_factory(engine)  # wakes nobody: the signal is lost

    await _rename(silent, user, "Ada")
    await _numbered_after(feed, top)

    assert feed.latest == top + 1


async def test_each_draft_of_a_write_is_recorded_in_order_with_its_fields_and_the_user(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    drafts = [
        EventDraft(EventType.USER_UPDATED, changed_fields=("display_name", "labels")),
        EventDraft(EventType.USER_DISABLED, attributes={"reason": 'it\'s "quoted" \\ \u00e9'}),
    ]
    context = CallContext(actor="service:billing", request_id="req-7")
    u = users_table.c
    async with make_session_factory(engine)() as session, session.begin():
        write = (
            update(users_table)
            .where(u.id == user.id)
            .values(display_name="Ada", version=u.version + 1)
            .returning(*USER_COLUMNS)
        )
        [row] = (await session.execute(with_events(write, drafts, context))).mappings().all()
    while await sequence_pending(engine):
        pass
    events = await SqlAlchemyEventReader(engine).list(EventQuery(parse_event_filter(""), 0, 10))

    changed = user_from_row(row)
    assert [(e.type, e.changed_fields, e.attributes) for e in events] == [
        (EventType.USER_UPDATED.value, ("display_name", "labels"), {}),
        (EventType.USER_DISABLED.value, (), {"reason": 'it\'s "quoted" \\ \u00e9'}),
    ]
    assert {(e.actor, e.request_id, e.user_id) for e in events} == {
        ("service:billing", "req-7", user.id)
    }
    assert [e.user for e in events] == [changed, changed]


async def test_a_snapshot_is_refused_for_a_write_that_does_not_return_the_user() -> None:
    write = update(users_table).values(display_name="x").returning(users_table.c.id)

    with pytest.raises(ValueError, match="every user column"):
        with_events(write, UPDATED, CallContext())
