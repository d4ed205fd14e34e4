"""Keyset pagination and counting in SqlAlchemyUserRepository.list/count."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from usersvc.domain.listing import (
    Comparison,
    Cursor,
    Filter,
    FilterField,
    ListQuery,
    Op,
    Ordering,
    SortField,
)
from usersvc.domain.models import NewUser, User
from usersvc.domain.ports import UnitOfWorkFactory

NewUserFactory = Callable[..., NewUser]
UserMaker = Callable[..., Awaitable[User]]

ORDERINGS = [
    Ordering(field, descending)
    for field in (SortField.CREATE_TIME, SortField.EMAIL, SortField.DISPLAY_NAME)
    for descending in (False, True)
]


def expected_order(users: list[User], ordering: Ordering) -> list[uuid.UUID]:
    def key(user: User) -> tuple[object, uuid.UUID]:
        match ordering.field:
            case SortField.CREATE_TIME:
                return (user.create_time, user.id)
            case SortField.EMAIL:
                return (user.email.lower(), user.id)
            case SortField.DISPLAY_NAME:
                return (user.display_name, user.id)

    return [user.id for user in sorted(users, key=key, reverse=ordering.descending)]


async def read_all_pages(
    uow_factory: UnitOfWorkFactory,
    ordering: Ordering,
    *,
    page_size: int,
    flt: Filter | None = None,
    show_deleted: bool = False,
) -> list[list[uuid.UUID]]:
    pages: list[list[uuid.UUID]] = []
    cursor: Cursor | None = None
    while True:
        query = ListQuery(
            filter=flt or Filter(),
            ordering=ordering,
            show_deleted=show_deleted,
            page_size=page_size,
            after=cursor,
        )
        async with uow_factory() as uow:
            page = await uow.users.list(query)
        pages.append([user.id for user in page.users])
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


async def seed_with_ties(uow_factory: UnitOfWorkFactory, new_user: NewUserFactory) -> list[User]:
    """Users whose display names and (within one batch) create times tie."""
    names = ["bob", "alice", "bob", "carol", "alice", "bob", "", "dave"]
    emails = ["k@x.io", "B@x.io", "a@x.io", "Zed@x.io", "m@x.io", "c@x.io", "Y@x.io", "d@x.io"]
    users: list[User] = []
    async with uow_factory() as uow:
        users += await uow.users.add_many(
            [new_user(email=e, display_name=n) for e, n in zip(emails[:5], names[:5], strict=True)]
        )
        await uow.commit()
    for email, name in zip(emails[5:], names[5:], strict=True):
        async with uow_factory() as uow:
            users.append(await uow.users.add(new_user(email=email, display_name=name)))
            await uow.commit()
    return users


@pytest.mark.parametrize("ordering", ORDERINGS, ids=lambda o: o.canonical())
async def test_paging_visits_every_user_once_in_order_with_ties_broken_by_id(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory, ordering: Ordering
) -> None:
    users = await seed_with_ties(uow_factory, new_user)
    pages = await read_all_pages(uow_factory, ordering, page_size=3)
    assert [user_id for page in pages for user_id in page] == expected_order(users, ordering)
    assert [len(page) for page in pages] == [3, 3, 2]


async def test_a_full_last_page_has_no_next_cursor(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    for _ in range(4):
        await make_user()
    pages = await read_all_pages(uow_factory, Ordering(), page_size=2)
    assert [len(page) for page in pages] == [2, 2]


async def test_an_empty_table_gives_one_empty_page(uow_factory: UnitOfWorkFactory) -> None:
    assert await read_all_pages(uow_factory, Ordering(), page_size=10) == [[]]


async def test_paging_while_users_are_created_neither_repeats_nor_skips_existing_users(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    existing = [(await make_user()).id for _ in range(6)]
    seen: list[uuid.UUID] = []
    cursor: Cursor | None = None
    while True:
        query = ListQuery(Filter(), Ordering(), show_deleted=False, page_size=2, after=cursor)
        async with uow_factory() as uow:
            page = await uow.users.list(query)
        seen += [user.id for user in page.users]
        await make_user()
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [user_id for user_id in seen if user_id in existing] == existing
    assert len(seen) == len(set(seen))


async def test_deleted_users_are_listed_only_with_show_deleted(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    live = await make_user()
    gone = await make_user()
    async with uow_factory() as uow:
        await uow.users.set_deleted(gone.id, True)
        await uow.commit()
    hidden = await read_all_pages(uow_factory, Ordering(), page_size=10)
    shown = await read_all_pages(uow_factory, Ordering(), page_size=10, show_deleted=True)
    assert hidden == [[live.id]]
    assert shown == [[live.id, gone.id]]


async def test_count_is_exact_for_the_filter_and_deleted_flag(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    for n in range(5):
        await make_user(roles=("user", "admin") if n < 2 else ("user",))
    gone = await make_user(roles=("user", "admin"))
    async with uow_factory() as uow:
        await uow.users.set_deleted(gone.id, True)
        await uow.commit()
    admins = Filter((Comparison(FilterField.ROLES, Op.HAS, "admin"),))
    async with uow_factory() as uow:
        assert await uow.users.count(Filter(), show_deleted=False) == 5
        assert await uow.users.count(Filter(), show_deleted=True) == 6
        assert await uow.users.count(admins, show_deleted=False) == 2
        assert await uow.users.count(admins, show_deleted=True) == 3


@pytest.mark.parametrize("page_size", [0, -1])
async def test_a_page_size_below_one_is_a_programming_error(
    uow_factory: UnitOfWorkFactory, page_size: int
) -> None:
    # The service refuses it first, as INVALID_ARGUMENT on page_size.
    query = ListQuery(Filter(), Ordering(), show_deleted=False, page_size=page_size)
    async with uow_factory() as uow:
        with pytest.raises(ValueError, match="page_size must be at least 1"):
            await uow.users.list(query)


@pytest.mark.parametrize(
    ("field", "sort_value"),
    [
        (SortField.CREATE_TIME, "2024-01-01"),
        (SortField.EMAIL, datetime(2024, 1, 1, tzinfo=UTC)),
        (SortField.DISPLAY_NAME, "nul\x00inside"),
        (SortField.CREATE_TIME, datetime(2024, 1, 1)),  # naive on purpose
    ],
)
async def test_a_cursor_that_does_not_fit_the_ordering_is_a_programming_error(
    uow_factory: UnitOfWorkFactory, field: SortField, sort_value: str | datetime
) -> None:
    query = ListQuery(
        Filter(),
        Ordering(field),
        show_deleted=False,
        page_size=5,
        after=Cursor(sort_value=sort_value, id=uuid.uuid4()),
    )
    # usersvc.services.pagination refuses such page tokens first, as
    # INVALID_ARGUMENT on page_token; the repository raises no API error.
    async with uow_factory() as uow:
        with pytest.raises(ValueError, match="cursor holds"):
            await uow.users.list(query)
