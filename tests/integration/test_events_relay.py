"""The relay against PostgreSQL and private NATS JetStream servers: in order,
with the CloudEvents headers, marked only after the PubAck, pipelined (a
window of publishes awaiting their PubAcks), surviving NATS outages, even
with a window in flight, one publisher across replicas."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats_servers import PrivateNats
from sqlalchemy import func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc_protos.v1 import event_service_pb2
from usersvc.adapters.event_feed import PostgresEventFeed
from usersvc.adapters.events import PUBLISHED_THROUGH, SqlAlchemyEventRecorder, sequence_pending
from usersvc.adapters.nats_relay import NatsEventRelay, RelayHooks
from usersvc.adapters.orm import events_table
from usersvc.adapters.revocations import asyncpg_connector
from usersvc.adapters.unit_of_work import make_session_factory
from usersvc.bootstrap_events import build_event_parts, encode_event
from usersvc.config import Settings
from usersvc.domain.events import CallContext, EventDraft, EventType
from usersvc.domain.models import User

UserMaker = Callable[..., Awaitable[User]]
STREAM = "USERSVC_EVENTS"
WAIT_SECONDS = 20.0


@pytest.fixture
async def private_nats(tmp_path: Path) -> AsyncIterator[PrivateNats]:
    server = PrivateNats(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _relay(
    engine: AsyncEngine, settings: Settings, database_url: str, nats_url: str, **kw: Any
) -> NatsEventRelay:
    return NatsEventRelay(
        engine=engine,
        connect=asyncpg_connector(database_url, settings),
        nats_url=nats_url,
        stream=STREAM,
        source="usersvc-test",
        encode=encode_event,
        poll_interval=0.1,
        lock_retry=0.2,
        **kw,
    )


async def _publish_all(relay: NatsEventRelay, engine: AsyncEngine) -> None:
    """Run ``relay`` until every numbered event is marked published."""
    await relay.start()
    try:
        await _until(lambda: _none_unpublished(engine), "rows marked published")
    finally:
        await relay.stop()


async def _write_events(engine: AsyncEngine, user: User, count: int) -> None:
    sessions = make_session_factory(engine)
    for index in range(count):
        async with sessions() as session, session.begin():
            await SqlAlchemyEventRecorder(
                session, lambda i=index: CallContext(actor="service:t", request_id=f"r{i}")
            ).add(user.id, [EventDraft(EventType.USER_UPDATED, changed_fields=("labels",))])
    while await sequence_pending(engine):
        pass


async def _write_many_events(engine: AsyncEngine, count: int) -> None:
    """``count`` numbered events about nobody, written in one statement."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO events (id, type, attributes) "
                "SELECT gen_random_uuid(), 'usersvc.auth.login_failed.v1', "
                '\'{"cause": "unknown_email"}\' FROM generate_series(1, :n)'
            ),
            {"n": count},
        )
    while await sequence_pending(engine):
        pass


