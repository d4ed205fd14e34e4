"""UserService reads: get_user, lookup_user, batch_get_users, list_users."""

from __future__ import annotations

import uuid

import pytest
from fakes import (
    UserServiceHarness,
    as_admin,
    as_mtls_service,
    as_service_account,
    as_user,
    user_service,
)

from usersvc.domain.errors import InvalidArgument, PermissionDenied, UserNotFound
from usersvc.domain.filtering import parse_filter
from usersvc.domain.listing import Cursor, ListQuery, Ordering, SortField
from usersvc.domain.models import ANONYMOUS, Principal, User, UserState
from usersvc.services.inputs import ListUsersInput, UserListResult
from usersvc.services.response_size import MAX_USERS_BYTES, fitting_prefix

MISSING = "0190a4b2-6c1e-7cc3-8a1b-00000000dead"


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


# -- get_user --------------------------------------------------------------------------


async def test_a_user_reads_itself_as_me() -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com")
    assert await h.service.get_user(principal=as_user(ann), user_id="me") == ann


async def test_a_user_reads_itself_by_id() -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com")
    assert await h.service.get_user(principal=as_user(ann), user_id=str(ann.id)) == ann


@pytest.mark.parametrize("principal", [as_admin(), as_service_account(), as_mtls_service()])
async def test_admins_and_services_read_anyone(principal: Principal) -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com")
    assert await h.service.get_user(principal=principal, user_id=str(ann.id)) == ann


async def test_a_user_may_not_read_another_user() -> None:
    h = user_service()
    ann, bob = h.db.insert("ann@example.com"), h.db.insert("bob@example.com")
    with pytest.raises(PermissionDenied):
        await h.service.get_user(principal=as_user(ann), user_id=str(bob.id))


async def test_permission_is_denied_whether_or_not_the_target_exists() -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com")
    with pytest.raises(PermissionDenied):
        await h.service.get_user(principal=as_user(ann), user_id=MISSING)


async def test_anonymous_callers_may_not_read_users() -> None:
    h = user_service()
    with pytest.raises(PermissionDenied):
        await h.service.get_user(principal=ANONYMOUS, user_id="me")


async def test_a_missing_user_is_not_found_with_its_id() -> None:
    h = user_service()
    with pytest.raises(UserNotFound) as caught:
        await h.service.get_user(principal=as_admin(), user_id=MISSING)
    assert caught.value.metadata == {"id": MISSING}


async def test_a_malformed_id_is_an_invalid_argument() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await h.service.get_user(principal=as_admin(), user_id="42")
    assert fields_of(caught.value) == ["id"]


async def test_me_from_an_mtls_service_is_an_invalid_argument() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument):
        await h.service.get_user(principal=as_mtls_service(), user_id="me")


@pytest.mark.parametrize("who", ["self", "service"])
async def test_a_deleted_user_is_not_found_except_for_admins(who: str) -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com", deleted=True)
    principal = as_user(ann) if who == "self" else as_service_account()
    with pytest.raises(UserNotFound):
        await h.service.get_user(principal=principal, user_id=str(ann.id))


async def test_admins_read_deleted_users() -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com", deleted=True)
    user = await h.service.get_user(principal=as_admin(), user_id=str(ann.id))
    assert user.state is UserState.DELETED


# -- lookup_user -------------------------------------------------------------------------


async def test_lookup_finds_a_user_by_email_in_any_case() -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com")
    assert await h.service.lookup_user(principal=as_admin(), email=" ANN@Example.com") == ann


async def test_users_may_not_look_up_even_themselves() -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com")
    with pytest.raises(PermissionDenied):
        await h.service.lookup_user(principal=as_user(ann), email="ann@example.com")


async def test_lookup_of_a_malformed_email_is_an_invalid_argument() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await h.service.lookup_user(principal=as_service_account(), email="nope")
    assert fields_of(caught.value) == ["email"]


async def test_lookup_of_an_unknown_email_is_not_found() -> None:
    h = user_service()
    with pytest.raises(UserNotFound):
        await h.service.lookup_user(principal=as_admin(), email="ghost@example.com")


async def test_lookup_of_a_deleted_user_is_not_found_for_services() -> None:
    h = user_service()
    h.db.insert("ann@example.com", deleted=True)
    with pytest.raises(UserNotFound):
        await h.service.lookup_user(principal=as_service_account(), email="ann@example.com")


async def test_admins_look_up_deleted_users() -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com", deleted=True)
    assert await h.service.lookup_user(principal=as_admin(), email="ann@example.com") == ann


