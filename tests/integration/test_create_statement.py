"""CreateUser's one statement on the write lane
(usersvc.adapters.repository.user_create, usersvc.adapters.write_lane)
against PostgreSQL: it stores the same user and event as the repository's
insert through a unit of work, a taken email writes neither, and a
privileged caller's pending role re-check is settled by the statement,
which writes nothing when it fails."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.conftest import NewUserFactory
from usersvc.adapters.orm import events_table, users_table
from usersvc.adapters.write_lane import SqlAlchemyUserWriter
from usersvc.domain.errors import EmailAlreadyExists, TokenRevoked
from usersvc.domain.events import CallContext, EventDraft, EventType
from usersvc.domain.models import Principal, PrincipalKind
from usersvc.domain.ports import UnitOfWorkFactory
from usersvc.domain.role_checks import RoleCheck

CREATED = (EventDraft(EventType.USER_CREATED),)
CALL = CallContext(actor="actor-1", request_id="req-1")


@pytest.fixture
def uow_with_call(engine: AsyncEngine) -> UnitOfWorkFactory:
    from usersvc.adapters.unit_of_work import make_uow_factory

    return make_uow_factory(engine, call_context=lambda: CALL)


async def events_of(engine: AsyncEngine, user_id: uuid.UUID) -> list[Any]:
    async with engine.connect() as connection:
        result = await connection.execute(
            select(events_table)
            .where(events_table.c.user_id == user_id)
            .order_by(events_table.c.position)
        )
        return list(result.mappings().all())


async def rows_with_email(engine: AsyncEngine, email: str) -> int:
    async with engine.connect() as connection:
        count = await connection.scalar(
            select(func.count()).where(func.lower(users_table.c.email) == email.lower())
        )
        return int(count or 0)


async def test_the_lane_stores_the_user_and_its_event_as_the_unit_of_work_does(
    engine: AsyncEngine, uow_with_call: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    writer = SqlAlchemyUserWriter(engine, call_context=lambda: CALL)
    laned = await writer.create(
        new_user(display_name="Ada", roles=("user", "admin"), labels={"team": "core"}),
        events=CREATED,
    )
    async with uow_with_call() as uow:
        through_uow = await uow.users.add(
            new_user(display_name="Ada", roles=("user", "admin"), labels={"team": "core"}),
            events=CREATED,
        )
        await uow.commit()
        stored = await uow.users.get(laned.id)

    assert stored == laned
    assert (laned.display_name, laned.roles, dict(laned.labels)) == (
        "Ada",
        ("user", "admin"),
        {"team": "core"},
    )
    assert (laned.version, laned.email_verified, laned.delete_time) == (
        through_uow.version,
        False,
        None,
    )
    [event] = await events_of(engine, laned.id)
    [reference] = await events_of(engine, through_uow.id)
    assert (event["type"], event["actor"], event["request_id"]) == (
        EventType.USER_CREATED.value,
        "actor-1",
        "req-1",
    )
    snapshot = dict(event["user_snapshot"])
    assert snapshot.keys() == dict(reference["user_snapshot"]).keys()
    assert "password_hash" not in snapshot
    assert snapshot["email"] == laned.email


async def test_a_taken_email_in_any_case_writes_no_user_and_no_event(
    engine: AsyncEngine, new_user: NewUserFactory
) -> None:
    writer = SqlAlchemyUserWriter(engine, call_context=lambda: CALL)
    first = await writer.create(new_user(email="taken@example.com"), events=CREATED)

    with pytest.raises(EmailAlreadyExists) as raised:
        await writer.create(new_user(email="TAKEN@example.com"), events=CREATED)

    assert raised.value.metadata["email"] == "TAKEN@example.com"
    assert await rows_with_email(engine, "taken@example.com") == 1
    async with engine.connect() as connection:
        events = await connection.scalar(select(func.count()).select_from(events_table))
    assert events == 1
    assert len(await events_of(engine, first.id)) == 1


async def test_a_create_wakes_the_sequencer_once_it_wrote_and_never_when_the_email_is_taken(
    engine: AsyncEngine, new_user: NewUserFactory
) -> None:
    woken: list[None] = []
    writer = SqlAlchemyUserWriter(engine, events_committed=lambda: woken.append(None))
    await writer.create(new_user(email="once@example.com"), events=CREATED)
    assert woken == [None]

    with pytest.raises(EmailAlreadyExists):
        await writer.create(new_user(email="once@example.com"), events=CREATED)
    assert woken == [None]


async def test_a_create_without_events_writes_none_and_wakes_nobody(
    engine: AsyncEngine, new_user: NewUserFactory
) -> None:
    woken: list[None] = []
    writer = SqlAlchemyUserWriter(engine, events_committed=lambda: woken.append(None))
    user = await writer.create(new_user())

    assert await events_of(engine, user.id) == []
    assert woken == []


async def test_a_pending_role_check_that_passes_is_settled_by_the_create_itself(
    engine: AsyncEngine, new_user: NewUserFactory
) -> None:
    writer = SqlAlchemyUserWriter(engine)
    admin = await writer.create(new_user(roles=("user", "admin")))
    check = RoleCheck.of(admin_principal(admin.id))

    created = await writer.create(new_user(email="made@example.com"), role_check=check)

    assert check.passed is True
    assert await rows_with_email(engine, created.email) == 1


@pytest.mark.parametrize(
    "stored",
    [
        "UPDATE users SET roles = ARRAY['user'] WHERE id = :id",
        "UPDATE users SET disable_time = now() WHERE id = :id",
        "UPDATE users SET delete_time = now() WHERE id = :id",
        "DELETE FROM users WHERE id = :id",
    ],
)
async def test_a_pending_role_check_that_fails_writes_no_user_and_no_event(
    engine: AsyncEngine, new_user: NewUserFactory, stored: str
) -> None:
    writer = SqlAlchemyUserWriter(engine)
    admin = await writer.create(new_user(roles=("user", "admin")))
    async with engine.begin() as connection:
        await connection.execute(text(stored), {"id": admin.id})
    check = RoleCheck.of(admin_principal(admin.id))

    with pytest.raises(TokenRevoked):
        await writer.create(new_user(email="refused@example.com"), events=CREATED, role_check=check)

    assert check.passed is False
    assert await rows_with_email(engine, "refused@example.com") == 0
    async with engine.connect() as connection:
        events = await connection.scalar(select(func.count()).select_from(events_table))
    assert events == 0


async def test_a_settled_role_check_is_not_read_again(
    engine: AsyncEngine, new_user: NewUserFactory
) -> None:
    writer = SqlAlchemyUserWriter(engine)
    check = RoleCheck.of(admin_principal(uuid.uuid4()))
    check.passed = True  # settled earlier in the call; the account is not read again

    created = await writer.create(new_user(), role_check=check)

    assert await rows_with_email(engine, created.email) == 1


def admin_principal(user_id: uuid.UUID) -> Principal:
    return Principal(
        kind=PrincipalKind.USER,
        subject=str(user_id),
        roles=frozenset({"user", "admin"}),
    )
