"""EventService with fakes: who may read events, the filter grammar, page
tokens, and a stream that follows new events."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from usersvc.domain.errors import InvalidArgument, PermissionDenied
from usersvc.domain.event_filter import format_event_filter, parse_event_filter
from usersvc.domain.events import (
    EventFilterField,
    EventQuery,
    StoredEvent,
    actor_of,
)
from usersvc.domain.models import ANONYMOUS, Principal, PrincipalKind
from usersvc.services.events import EventService

ADMIN = Principal(PrincipalKind.USER, str(uuid.uuid4()), frozenset({"user", "admin"}))
SERVICE = Principal(PrincipalKind.SERVICE, "billing", frozenset({"service"}))
PLAIN = Principal(PrincipalKind.USER, str(uuid.uuid4()), frozenset({"user"}))


def _event(sequence: int, type_: str = "usersvc.user.created.v1") -> StoredEvent:
    return StoredEvent(
        id=uuid.uuid4(),
        sequence=sequence,
        type=type_,
        user_id=uuid.uuid4(),
        actor="",
        request_id="",
        create_time=datetime(2026, 1, 1, tzinfo=UTC),
        user=None,
        changed_fields=(),
        attributes={},
    )


class FakeReader:
    """Events in memory; honours after_sequence, limit and type equality."""

    def __init__(self, events: list[StoredEvent]) -> None:
        self.events = events
        self.queries: list[EventQuery] = []

    async def list(self, query: EventQuery) -> list[StoredEvent]:
        self.queries.append(query)
        types = [t.value for t in query.filter.terms if t.field is EventFilterField.TYPE]
        found = [
            e
            for e in self.events
            if e.sequence > query.after_sequence and all(e.type == t for t in types)
        ]
        return found[: query.limit]


class FakeFeed:
    def __init__(self) -> None:
        self.latest = 0
        self.closed = False
        self._changed = asyncio.Event()

    def publish(self, top: int) -> None:
        self.latest = top
        self._changed.set()

    async def wait_beyond(self, sequence: int, seconds: float) -> None:
        if self.latest > sequence or self.closed:
            return
        self._changed.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._changed.wait()
        except TimeoutError:
            pass


@pytest.mark.parametrize("principal", [PLAIN, ANONYMOUS])
async def test_only_admins_and_services_may_list_events(principal: Principal) -> None:
    service = EventService(reader=FakeReader([]))
    with pytest.raises(PermissionDenied):
        await service.list_events(
            principal=principal, page_size=0, page_token="", filter="", after_sequence=0
        )
    with pytest.raises(PermissionDenied):
        await service.watch_events(principal=principal, after_sequence=0, filter="")


async def test_pages_follow_each_other_with_tokens_bound_to_their_query() -> None:
    reader = FakeReader([_event(n) for n in range(1, 6)])
    service = EventService(reader=reader)
    first = await service.list_events(
        principal=SERVICE, page_size=2, page_token="", filter="", after_sequence=0
    )
    assert [e.sequence for e in first.events] == [1, 2]
    token = first.next_page_token
    second = await service.list_events(
        principal=SERVICE, page_size=2, page_token=token, filter="", after_sequence=0
    )
    assert [e.sequence for e in second.events] == [3, 4]
    with pytest.raises(InvalidArgument) as refused:
        await service.list_events(
            principal=SERVICE,
            page_size=2,
            page_token=first.next_page_token,
            filter='type = "usersvc.user.created.v1"',
            after_sequence=0,
        )
    assert refused.value.violations[0].field == "page_token"
    token = second.next_page_token
    last = await service.list_events(
        principal=ADMIN, page_size=2, page_token=token, filter="", after_sequence=0
    )
    assert ([e.sequence for e in last.events], last.next_page_token) == ([5], "")


@pytest.mark.parametrize(
    ("page_size", "token", "after", "field"),
    [(-1, "", 0, "page_size"), (1001, "", 0, "page_size"), (0, "x!", 0, "page_token"),
     (0, "", -1, "after_sequence")],
)  # fmt: skip
async def test_bad_arguments_name_their_field(
    page_size: int, token: str, after: int, field: str
) -> None:
    service = EventService(reader=FakeReader([]))
    with pytest.raises(InvalidArgument) as refused:
        await service.list_events(
            principal=ADMIN, page_size=page_size, page_token=token, filter="", after_sequence=after
        )
    assert refused.value.violations[0].field == field


def test_the_filter_takes_the_four_fields_and_refuses_others() -> None:
    user_id = uuid.uuid4()
    parsed = parse_event_filter(
        f'type = "usersvc.user.deleted.v1" AND user_id = "{user_id}" AND actor : "service:"'
        ' AND create_time >= "2026-01-01T00:00:00+01:00"'
    )
    assert [(t.field.value, t.op) for t in parsed.terms] == [
        ("type", "="),
        ("user_id", "="),
        ("actor", ":"),
        ("create_time", ">="),
    ]
    assert parsed.terms[1].value == user_id
    assert parsed.terms[3].value == datetime(2025, 12, 31, 23, tzinfo=UTC)
    assert parse_event_filter(format_event_filter(parsed)) == parsed
    for bad in ('email = "x"', 'user_id = "nope"', 'create_time : "2026-01-01T00:00:00Z"',
                'type = "a" OR type = "b"', "type ="):  # fmt: skip
        with pytest.raises(InvalidArgument) as refused:
            parse_event_filter(bad)
        assert refused.value.violations[0].field == "filter"


def test_the_actor_names_users_services_and_nobody() -> None:
    assert actor_of(PLAIN) == PLAIN.subject
    assert actor_of(SERVICE) == "service:billing"
    assert actor_of(ANONYMOUS) == ""


async def test_a_stream_gives_the_backlog_then_events_numbered_later() -> None:
    reader = FakeReader([_event(1), _event(2)])
    feed = FakeFeed()
    feed.latest = 2
    service = EventService(reader=reader, feed=feed, poll_seconds=30)
    stream = await service.watch_events(principal=ADMIN, after_sequence=1, filter="")
    received = [await anext(stream)]
    following = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    reader.events.append(_event(3))
    feed.publish(3)
    received.append(await asyncio.wait_for(following, 5))
    assert [e.sequence for e in received] == [2, 3]
    feed.closed = True
    feed.publish(3)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 5)


async def test_a_filtered_stream_waits_instead_of_rereading_skipped_events() -> None:
    reader = FakeReader([_event(n, "usersvc.auth.login_succeeded.v1") for n in range(1, 4)])
    feed = FakeFeed()
    feed.latest = 3
    service = EventService(reader=reader, feed=feed, poll_seconds=30)
    stream = await service.watch_events(
        principal=ADMIN, after_sequence=0, filter='type = "usersvc.user.deleted.v1"'
    )
    pending = asyncio.ensure_future(anext(stream))
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(reader.queries) == 1
    reader.events.append(_event(4, "usersvc.user.deleted.v1"))
    feed.publish(4)
    event = await asyncio.wait_for(pending, 5)
    assert event.sequence == 4
    await stream.aclose()
