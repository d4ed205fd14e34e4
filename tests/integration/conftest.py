"""Integration tests run against a real PostgreSQL (see tests/conftest.py);
every test starts from empty tables."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database import create_engine
from usersvc.config import Settings
from usersvc.domain.models import NewUser, User
from usersvc.domain.ports import UnitOfWorkFactory

_sequence = itertools.count(1)

# A syntactically valid bcrypt hash; the repositories never look inside it.
FAKE_HASH = "$2b$04$abcdefghijklmnopqrstuu5Zk6d2uQ7g4QKJvLr7b3g3ZxJQkYx5e"

NewUserFactory = Callable[..., NewUser]
UserMaker = Callable[..., Awaitable[User]]


@pytest.fixture(autouse=True)
def _empty_tables(clean_db: None) -> None:
    """Every integration test starts from empty tables."""


def build_new_user(
    *,
    email: str | None = None,
    password_hash: str = FAKE_HASH,
    display_name: str = "",
    roles: tuple[str, ...] = ("user",),
    labels: Mapping[str, str] | None = None,
) -> NewUser:
    n = next(_sequence)
    return NewUser(
        email=email if email is not None else f"user{n}@example.com",
        password_hash=password_hash,
        display_name=display_name,
        roles=roles,
        labels=dict(labels or {}),
    )


@pytest.fixture
def new_user() -> NewUserFactory:
    """Builds a NewUser with a unique email; keyword arguments override."""
    return build_new_user


@pytest.fixture
def wait_for_lock_waiters(engine: AsyncEngine) -> Callable[[int], Awaitable[None]]:
    """Waits (at most 10 s) until ``count`` sessions on the test database
    are blocked on a lock: the point where a concurrency test may go on."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )

    async def wait(count: int) -> None:
        async with asyncio.timeout(10):
            while True:
                async with engine.connect() as connection:
                    if (await connection.execute(query)).scalar_one() >= count:
                        return
                await asyncio.sleep(0.01)

    return wait


@pytest.fixture
async def make_engine(
    test_settings: Settings, database_url: str
) -> AsyncIterator[Callable[..., AsyncEngine]]:
    """Builds extra engines with create_engine and overridden settings
    (keyword arguments), on the test database unless given a URL; disposes
    them after the test."""
    engines: list[AsyncEngine] = []

    def make(url: str = database_url, **overrides: Any) -> AsyncEngine:
        engine = create_engine(dataclasses.replace(test_settings, **overrides), url)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.dispose()


@pytest.fixture
def make_user(uow_factory: UnitOfWorkFactory) -> UserMaker:
    """Stores a user in its own committed unit of work and returns it."""

    async def make(**overrides: Any) -> User:
        async with uow_factory() as uow:
            user = await uow.users.add(build_new_user(**overrides))
            await uow.commit()
        return user

    return make
