"""BatchGetUsers past 4 MiB on the read lane: PostgreSQL sums the users'
sizes before it sends them, so a request it must refuse reads their sizes
(a few bytes a user), not the users (21 KB each with the largest labels),
in the same one statement.
The answers are the ones of a read of every user: the users in request
order, NOT_FOUND for the first missing or hidden id, or INVALID_ARGUMENT
saying how many fit."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.read_lane import SqlAlchemyUserReader
from usersvc.domain.errors import InvalidArgument, UserNotFound
from usersvc.domain.models import (
    ROLE_ADMIN,
    ROLE_SERVICE,
    ROLE_USER,
    NewUser,
    Principal,
    PrincipalKind,
    User,
)
from usersvc.domain.passwords import PasswordPolicy
from usersvc.domain.ports import UnitOfWorkFactory
from usersvc.domain.validation import MAX_LABEL_KEY_LENGTH, MAX_LABEL_VALUE_LENGTH, MAX_LABELS
from usersvc.domain.wire_size import OversizedUsers, user_wire_bytes
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.response_size import fitting_prefix
from usersvc.services.sessions import SessionLifetimes, SessionRevoker
from usersvc.services.users import UserService

NewUserFactory = Callable[..., NewUser]

ADMIN = Principal(
    kind=PrincipalKind.USER,
    subject="0190a4b2-6c1e-7cc3-8a1b-00000000a11e",
    roles=frozenset({ROLE_USER, ROLE_ADMIN}),
    session_id="session",
    token_id="token",
)
SERVICE = Principal(kind=PrincipalKind.SERVICE, subject="batch", roles=frozenset({ROLE_SERVICE}))
# Just past 4 MiB with the largest labels (190 fit).
HEAVY_USERS = 250


def maximal_labels(seed: str) -> dict[str, str]:
    return {
        f"k{index:02d}{seed}".ljust(MAX_LABEL_KEY_LENGTH, "x"): secrets.token_hex(
            MAX_LABEL_VALUE_LENGTH // 2
        )
        for index in range(MAX_LABELS)
    }


async def store(uow_factory: UnitOfWorkFactory, news: Sequence[NewUser]) -> list[User]:
    stored: list[User] = []
    for start in range(0, len(news), 50):
        async with uow_factory() as uow:
            stored += await uow.users.add_many(news[start : start + 50])
            await uow.commit()
    return stored


@contextmanager
def lane_statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The statements asyncpg runs on ``engine``'s connections checked out
    while the block runs, by what they select from."""
    queries: list[str] = []
    watched: list[Any] = []

    def record(query: Any) -> None:
        text = " ".join(str(query.query).split())
        if "AS fits" in text:
            queries.append("users within the budget")
        elif "FROM users" in text:
            queries.append("users")

    def watch(dbapi_connection: Any, *_: Any) -> None:
        driver = dbapi_connection.driver_connection
        if driver not in watched:
            watched.append(driver)
            driver.add_query_logger(record)

    event.listen(engine.sync_engine.pool, "checkout", watch, insert=True)
    try:
        yield queries
    finally:
        event.remove(engine.sync_engine.pool, "checkout", watch)
        for driver in watched:
            driver.remove_query_logger(record)


@pytest.fixture
async def service(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> AsyncIterator[UserService]:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=1)
    yield UserService(
        uow_factory=uow_factory,
        hasher=hasher,
        password_policy=PasswordPolicy(),
        allow_signup=True,
        sessions=SessionRevoker(
            lifetimes=SessionLifetimes(access_ttl_seconds=600, refresh_ttl_seconds=3600),
            on_revoked=None,
        ),
        reader=SqlAlchemyUserReader(engine),
    )
    hasher.close()


@pytest.fixture
async def heavy(uow_factory: UnitOfWorkFactory, new_user: NewUserFactory) -> list[User]:
    """250 users of 64 labels of 63-character keys and 256-character values
    (about 21 KB each), in creation order."""
    return await store(
        uow_factory,
        [
            new_user(display_name="N" * 200, labels=maximal_labels(f"{index:04d}"))
            for index in range(HEAVY_USERS)
        ],
    )