# -- batch_get_users -----------------------------------------------------------------------


async def test_batch_get_keeps_request_order() -> None:
    h = user_service()
    a, b, c = (h.db.insert(f"{n}@example.com") for n in "abc")
    users = await h.service.batch_get_users(
        principal=as_service_account(), user_ids=[str(c.id), str(a.id), str(b.id)]
    )
    assert users == [c, a, b]


async def test_batch_get_refuses_repeated_ids_naming_each_repeat() -> None:
    h = user_service()
    a, c = (h.db.insert(f"{n}@example.com") for n in "ac")
    with pytest.raises(InvalidArgument) as caught:
        await h.service.batch_get_users(
            principal=as_service_account(),
            user_ids=[str(c.id), str(a.id), str(c.id), str(c.id)],
        )
    assert fields_of(caught.value) == ["ids[2]", "ids[3]"]
    assert "repeats ids[0]" in caught.value.violations[0].description


async def test_batch_get_fails_whole_on_the_first_missing_id() -> None:
    h = user_service()
    a = h.db.insert("a@example.com")
    other_missing = str(uuid.uuid4())
    with pytest.raises(UserNotFound) as caught:
        await h.service.batch_get_users(
            principal=as_admin(), user_ids=[str(a.id), MISSING, other_missing]
        )
    assert caught.value.metadata == {"id": MISSING}


async def test_batch_get_treats_deleted_users_as_missing_for_services() -> None:
    h = user_service()
    gone = h.db.insert("a@example.com", deleted=True)
    with pytest.raises(UserNotFound) as caught:
        await h.service.batch_get_users(principal=as_service_account(), user_ids=[str(gone.id)])
    assert caught.value.metadata == {"id": str(gone.id)}


async def test_batch_get_returns_deleted_users_to_admins() -> None:
    h = user_service()
    gone = h.db.insert("a@example.com", deleted=True)
    assert await h.service.batch_get_users(principal=as_admin(), user_ids=[str(gone.id)]) == [gone]


def heavy_labels(seed: str) -> dict[str, str]:
    return {f"k{index:02d}{seed}".ljust(63, "x"): "v" * 256 for index in range(64)}


async def test_batch_get_past_4_mib_is_refused_saying_how_many_fit() -> None:
    h = user_service()
    users = [h.db.insert(f"u{n}@example.com", labels=heavy_labels(str(n))) for n in range(250)]
    with pytest.raises(InvalidArgument) as caught:
        await h.service.batch_get_users(
            principal=as_admin(), user_ids=[str(user.id) for user in users]
        )
    assert fields_of(caught.value) == ["ids"]
    description = caught.value.violations[0].description
    fitting = fitting_prefix(users)
    assert f"these 250 users do not fit in one response of 4 MiB (the first {fitting} do)" in (
        description
    )


async def test_batch_get_past_4_mib_names_a_missing_id_first() -> None:
    h = user_service()
    users = [h.db.insert(f"u{n}@example.com", labels=heavy_labels(str(n))) for n in range(250)]
    ids = [str(user.id) for user in users]
    with pytest.raises(UserNotFound) as caught:
        await h.service.batch_get_users(
            principal=as_admin(), user_ids=[*ids[:200], MISSING, *ids[200:]]
        )
    assert caught.value.metadata == {"id": MISSING}


async def test_batch_get_reports_every_malformed_id() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await h.service.batch_get_users(
            principal=as_admin(), user_ids=[MISSING, "x", str(uuid.uuid4()), ""]
        )
    assert fields_of(caught.value) == ["ids[1]", "ids[3]"]


@pytest.mark.parametrize("size", [0, 1001])
async def test_batch_get_takes_one_to_a_thousand_ids(size: int) -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await h.service.batch_get_users(principal=as_admin(), user_ids=[MISSING] * size)
    assert fields_of(caught.value) == ["ids"]


async def test_users_may_not_batch_get() -> None:
    h = user_service()
    ann = h.db.insert("ann@example.com")
    with pytest.raises(PermissionDenied):
        await h.service.batch_get_users(principal=as_user(ann), user_ids=[str(ann.id)])


# -- list_users ----------------------------------------------------------------------------


def populate(h: UserServiceHarness, count: int) -> list[User]:
    return [h.db.insert(f"user{i:04d}@example.com") for i in range(count)]


async def list_page(
    h: UserServiceHarness, principal: Principal | None = None, **fields: object
) -> UserListResult:
    return await h.service.list_users(
        principal=principal or as_admin(),
        request=ListUsersInput(**fields),  # type: ignore[arg-type]
    )


