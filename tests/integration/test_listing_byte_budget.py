"""A page read under a byte budget (ListQuery.max_bytes): PostgreSQL sums
the rows' sizes as the service counts them and sends no row past the first
one over the budget, so a page of users with the largest labels reads
about its 4 MiB, not 1,001 rows of 21 KB. The pages are the ones the
service cut before the query knew sizes: the same users, in the same
order, each once."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.pooled_driver import PooledDriver
from usersvc.adapters.read_lane import SqlAlchemyUserReader
from usersvc.adapters.repository.listing import WITHIN_BUDGET
from usersvc.adapters.repository.sizes import WIRE_BYTES
from usersvc.adapters.repository.user_rows import users
from usersvc.domain.listing import Cursor, Filter, ListQuery, Ordering, SortField
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
from usersvc.domain.wire_size import user_wire_bytes
from usersvc.services.inputs import ListUsersInput
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.response_size import MAX_USERS_BYTES, fitting_prefix
from usersvc.services.sessions import SessionLifetimes, SessionRevoker
from usersvc.services.users import UserService

NewUserFactory = Callable[..., NewUser]

ORDERINGS = [
    Ordering(field, descending)
    for field in (SortField.CREATE_TIME, SortField.EMAIL, SortField.DISPLAY_NAME)
    for descending in (False, True)
]
ADMIN = Principal(
    kind=PrincipalKind.USER,
    subject="0190a4b2-6c1e-7cc3-8a1b-00000000a11e",
    roles=frozenset({ROLE_USER, ROLE_ADMIN}),
    session_id="session",
    token_id="token",
)
HEAVY_USERS = 1000


def maximal_labels(seed: str) -> dict[str, str]:
    """64 labels of 63-character keys and 256-character values: about
    21 KB a user."""
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


def in_order(stored: Sequence[User], ordering: Ordering) -> list[User]:
    def key(user: User) -> tuple[object, uuid.UUID]:
        match ordering.field:
            case SortField.CREATE_TIME:
                return (user.create_time, user.id)
            case SortField.EMAIL:
                return (user.email.lower(), user.id)
            case SortField.DISPLAY_NAME:
                return (user.display_name, user.id)

    return sorted(stored, key=key, reverse=ordering.descending)


def pages_cut_after_reading(
    ordered: Sequence[User], page_size: int, budget: int
) -> list[list[User]]:
    """The pages as the service made them from full pages of page_size + 1
    rows: each the longest prefix of the next ``page_size`` users that fits
    ``budget`` (fitting_prefix)."""
    pages: list[list[User]] = []
    rest = list(ordered)
    while rest:
        count = fitting_prefix(rest[:page_size], budget)
        pages.append(rest[:count])
        rest = rest[count:]
    return pages or [[]]


@contextmanager
def rows_returned(engine: AsyncEngine) -> Iterator[list[int]]:
    """How many rows each budgeted page statement returned (the "SELECT n"
    its execution reported, or the rows the read lane's driver got), in
    order."""
    counts: list[int] = []

    def after(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if WITHIN_BUDGET in statement:
            counts.append(cursor.rowcount)

    lane_read = PooledDriver.read

    async def counted_read(driver: PooledDriver, query: str, *arguments: object) -> Any:
        rows = await lane_read(driver, query, *arguments)
        if WITHIN_BUDGET in query:
            counts.append(len(rows))
        return rows

    event.listen(engine.sync_engine, "after_cursor_execute", after)
    setattr(PooledDriver, "read", counted_read)  # noqa: B010  # restored below
    try:
        yield counts
    finally:
        setattr(PooledDriver, "read", lane_read)  # noqa: B010
        event.remove(engine.sync_engine, "after_cursor_execute", after)


async def walk(
    uow_factory: UnitOfWorkFactory, ordering: Ordering, *, page_size: int, max_bytes: int
) -> list[list[User]]:
    pages: list[list[User]] = []
    cursor: Cursor | None = None
    while True:
        query = ListQuery(Filter(), ordering, False, page_size, cursor, max_bytes=max_bytes)
        async with uow_factory() as uow:
            page = await uow.users.list(query)
        pages.append(list(page.users))
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


# Pages without a filter are read on the read lane in the server; each
# test runs on both paths.
@pytest.fixture(params=["unit of work", "read lane"])
async def service(
    request: pytest.FixtureRequest, uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> AsyncIterator[UserService]:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=1)
    yield UserService(
        uow_factory=uow_factory,
        reader=SqlAlchemyUserReader(engine) if request.param == "read lane" else None,
        hasher=hasher,
        password_policy=PasswordPolicy(),
        allow_signup=True,
        sessions=SessionRevoker(
            lifetimes=SessionLifetimes(access_ttl_seconds=600, refresh_ttl_seconds=3600),
            on_revoked=None,
        ),
    )
    hasher.close()


async def test_the_size_summed_in_sql_is_the_services_estimate_of_each_user(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory, engine: AsyncEngine
) -> None:
    stored = await store(
        uow_factory,
        [
            new_user(roles=()),
            new_user(display_name="Zoë Ångström", roles=(ROLE_USER, ROLE_ADMIN, ROLE_SERVICE)),
            new_user(email="jürgen@exämple.com", labels={"team": "payments", "empty": ""}),
            new_user(labels={"emoji": "😀" * MAX_LABEL_VALUE_LENGTH, "a": "é: ü", "b": "{}"}),
            new_user(display_name="名" * 200, labels=maximal_labels("x")),
            # Large labels are summed entry by entry: escapes do not count.
            new_user(labels={f"k{index}": 'say "hi" \\ ' * 20 for index in range(8)}),
        ],
    )
    async with engine.connect() as connection:
        sizes = dict((await connection.execute(select(users.id, WIRE_BYTES))).all())
    assert sizes == {user.id: user_wire_bytes(user) for user in stored}


async def test_labels_json_escapes_only_raise_the_size_summed_in_sql(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory, engine: AsyncEngine
) -> None:
    # Small labels are sized from jsonb's text, where quotes and
    # backslashes are escaped and a value ending in '": ' looks like one
    # more entry: a few bytes more, never less.
    labels = {"quote": 'say "hi"', "slash": "a\\b", "tail": 'x": ', "tab": "\t\n"}
    [user] = await store(uow_factory, [new_user(labels=labels)])
    async with engine.connect() as connection:
        size = (await connection.execute(select(WIRE_BYTES))).scalar_one()
    assert user_wire_bytes(user) < size <= user_wire_bytes(user) + 32


@pytest.mark.parametrize("ordering", ORDERINGS, ids=lambda o: o.canonical())
async def test_pages_under_a_budget_are_the_pages_cut_after_reading_and_read_one_row_more(
    uow_factory: UnitOfWorkFactory,
    new_user: NewUserFactory,
    engine: AsyncEngine,
    ordering: Ordering,
) -> None:
    # Sizes from 300 bytes to 21 KB, display names that tie, create times
    # that tie within a batch: pages of up to 40 users, most cut by bytes.
    stored = await store(
        uow_factory,
        [
            new_user(
                display_name=f"name {index % 7}",
                labels=maximal_labels(f"{index:03d}") if index % 3 == 0 else {"n": str(index)},
            )
            for index in range(150)
        ],
    )
    budget = 100_000
    expected = pages_cut_after_reading(in_order(stored, ordering), 40, budget)
    with rows_returned(engine) as counts:
        pages = await walk(uow_factory, ordering, page_size=40, max_bytes=budget)
    assert [[u.id for u in page] for page in pages] == [[u.id for u in page] for page in expected]
    assert len(pages) > 150 // 40 + 1  # the budget, not page_size, cut most pages
    # Every page but the last read the row that told more follow, no more.
    assert counts == [len(page) + 1 for page in pages[:-1]] + [len(pages[-1])]


async def test_a_first_user_over_the_budget_makes_a_page_of_its_own(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    stored = await store(uow_factory, [new_user() for _ in range(3)])
    pages = await walk(uow_factory, Ordering(), page_size=10, max_bytes=1)
    assert pages == [[user] for user in in_order(stored, Ordering())]


async def test_without_a_budget_or_within_it_page_size_decides(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    stored = await store(uow_factory, [new_user() for _ in range(7)])
    for budget in (MAX_USERS_BYTES, None):
        query = ListQuery(Filter(), Ordering(), False, 3, max_bytes=budget)
        async with uow_factory() as uow:
            page = await uow.users.list(query)
        ordered = in_order(stored, Ordering())
        assert list(page.users) == ordered[:3]
        assert page.next_cursor == Cursor(ordered[2].create_time, ordered[2].id)


async def test_1000_users_with_the_largest_labels_are_listed_once_in_pages_below_the_cap(
    service: UserService,
    uow_factory: UnitOfWorkFactory,
    new_user: NewUserFactory,
    engine: AsyncEngine,
) -> None:
    stored = await store(
        uow_factory,
        [
            new_user(display_name="N" * 200, labels=maximal_labels(f"{index:04d}"))
            for index in range(HEAVY_USERS)
        ],
    )
    ordered = in_order(stored, Ordering())
    expected = pages_cut_after_reading(ordered, 1000, MAX_USERS_BYTES)
    pages: list[list[User]] = []
    token = ""
    with rows_returned(engine) as counts:
        while True:
            page = await service.list_users(
                principal=ADMIN, request=ListUsersInput(page_size=1000, page_token=token)
            )
            pages.append(list(page.users))
            assert sum(user_wire_bytes(user) for user in page.users) <= MAX_USERS_BYTES
            token = page.next_page_token
            if not token:
                break
    print(f"{HEAVY_USERS} users in pages of {[len(page) for page in pages]}, rows read {counts}")
    assert pages == expected
    assert [user for page in pages for user in page] == ordered
    assert counts == [len(page) + 1 for page in pages[:-1]] + [len(pages[-1])]
    assert max(counts) < 200  # of the 1,001 read before