async def settle() -> None:
    # asyncpg hands logged queries to the loggers on the next loop turns.
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_batch_get_past_4_mib_is_refused_from_the_sizes_in_one_statement(
    service: UserService, heavy: list[User], engine: AsyncEngine
) -> None:
    ids = [str(user.id) for user in reversed(heavy)]
    with lane_statements(engine) as statements:
        with pytest.raises(InvalidArgument) as refused:
            await service.batch_get_users(principal=ADMIN, user_ids=ids)
        await settle()
    fitting = fitting_prefix(heavy[::-1])
    assert 0 < fitting < HEAVY_USERS
    message = refused.value.violations[0].description
    assert f"these {HEAVY_USERS} users do not fit" in message
    assert f"(the first {fitting} do)" in message
    assert statements == ["users within the budget"]


async def test_the_first_missing_id_is_not_found_before_the_size_is_refused(
    service: UserService, heavy: list[User]
) -> None:
    missing = uuid.uuid4()
    ids = [str(user.id) for user in heavy[:100]] + [str(missing)]
    ids += [str(user.id) for user in heavy[100:]]
    with pytest.raises(UserNotFound) as not_found:
        await service.batch_get_users(principal=ADMIN, user_ids=ids)
    assert not_found.value.metadata == {"id": str(missing)}


async def test_a_deleted_user_among_too_many_bytes_is_not_found_unless_the_caller_is_an_admin(
    service: UserService, heavy: list[User], uow_factory: UnitOfWorkFactory
) -> None:
    async with uow_factory() as uow:
        await uow.users.set_deleted(heavy[7].id, True)
        await uow.commit()
    ids = [str(user.id) for user in heavy]
    with pytest.raises(UserNotFound) as not_found:
        await service.batch_get_users(principal=SERVICE, user_ids=ids)
    assert not_found.value.metadata == {"id": str(heavy[7].id)}
    with pytest.raises(InvalidArgument):
        await service.batch_get_users(principal=ADMIN, user_ids=ids)


async def test_a_batch_get_that_fits_is_one_read_of_the_users_in_request_order(
    service: UserService, heavy: list[User], engine: AsyncEngine
) -> None:
    wanted = heavy[::-1][:150]
    with lane_statements(engine) as statements:
        users = await service.batch_get_users(
            principal=ADMIN, user_ids=[str(user.id) for user in wanted]
        )
        await settle()
    assert users == wanted
    assert statements == ["users within the budget"]


async def test_a_batch_that_cannot_pass_4_mib_is_read_without_sizes(
    service: UserService, heavy: list[User], engine: AsyncEngine
) -> None:
    # 56 users within the validation limits are at most 4 MB.
    wanted = heavy[:56]
    with lane_statements(engine) as statements:
        users = await service.batch_get_users(
            principal=ADMIN, user_ids=[str(user.id) for user in wanted]
        )
        await settle()
    assert users == wanted
    assert statements == ["users"]


async def test_the_lane_returns_the_sizes_of_users_past_the_budget(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    stored = await store(uow_factory, [new_user(labels={"team": "a"}) for _ in range(3)])
    async with uow_factory() as uow:
        await uow.users.set_deleted(stored[1].id, True)
        await uow.commit()
    reader = SqlAlchemyUserReader(engine)
    ids = [user.id for user in stored] + [uuid.uuid4()]
    sizes = {user.id: user_wire_bytes(user) for user in stored}
    assert await reader.get_many_within(ids, max_bytes=sum(sizes.values()) - 1) == OversizedUsers(
        wire_bytes=sizes, deleted=frozenset({stored[1].id})
    )
    within = await reader.get_many_within(ids, max_bytes=sum(sizes.values()))
    assert isinstance(within, list)
    assert {user.id for user in within} == set(sizes)
    assert await reader.get_many_within([uuid.uuid4()], max_bytes=1) == []
