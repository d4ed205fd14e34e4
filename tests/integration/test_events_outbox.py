"""The events table against PostgreSQL: written in the change's statement and
transaction, numbered without gaps for readers, filtered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.users import patch_user
from usersvc.adapters.events import (
    SEQUENCER_LOCK_KEY,
    SqlAlchemyEventReader,
    SqlAlchemyEventRecorder,
    sequence_pending,
    with_events,
)
from usersvc.adapters.orm import events_table, users_table
from usersvc.adapters.repository.user_rows import USER_COLUMNS
from usersvc.adapters.unit_of_work import make_session_factory
from usersvc.domain.event_filter import parse_event_filter
from usersvc.domain.events import CallContext, EventDraft, EventQuery, EventType
from usersvc.domain.models import User
from usersvc.domain.ports import UnitOfWorkFactory

UserMaker = Callable[..., Awaitable[User]]

_u = users_table.c
# The columns the repository returns for a user, so the snapshot follows them.
_USER_COLUMNS = USER_COLUMNS


def _rename(user_id: uuid.UUID, name: str) -> object:
    return (
        update(users_table)
        .where(_u.id == user_id)
        .values(display_name=name, version=_u.version + 1)
        .returning(*_USER_COLUMNS)
    )


async def _all_events(engine: AsyncEngine) -> list[object]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(events_table))).mappings().all())


async def _list(engine: AsyncEngine, after: int = 0, flt: str = "") -> list[object]:
    reader = SqlAlchemyEventReader(engine)
    return list(await reader.list(EventQuery(parse_event_filter(flt), after, 1000)))


async def test_an_update_writes_its_event_in_the_same_statement(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user: User = await make_user()
    context = CallContext(actor="service:billing", request_id="req-1")
    draft = EventDraft(EventType.USER_UPDATED, changed_fields=("display_name",))
    async with make_session_factory(engine)() as session, session.begin():
        stmt = with_events(
            update(users_table)
            .where(_u.id == user.id)
            .values(display_name="Ada", version=_u.version + 1)
            .returning(*_USER_COLUMNS),
            [draft],
            context,
        )
        rows = (await session.execute(stmt)).mappings().all()
    assert [row["display_name"] for row in rows] == ["Ada"]
    await sequence_pending(engine)  # (a running server may number it first)
    [event] = await _list(engine)
    assert event.type == EventType.USER_UPDATED.value
    assert event.user_id == user.id
    assert event.actor == "service:billing"
    assert event.request_id == "req-1"
    assert event.changed_fields == ("display_name",)
    assert event.user is not None
    assert event.user.display_name == "Ada"
    assert event.user.version == user.version + 1
    assert event.user.email == user.email


async def test_a_rolled_back_change_leaves_no_event(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    draft = EventDraft(EventType.USER_UPDATED, changed_fields=("display_name",))
    async with make_session_factory(engine)() as session, session.begin():
        await session.execute(with_events(_rename(user.id, "Bob"), [draft], CallContext()))
        await session.rollback()
    assert await _all_events(engine) == []
    async with engine.connect() as conn:
        name = await conn.scalar(select(_u.display_name).where(_u.id == user.id))
    assert name == user.display_name


async def test_a_transaction_committing_late_is_numbered_after_those_before_it(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    early, late = await make_user(), await make_user()
    sessions = make_session_factory(engine)
    draft = [EventDraft(EventType.USER_UPDATED, changed_fields=("display_name",))]
    async with sessions() as held:
        # Starts first and writes its event first, but commits last.
        await held.begin()
        await held.execute(with_events(_rename(early.id, "early"), draft, CallContext()))
        async with sessions() as quick, quick.begin():
            await quick.execute(with_events(_rename(late.id, "late"), draft, CallContext()))
        await sequence_pending(engine)  # (a running server may number it first)
        seen = await _list(engine)
        assert [(e.sequence, e.user_id) for e in seen] == [(1, late.id)]
        await held.commit()
    await sequence_pending(engine)  # (a running server may number it first)
    resumed = await _list(engine, after=seen[-1].sequence)
    assert [(e.sequence, e.user_id) for e in resumed] == [(2, early.id)]


async def test_concurrent_sequencers_number_every_event_once_without_gaps(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    users = [await make_user() for _ in range(5)]
    recorder_sessions = make_session_factory(engine)
    for user in users:
        for _ in range(20):
            async with recorder_sessions() as session, session.begin():
                await SqlAlchemyEventRecorder(session).add(
                    user.id, [EventDraft(EventType.LOGIN_SUCCEEDED)]
                )
    counts = await asyncio.gather(*(sequence_pending(engine, batch=7) for _ in range(6)))
    while await sequence_pending(engine, batch=7):
        pass
    assert sum(counts) <= 100
    events = await _list(engine)
    assert [e.sequence for e in events] == list(range(1, 101))


async def test_a_failed_login_names_the_cause_and_never_stores_the_email(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user(email="locked@example.com")
    async with make_session_factory(engine)() as session, session.begin():
        recorder = SqlAlchemyEventRecorder(session, lambda: CallContext(request_id="r"))
        await recorder.add_login_failure("LOCKED@example.com")
        await recorder.add_login_failure("nobody@example.com")
    await sequence_pending(engine)
    first, second = await _list(engine)
    assert (first.user_id, first.attributes) == (user.id, {"cause": "locked"})
    assert first.user is not None
    assert first.user.email == user.email
    assert (second.user_id, second.user, second.attributes) == (
        None,
        None,
        {"cause": "unknown_email"},
    )
    async with engine.connect() as conn:
        stored = await conn.scalar(
            text("SELECT count(*) FROM events WHERE CAST(events AS text) LIKE '%nobody%'")
        )
    assert stored == 0


async def test_unnumbered_events_are_invisible_to_readers(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    async with engine.connect() as holder:
        # Every sequencer (a running server's too) waits for this lock.
        await holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SEQUENCER_LOCK_KEY})
        try:
            async with make_session_factory(engine)() as session, session.begin():
                recorder = SqlAlchemyEventRecorder(session)
                await recorder.add(user.id, [EventDraft(EventType.USER_ENABLED)])
            assert await _list(engine) == []
        finally:
            await holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SEQUENCER_LOCK_KEY})
            await holder.commit()
    await sequence_pending(engine)
    assert len(await _list(engine)) == 1


async def test_the_filter_selects_by_type_user_actor_and_time(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    one, two = await make_user(), await make_user()
    sessions = make_session_factory(engine)
    async with sessions() as session, session.begin():
        recorder = SqlAlchemyEventRecorder(session, lambda: CallContext(actor="service:x"))
        await recorder.add(one.id, [EventDraft(EventType.USER_DELETED)])
        await recorder.add(two.id, [EventDraft(EventType.USER_DISABLED)])
    async with sessions() as session, session.begin():
        await SqlAlchemyEventRecorder(session).add(one.id, [EventDraft(EventType.USER_ENABLED)])
    await sequence_pending(engine)
    deleted = await _list(engine, flt='type = "usersvc.user.deleted.v1"')
    assert [e.user_id for e in deleted] == [one.id]
    about_one = await _list(engine, flt=f'user_id = "{one.id}"')
    assert [e.type for e in about_one] == [
        EventType.USER_DELETED.value,
        EventType.USER_ENABLED.value,
    ]
    by_service = await _list(engine, flt='actor = "service:x" AND type : "disabled"')
    assert [e.user_id for e in by_service] == [two.id]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert await _list(engine, flt=f'create_time > "{future}"') == []
    assert len(await _list(engine, flt=f'create_time < "{future}"')) == 3
    async with engine.connect() as conn:
        top = await conn.scalar(select(func.max(events_table.c.sequence)))
    assert top == 3


async def test_a_change_that_fails_leaves_no_event_and_one_that_commits_leaves_one(
    engine: AsyncEngine, make_user: UserMaker, uow_factory: UnitOfWorkFactory
) -> None:
    from usersvc.domain.errors import EmailAlreadyExists
    from usersvc.domain.models import UserPatch

    taken, user = await make_user(), await make_user()
    draft = [EventDraft(EventType.USER_UPDATED, changed_fields=("email",))]

    async def clash() -> None:
        async with uow_factory() as uow:
            await patch_user(uow, user.id, UserPatch(email=taken.email), events=draft)
            await uow.commit()

    with pytest.raises(EmailAlreadyExists):
        await clash()
    async with uow_factory() as uow:
        await patch_user(uow, user.id, UserPatch(display_name="Kept"), events=draft)
        # Rolled back: the unit of work ends without a commit.
    assert await _all_events(engine) == []
    async with uow_factory() as uow:
        updated = await patch_user(uow, user.id, UserPatch(display_name="Kept"), events=draft)
        await uow.commit()
    await sequence_pending(engine)
    [event] = await _list(engine)
    assert (event.user_id, event.user) == (user.id, updated)
