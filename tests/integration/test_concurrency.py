"""What the database guarantees when requests race: the unique email index and
row locks taken with get(for_update=True)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.users import patch_user
from usersvc.domain.errors import EmailAlreadyExists, EtagMismatch
from usersvc.domain.models import NewUser, User, UserPatch
from usersvc.domain.ports import UnitOfWorkFactory

NewUserFactory = Callable[..., NewUser]
UserMaker = Callable[..., Awaitable[User]]


def mixed_case(email: str, n: int) -> str:
    """The n-th of many spellings of ``email`` differing only in case."""
    return "".join(char.upper() if (n >> (i % 10)) & 1 else char for i, char in enumerate(email))


async def test_fifty_concurrent_creates_of_one_email_leave_exactly_one_user(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    async def create(email: str) -> User:
        async with uow_factory() as uow:
            user = await uow.users.add(new_user(email=email))
            await uow.commit()
            return user

    spellings = [mixed_case("race@example.com", n) for n in range(50)]
    results = await asyncio.gather(*(create(email) for email in spellings), return_exceptions=True)

    created = [result for result in results if isinstance(result, User)]
    refused = [result for result in results if isinstance(result, EmailAlreadyExists)]
    assert (len(created), len(refused)) == (1, 49)
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT count(*) FROM users WHERE lower(email) = 'race@example.com'")
        )
        assert rows.scalar_one() == 1


async def test_concurrent_version_checked_updates_under_a_row_lock_let_exactly_one_win(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()

    async def rename(name: str) -> User:
        async with uow_factory() as uow:
            current = await uow.users.get(user.id, for_update=True)
            assert current is not None
            if current.version != user.version:
                raise EtagMismatch()
            renamed = await patch_user(uow, user.id, UserPatch(display_name=name))
            await uow.commit()
            return renamed

    results = await asyncio.gather(
        *(rename(f"writer {n}") for n in range(20)), return_exceptions=True
    )

    winners = [result for result in results if isinstance(result, User)]
    losers = [result for result in results if isinstance(result, EtagMismatch)]
    assert (len(winners), len(losers)) == (1, 19)
    async with uow_factory() as uow:
        final = await uow.users.get(user.id)
    assert final == winners[0]
    assert final is not None
    assert final.version == user.version + 1