async def _unpublished(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        # Unnumbered, or numbered after the relay's mark.
        count = await conn.scalar(
            select(func.count()).where(
                or_(events_table.c.sequence.is_(None), events_table.c.sequence > PUBLISHED_THROUGH)
            )
        )
    return int(count or 0)


async def _until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _received(nats_url: str, count: int) -> list[Any]:
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        sub = await js.subscribe("usersvc.>", stream=STREAM, ordered_consumer=True)
        try:
            return [await sub.next_msg(timeout=WAIT_SECONDS) for _ in range(count)]
        finally:
            await sub.unsubscribe()  # also ends the consumer's heartbeat task
    finally:
        await client.close()


async def test_events_are_published_in_order_with_cloudevents_headers(
    engine: AsyncEngine,
    test_settings: Settings,
    database_url: str,
    make_user: UserMaker,
    private_nats: PrivateNats,
) -> None:
    user = await make_user()
    await _write_events(engine, user, 25)
    lags: list[float] = []
    backlogs: list[int] = []
    hooks = RelayHooks(on_published=lags.append, on_backlog=backlogs.append)
    relay = _relay(engine, test_settings, database_url, private_nats.url, hooks=hooks)
    await relay.start()
    try:
        await _until(lambda: _none_unpublished(engine), "rows marked published")
        messages = await _received(private_nats.url, 25)
    finally:
        await relay.stop()
    events = [event_service_pb2.Event.FromString(m.data) for m in messages]
    assert [e.sequence for e in events] == list(range(1, 26))
    assert [e.request_id for e in events] == [f"r{i}" for i in range(25)]
    first, headers = events[0], messages[0].headers
    assert messages[0].subject == "usersvc.user.updated.v1"
    assert headers["Nats-Msg-Id"] == headers["ce-id"] == first.id
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-type"] == "usersvc.user.updated.v1"
    assert headers["ce-source"] == "usersvc-test"
    assert headers["ce-subject"] == str(user.id)
    assert headers["ce-sequence"] == "1"
    assert headers["ce-time"].endswith("Z")
    assert headers["content-type"] == "application/protobuf"
    assert first.user.id == str(user.id)
    assert list(first.changed_fields) == ["labels"]
    # What metrics hear: one lag per PubAck, and the backlog it started from.
    assert len(lags) == 25
    assert all(lag >= 0 for lag in lags)
    assert backlogs[0] == 25


async def _none_unpublished(engine: AsyncEngine) -> bool:
    return await _unpublished(engine) == 0


async def test_events_wait_while_nats_is_down_and_go_out_in_order_after(
    engine: AsyncEngine,
    test_settings: Settings,
    database_url: str,
    make_user: UserMaker,
    private_nats: PrivateNats,
) -> None:
    user = await make_user()
    private_nats.stop()
    relay = _relay(engine, test_settings, database_url, private_nats.url, backoff_max=0.5)
    await relay.start()
    try:
        await _write_events(engine, user, 10)
        await _until(lambda: _errors_seen(relay), "a failed publish attempt")
        assert await _unpublished(engine) == 10
        private_nats.start()
        await _until(lambda: _none_unpublished(engine), "rows marked published")
        messages = await _received(private_nats.url, 10)
    finally:
        await relay.stop()
    assert [event_service_pb2.Event.FromString(m.data).sequence for m in messages] == list(
        range(1, 11)
    )


async def _errors_seen(relay: NatsEventRelay) -> bool:
    return relay.stats.errors > 0


async def _whole_stream(nats_url: str) -> list[Any]:
    """Every message on the stream, duplicates included, in stream order."""
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        stored = (await js.stream_info(STREAM)).state.messages
    finally:
        await client.close()
    return await _received(nats_url, stored)


async def test_publishes_are_pipelined_up_to_the_window(
    engine: AsyncEngine,
    test_settings: Settings,
    database_url: str,
    private_nats: PrivateNats,
) -> None:
    await _write_many_events(engine, 300)
    relay = _relay(engine, test_settings, database_url, private_nats.url, window=50)
    await _publish_all(relay, engine)
    # More than one publish awaited its PubAck at a time, never more than
    # the window; all 300 went out in order.
    assert 1 < relay.stats.peak_in_flight <= 50
    assert relay.stats.published == 300
    messages = await _received(private_nats.url, 300)
    assert [event_service_pb2.Event.FromString(m.data).sequence for m in messages] == list(
        range(1, 301)
    )


async def test_the_composed_relay_takes_its_window_and_timeout_from_the_settings(
    engine: AsyncEngine,
    test_settings: Settings,
    database_url: str,
    private_nats: PrivateNats,
) -> None:
    # USERSVC_EVENT_PUBLISH_WINDOW=8: the relay the composition root builds
    # keeps at most 8 publishes awaiting their PubAck (the default, 256,
    # would send these 300 in one go).
    settings = dataclasses.replace(
        test_settings,
        nats_url=private_nats.url,
        nats_stream=STREAM,
        event_publish_window=8,
        event_publish_timeout_seconds=5.0,
    )
    await _write_many_events(engine, 300)
    relay = build_event_parts(settings, engine, database_url).relay
    assert relay is not None
    await _publish_all(relay, engine)
    assert 1 < relay.stats.peak_in_flight <= 8
    assert relay.stats.published == 300
    assert relay.publish_timeout == 5.0


async def test_nats_killed_with_a_window_in_flight_loses_nothing_and_keeps_order(
    engine: AsyncEngine,
    test_settings: Settings,
    database_url: str,
    private_nats: PrivateNats,
) -> None:
    total = 3000
    await _write_many_events(engine, total)
    published_when_killed: list[int] = []
    relay: NatsEventRelay

    def kill_nats_once(_lag: float) -> None:
        # Called by the relay for each PubAck, in order: at the 1000th its
        # window holds the publishes sent after it, unacknowledged.
        if relay.stats.published == 999 and not published_when_killed:
            published_when_killed.append(relay.stats.published)
            private_nats.kill()

    relay = _relay(
        engine,
        test_settings,
        database_url,
        private_nats.url,
        backoff_max=0.5,
        hooks=RelayHooks(on_published=kill_nats_once),
    )
    await relay.start()
    try:
        await _until(lambda: _errors_seen(relay), "the failure of the window")
        # Marked: at least up to the PubAck that killed NATS, never an
        # event that had none.
        async with engine.connect() as conn:
            marked = await conn.scalar(select(PUBLISHED_THROUGH))
        assert 1000 <= marked <= relay.stats.published < total
        private_nats.start()
        await _until(lambda: _none_unpublished(engine), "rows marked published")
    finally:
        await relay.stop()
    assert published_when_killed == [999]
    assert relay.stats.peak_in_flight > 1
    messages = await _whole_stream(private_nats.url)
    first_seen: dict[str, int] = {}
    for message in messages:
        event = event_service_pb2.Event.FromString(message.data)
        assert message.headers["Nats-Msg-Id"] == event.id
        # A duplicate repeats an event with its own sequence, never another's.
        assert first_seen.setdefault(event.id, event.sequence) == event.sequence
    # Once de-duplicated: every event, in sequence order.
    assert list(first_seen.values()) == list(range(1, total + 1))


async def test_another_publisher_on_the_stream_neither_reorders_nor_fails_the_relay(
    engine: AsyncEngine,
    test_settings: Settings,
    database_url: str,
    private_nats: PrivateNats,
) -> None:
    total = 2000
    await _write_many_events(engine, total)
    other = await nats.connect(private_nats.url)
    interjections: list[asyncio.Task[None]] = []

    async def interject(n: int) -> None:
        await other.publish("usersvc.other.v1", b"not ours", headers={"Nats-Msg-Id": f"other-{n}"})

    def interject_now_and_then(_lag: float) -> None:
        # Mid-window (hundreds of the relay's publishes are outstanding),
        # something else stores a message in the stream.
        if relay.stats.published in (300, 900, 1500):
            interjections.append(asyncio.ensure_future(interject(relay.stats.published)))

    relay = _relay(
        engine,
        test_settings,
        database_url,
        private_nats.url,
        hooks=RelayHooks(on_published=interject_now_and_then),
    )
    try:
        await _publish_all(relay, engine)
        await asyncio.gather(*interjections)
    finally:
        await other.close()
    # The publishes behind an interjection were refused (their expected last
    # message was no longer last) and sent again at once: no error, no
    # outage, and the relay's events are on the stream in sequence order.
    assert len(interjections) == 3
    assert relay.stats.restarts >= 1
    assert relay.stats.errors == 0
    messages = await _whole_stream(private_nats.url)
    assert sum(1 for m in messages if m.subject == "usersvc.other.v1") == 3
    first_seen: dict[str, int] = {}
    for message in messages:
        if message.subject != "usersvc.other.v1":
            event = event_service_pb2.Event.FromString(message.data)
            first_seen.setdefault(event.id, event.sequence)
    assert list(first_seen.values()) == list(range(1, total + 1))


async def test_one_replica_publishes_and_another_takes_over_when_it_stops(
    engine: AsyncEngine,
    test_settings: Settings,
    database_url: str,
    make_user: UserMaker,
    private_nats: PrivateNats,
) -> None:
    user = await make_user()
    first = _relay(engine, test_settings, database_url, private_nats.url)
    second = _relay(engine, test_settings, database_url, private_nats.url)
    await first.start()

    async def first_publishes() -> bool:
        return first.stats.is_publisher

    await _until(first_publishes, "the first relay to take the lock")
    await second.start()
    try:
        await _write_events(engine, user, 5)
        await _until(lambda: _none_unpublished(engine), "the first batch")
        assert (first.stats.published, second.stats.published) == (5, 0)
        await first.stop()

        async def second_publishes() -> bool:
            return second.stats.is_publisher

        await _until(second_publishes, "the second relay to take over")
        await _write_events(engine, user, 5)
        await _until(lambda: _none_unpublished(engine), "the second batch")
    finally:
        await first.stop()
        await second.stop()
    assert second.stats.published == 5
    messages = await _received(private_nats.url, 10)
    ids = [event_service_pb2.Event.FromString(m.data).id for m in messages]
    assert len(set(ids)) == 10
    assert [event_service_pb2.Event.FromString(m.data).sequence for m in messages] == list(
        range(1, 11)
    )


async def test_the_feed_numbers_new_events_and_wakes_waiters(
    engine: AsyncEngine, test_settings: Settings, database_url: str, make_user: UserMaker
) -> None:
    user = await make_user()
    feed = PostgresEventFeed(asyncpg_connector(database_url, test_settings))
    await feed.start()
    try:
        start = asyncio.get_running_loop().time()
        sessions = make_session_factory(engine)
        async with sessions() as session, session.begin():
            await SqlAlchemyEventRecorder(session).add(
                user.id, [EventDraft(EventType.USER_DISABLED)]
            )
        await feed.wait_beyond(0, 5.0)
        assert feed.latest == 1
        assert asyncio.get_running_loop().time() - start < 5.0
    finally:
        await feed.stop()
