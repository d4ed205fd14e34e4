"""ListUsers filters translated to SQL (usersvc.adapters.repository.filters), run
through SqlAlchemyUserRepository.list and count."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.domain.errors import InvalidArgument
from usersvc.domain.listing import (
    Comparison,
    Filter,
    FilterField,
    FilterValue,
    ListQuery,
    Op,
    Ordering,
)
from usersvc.domain.models import User, UserState
from usersvc.domain.ports import UnitOfWorkFactory

UserMaker = Callable[..., Awaitable[User]]

F = FilterField


@dataclass(frozen=True)
class Population:
    ada: User  # active admin, team payments
    bob: User  # disabled, team search
    cat: User  # deleted, no labels
    dan: User  # active, odd characters in email and name
    eve: User  # active, label present with empty value


@pytest.fixture
async def people(uow_factory: UnitOfWorkFactory, make_user: UserMaker) -> Population:
    ada = await make_user(
        email="ada@example.com",
        display_name="Ada Lovelace",
        roles=("user", "admin"),
        labels={"team": "payments", "tier": "gold"},
    )
    bob = await make_user(email="bob@example.org", display_name="bob", labels={"team": "search"})
    cat = await make_user(email="cat@example.net", display_name="Cat")
    dan = await make_user(
        email="100%_dan\\x@example.com",
        display_name="'; DROP TABLE users; --",
        labels={"we'ird key": 'va"lue'},
    )
    eve = await make_user(email="eve@corp.example", display_name="Eve", labels={"team": ""})
    async with uow_factory() as uow:
        bob = await uow.users.set_disabled(bob.id, True)
        cat = await uow.users.set_deleted(cat.id, True)
        await uow.commit()
    return Population(ada, bob, cat, dan, eve)


async def matching(
    uow_factory: UnitOfWorkFactory, *terms: Comparison, show_deleted: bool = True
) -> set[str]:
    flt = Filter(terms)
    query = ListQuery(flt, Ordering(), show_deleted=show_deleted, page_size=100)
    async with uow_factory() as uow:
        page = await uow.users.list(query)
        count = await uow.users.count(flt, show_deleted=show_deleted)
    assert count == len(page.users)
    return {user.email.split("@")[0] for user in page.users}


def term(
    field: FilterField, op: Op, value: FilterValue, label_key: str | None = None
) -> Comparison:
    return Comparison(field, op, value, label_key)


ALL = {"ada", "bob", "cat", "100%_dan\\x", "eve"}


@pytest.mark.parametrize(
    ("comparison", "expected"),
    [
        (term(F.EMAIL, Op.EQ, "ADA@Example.COM"), {"ada"}),
        (term(F.EMAIL, Op.NE, "ada@example.com"), ALL - {"ada"}),
        (term(F.EMAIL, Op.LT, "BOB@example.org"), {"ada", "100%_dan\\x"}),
        (term(F.EMAIL, Op.LE, "bob@example.org"), {"ada", "bob", "100%_dan\\x"}),
        (term(F.EMAIL, Op.GT, "cat@example.net"), {"eve"}),
        (term(F.EMAIL, Op.GE, "CAT@example.net"), {"cat", "eve"}),
        (term(F.EMAIL, Op.HAS, "@EXAMPLE."), {"ada", "bob", "cat", "100%_dan\\x"}),
        (term(F.EMAIL, Op.HAS, "%"), {"100%_dan\\x"}),
        (term(F.EMAIL, Op.HAS, "_"), {"100%_dan\\x"}),
        (term(F.EMAIL, Op.HAS, "\\"), {"100%_dan\\x"}),
        (term(F.EMAIL, Op.HAS, "a%e"), set()),
    ],
    ids=lambda v: repr(v) if isinstance(v, set) else f"{v.op.value}{v.value}",
)
async def test_email_comparisons_ignore_case_and_treat_wildcards_as_text(
    uow_factory: UnitOfWorkFactory, people: Population, comparison: Comparison, expected: set[str]
) -> None:
    assert await matching(uow_factory, comparison) == expected


@pytest.mark.parametrize(
    ("comparison", "expected"),
    [
        (term(F.DISPLAY_NAME, Op.EQ, "bob"), {"bob"}),
        (term(F.DISPLAY_NAME, Op.EQ, "BOB"), set()),
        (term(F.DISPLAY_NAME, Op.NE, "bob"), ALL - {"bob"}),
        (term(F.DISPLAY_NAME, Op.HAS, "Love"), {"ada"}),
        (term(F.DISPLAY_NAME, Op.HAS, "love"), set()),
    ],
    ids=lambda v: repr(v) if isinstance(v, set) else f"{v.op.value}{v.value}",
)
async def test_display_name_comparisons_are_case_sensitive(
    uow_factory: UnitOfWorkFactory, people: Population, comparison: Comparison, expected: set[str]
) -> None:
    assert await matching(uow_factory, comparison) == expected


async def test_display_name_supports_every_ordering_comparison(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    # Lower-case ASCII letters only: every collation orders these the same.
    for name in ("anna", "bert", "carl"):
        await make_user(email=f"{name}@example.com", display_name=name)
    results = [
        await matching(uow_factory, term(F.DISPLAY_NAME, op, "bert"))
        for op in (Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE)
    ]
    assert results == [
        {"bert"},
        {"anna", "carl"},
        {"anna"},
        {"anna", "bert"},
        {"carl"},
        {"bert", "carl"},
    ]


async def test_an_injection_looking_literal_is_compared_as_data(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine, people: Population
) -> None:
    found = await matching(uow_factory, term(F.DISPLAY_NAME, Op.EQ, "'; DROP TABLE users; --"))
    nothing = await matching(uow_factory, term(F.EMAIL, Op.EQ, "x' OR '1'='1"))
    async with engine.connect() as connection:
        remaining = (await connection.execute(text("SELECT count(*) FROM users"))).scalar_one()
    assert (found, nothing, remaining) == ({"100%_dan\\x"}, set(), 5)


@pytest.mark.parametrize(
    ("comparison", "expected"),
    [
        (term(F.STATE, Op.EQ, UserState.ACTIVE), {"ada", "100%_dan\\x", "eve"}),
        (term(F.STATE, Op.EQ, UserState.DISABLED), {"bob"}),
        (term(F.STATE, Op.EQ, UserState.DELETED), {"cat"}),
        (term(F.STATE, Op.NE, UserState.ACTIVE), {"bob", "cat"}),
        (term(F.STATE, Op.NE, UserState.DELETED), ALL - {"cat"}),
    ],
    ids=lambda v: repr(v) if isinstance(v, set) else f"{v.op.value}{v.value.name}",
)
async def test_state_is_computed_from_the_disable_and_delete_times(
    uow_factory: UnitOfWorkFactory, people: Population, comparison: Comparison, expected: set[str]
) -> None:
    assert await matching(uow_factory, comparison) == expected


async def test_a_deleted_disabled_user_has_state_deleted_only(
    uow_factory: UnitOfWorkFactory, people: Population
) -> None:
    async with uow_factory() as uow:
        await uow.users.set_deleted(people.bob.id, True)
        await uow.commit()
    disabled = await matching(uow_factory, term(F.STATE, Op.EQ, UserState.DISABLED))
    deleted = await matching(uow_factory, term(F.STATE, Op.EQ, UserState.DELETED))
    assert (disabled, deleted) == (set(), {"bob", "cat"})


async def test_roles_has_matches_users_holding_the_role(
    uow_factory: UnitOfWorkFactory, people: Population
) -> None:
    assert await matching(uow_factory, term(F.ROLES, Op.HAS, "admin")) == {"ada"}
    assert await matching(uow_factory, term(F.ROLES, Op.HAS, "adm")) == set()


async def test_create_time_supports_every_ordering_comparison(
    uow_factory: UnitOfWorkFactory, people: Population
) -> None:
    moment = people.bob.create_time
    results = [
        await matching(uow_factory, term(F.CREATE_TIME, op, moment))
        for op in (Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE)
    ]
    assert results == [
        {"bob"},
        ALL - {"bob"},
        {"ada"},
        {"ada", "bob"},
        {"cat", "100%_dan\\x", "eve"},
        {"bob", "cat", "100%_dan\\x", "eve"},
    ]


async def test_create_time_compares_instants_across_time_zones(
    uow_factory: UnitOfWorkFactory, people: Population
) -> None:
    elsewhere = people.bob.create_time.astimezone(timezone(timedelta(hours=9)))
    assert await matching(uow_factory, term(F.CREATE_TIME, Op.EQ, elsewhere)) == {"bob"}


@pytest.mark.parametrize(
    ("comparison", "expected"),
    [
        (term(F.LABELS, Op.EQ, "payments", "team"), {"ada"}),
        (term(F.LABELS, Op.NE, "payments", "team"), ALL - {"ada"}),
        (term(F.LABELS, Op.HAS, None, "team"), {"ada", "bob", "eve"}),
        (term(F.LABELS, Op.HAS, "search", "team"), {"bob"}),
        (term(F.LABELS, Op.EQ, "", "team"), {"eve"}),
        (term(F.LABELS, Op.HAS, "tier"), {"ada"}),
        (term(F.LABELS, Op.HAS, None, "we'ird key"), {"100%_dan\\x"}),
        (term(F.LABELS, Op.EQ, 'va"lue', "we'ird key"), {"100%_dan\\x"}),
        (term(F.LABELS, Op.HAS, None, "') OR true; --"), set()),
    ],
    ids=lambda v: repr(v) if isinstance(v, set) else f"{v.label_key}{v.op.value}{v.value}",
)
async def test_label_comparisons_look_at_one_key(
    uow_factory: UnitOfWorkFactory, people: Population, comparison: Comparison, expected: set[str]
) -> None:
    assert await matching(uow_factory, comparison) == expected


async def test_terms_are_joined_with_and(
    uow_factory: UnitOfWorkFactory, people: Population
) -> None:
    found = await matching(
        uow_factory,
        term(F.STATE, Op.EQ, UserState.ACTIVE),
        term(F.EMAIL, Op.HAS, "@example.com"),
        term(F.LABELS, Op.EQ, "payments", "team"),
    )
    assert found == {"ada"}


async def test_deleted_users_are_filtered_out_unless_shown(
    uow_factory: UnitOfWorkFactory, people: Population
) -> None:
    hidden = await matching(uow_factory, term(F.EMAIL, Op.HAS, "cat"), show_deleted=False)
    shown = await matching(uow_factory, term(F.EMAIL, Op.HAS, "cat"), show_deleted=True)
    assert (hidden, shown) == (set(), {"cat"})


@pytest.mark.parametrize(
    "comparison",
    [
        term(F.ROLES, Op.EQ, "admin"),
        term(F.ROLES, Op.NE, "admin"),
        term(F.STATE, Op.LT, UserState.ACTIVE),
        term(F.STATE, Op.EQ, "STATE_ACTIVE"),
        term(F.EMAIL, Op.EQ, datetime(2024, 1, 1, tzinfo=UTC)),
        term(F.EMAIL, Op.EQ, None),
        term(F.CREATE_TIME, Op.HAS, datetime(2024, 1, 1, tzinfo=UTC)),
        term(F.CREATE_TIME, Op.GT, datetime(2024, 1, 1)),  # naive on purpose
        term(F.CREATE_TIME, Op.GT, "2024-01-01"),
        term(F.LABELS, Op.LT, "x", "team"),
        term(F.LABELS, Op.EQ, None, "team"),
        term(F.LABELS, Op.EQ, "team"),
        term(F.LABELS, Op.EQ, "x", ""),
        term(F.EMAIL, Op.HAS, "a\x00b"),
        term(F.LABELS, Op.HAS, None, "te\x00am"),
    ],
    ids=repr,
)
async def test_a_comparison_without_meaning_is_an_invalid_filter(
    uow_factory: UnitOfWorkFactory, comparison: Comparison
) -> None:
    query = ListQuery(Filter((comparison,)), Ordering(), show_deleted=False, page_size=10)
    async with uow_factory() as uow:
        with pytest.raises(InvalidArgument) as caught:
            await uow.users.list(query)
    assert caught.value.violations[0].field == "filter"