async def test_a_page_holds_fifty_users_by_default() -> None:
    h = user_service()
    populate(h, 60)
    page = await list_page(h)
    assert len(page.users) == 50
    assert page.total_size == 60
    assert page.next_page_token


async def test_a_page_size_above_a_thousand_is_lowered_to_a_thousand() -> None:
    h = user_service()
    populate(h, 1001)
    page = await list_page(h, page_size=5000)
    assert len(page.users) == 1000


async def test_a_negative_page_size_is_an_invalid_argument() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await list_page(h, page_size=-1)
    assert fields_of(caught.value) == ["page_size"]


async def test_the_next_page_token_resumes_after_the_last_row() -> None:
    h = user_service()
    users = populate(h, 5)
    first = await list_page(h, page_size=3)
    second = await list_page(h, page_size=3, page_token=first.next_page_token)
    assert (first.users, second.users) == (tuple(users[:3]), tuple(users[3:]))
    assert h.db.list_queries[1].after == Cursor(users[2].create_time, users[2].id)


async def test_the_repository_is_asked_for_the_parsed_query() -> None:
    # What the filter, the ordering and show_deleted select is tested on
    # PostgreSQL (tests/integration/test_user_service_listing.py).
    h = user_service()
    await list_page(
        h,
        page_size=7,
        filter='labels.team:* AND roles:"admin"',
        order_by="email desc",
        show_deleted=True,
    )
    assert h.db.list_queries == [
        ListQuery(
            filter=parse_filter('labels.team:* AND roles:"admin"'),
            ordering=Ordering(SortField.EMAIL, descending=True),
            show_deleted=True,
            page_size=7,
        )
    ]


async def test_pages_that_could_pass_4_mib_are_asked_to_stop_at_the_byte_budget() -> None:
    # Where the query stops is tested on PostgreSQL
    # (tests/integration/test_listing_byte_budget.py).
    h = user_service()
    await list_page(h, page_size=1000)
    await list_page(h)
    assert [query.max_bytes for query in h.db.list_queries] == [MAX_USERS_BYTES, None]


async def test_later_pages_carry_the_first_pages_total() -> None:
    h = user_service()
    populate(h, 4)
    first = await list_page(h, page_size=2)
    h.db.insert("late@example.com")
    second = await list_page(h, page_size=2, page_token=first.next_page_token)
    assert (first.total_size, second.total_size) == (4, 4)


async def test_the_last_page_has_no_next_token() -> None:
    h = user_service()
    populate(h, 2)
    page = await list_page(h, page_size=2)
    assert page.next_page_token == ""


async def test_filter_order_by_and_page_size_problems_are_reported_together() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await list_page(h, page_size=-5, filter="bogus = 1", order_by="height")
    assert fields_of(caught.value) == ["page_size", "filter", "order_by"]


async def test_a_page_token_used_with_another_filter_is_refused() -> None:
    h = user_service()
    populate(h, 3)
    first = await list_page(h, page_size=1, filter='email:"user"')
    with pytest.raises(InvalidArgument) as caught:
        await list_page(h, page_size=1, filter='email:"use"', page_token=first.next_page_token)
    assert fields_of(caught.value) == ["page_token"]


async def test_a_page_token_survives_respelling_the_same_filter() -> None:
    h = user_service()
    users = populate(h, 3)
    first = await list_page(h, page_size=2, filter='email:"user"')
    second = await list_page(
        h, page_size=2, filter='  email : "user"', page_token=first.next_page_token
    )
    assert second.users == (users[2],)


async def test_a_page_token_used_with_another_order_is_refused() -> None:
    h = user_service()
    populate(h, 3)
    first = await list_page(h, page_size=1)
    with pytest.raises(InvalidArgument):
        await list_page(h, page_size=1, order_by="email", page_token=first.next_page_token)


async def test_a_garbage_page_token_is_an_invalid_argument() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await list_page(h, page_token="garbage!")
    assert fields_of(caught.value) == ["page_token"]


async def test_services_may_not_show_deleted_users() -> None:
    h = user_service()
    with pytest.raises(PermissionDenied):
        await list_page(h, as_service_account(), show_deleted=True)


@pytest.mark.parametrize("principal", [ANONYMOUS, as_user(uuid.uuid4())])
async def test_users_may_not_list(principal: Principal) -> None:
    h = user_service()
    with pytest.raises(PermissionDenied):
        await list_page(h, principal)


async def test_services_list_users() -> None:
    h = user_service()
    populate(h, 2)
    assert (await list_page(h, as_mtls_service())).total_size == 2
