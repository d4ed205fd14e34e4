"""UserService.ListUsers end to end: filters, ordering, paging, show_deleted."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import pytest_asyncio

from .helpers import (
    Caller,
    World,
    expect_denied,
    expect_invalid,
    new_email,
    user_pb2,
    user_service_pb2,
)


def list_request(**fields: object) -> user_service_pb2.ListUsersRequest:
    return user_service_pb2.ListUsersRequest(**fields)  # type: ignore[arg-type]


async def list_all(caller: Caller, **fields: object) -> list[user_pb2.User]:
    """Every page of a listing, in order."""
    users: list[user_pb2.User] = []
    token = ""
    for _ in range(1000):
        page = await caller.users.ListUsers(list_request(page_token=token, **fields))
        users.extend(page.users)
        token = page.next_page_token
        if not token:
            return users
    raise AssertionError("listing did not end")


@dataclass
class Cast:
    """World users plus carol (payments), dave (disabled) and erin (deleted)."""

    world: World
    users: dict[str, user_pb2.User]

    def emails(self, *names: str) -> set[str]:
        return {self.users[name].email for name in names}

    def live_except(self, *names: str) -> set[str]:
        return self.emails(*(n for n in self.users if n not in {*names, "erin"}))

    def stamp(self, name: str) -> str:
        return self.users[name].create_time.ToJsonString()


@pytest_asyncio.fixture(loop_scope="session")
async def cast(world: World) -> Cast:
    admin = world.admin.users
    carol_id, _, _ = await world.seed_user(
        email=new_email("carol", "payments.example.org"),
        display_name="Carol",
        labels={"team": "payments"},
    )
    dave_id, _, _ = await world.seed_user(
        email=new_email("dave", "example.org"), display_name="Dave", labels={"team": "search"}
    )
    erin_id, _, _ = await world.seed_user(email=new_email("erin"), display_name="Erin")
    await admin.DisableUser(user_service_pb2.DisableUserRequest(id=dave_id))
    await admin.DeleteUser(user_service_pb2.DeleteUserRequest(id=erin_id))
    users = {}
    for name, user_id in (
        ("admin", world.admin.id),
        ("service", world.service.id),
        ("alice", world.alice.id),
        ("bob", world.bob.id),
        ("carol", carol_id),
        ("dave", dave_id),
        ("erin", erin_id),
    ):
        users[name] = await world.get_as_admin(user_id)
    return Cast(world, users)


FILTERS: list[tuple[str, str, tuple[str, ...] | str]] = [
    # (id, filter, expected names; "live-but:<names>" means every live user but those)
    ("email-equals", 'email = "{carol_email}"', ("carol",)),
    ("email-not-equals", 'email != "{carol_email}"', "live-but:carol"),
    ("email-contains", 'email:"@payments.example.org"', ("carol",)),
    ("display-name-equals", 'display_name = "Dave"', ("dave",)),
    ("display-name-contains", 'display_name:"ave"', ("dave",)),
    ("display-name-greater", 'display_name > "C"', ("carol", "dave", "service")),
    ("display-name-at-most", 'display_name <= "Bob"', ("admin", "alice", "bob")),
    ("display-name-less", 'display_name < "Alice"', ("admin",)),
    ("display-name-at-least", 'display_name >= "Dave"', ("dave", "service")),
    ("state-equals", "state = STATE_DISABLED", ("dave",)),
    ("state-not-equals", "state != STATE_DISABLED", "live-but:dave"),
    ("roles-has-admin", 'roles:"admin"', ("admin",)),
    ("roles-has-service", 'roles:"service"', ("service",)),
    ("label-equals", 'labels.team = "payments"', ("carol",)),
    ("label-present", "labels.team:*", ("carol", "dave")),
    ("create-time-after", 'create_time > "{carol_time}"', ("dave",)),
    ("create-time-at-or-after", 'create_time >= "{carol_time}"', ("carol", "dave")),
    ("create-time-before", 'create_time < "{alice_time}"', ("admin", "service")),
    ("create-time-at-or-before", 'create_time <= "{alice_time}"', ("admin", "service", "alice")),
    ("and", 'state = STATE_ACTIVE AND email:"example.org"', ("carol",)),
    ("and-three", 'roles:"user" AND labels.team:* AND display_name != "Carol"', ("dave",)),
]


@pytest.mark.parametrize(
    ("filter_template", "expected"), [f[1:] for f in FILTERS], ids=[f[0] for f in FILTERS]
)
async def test_filter_selects_exactly_the_matching_users(
    cast: Cast, filter_template: str, expected: tuple[str, ...] | str
) -> None:
    text = filter_template.format(
        carol_email=cast.users["carol"].email,
        carol_time=cast.stamp("carol"),
        alice_time=cast.stamp("alice"),
    )
    if isinstance(expected, str):
        wanted = cast.live_except(*expected.removeprefix("live-but:").split(","))
    else:
        wanted = cast.emails(*expected)

    users = await list_all(cast.world.admin, filter=text, page_size=100)

    assert {u.email for u in users} == wanted


BAD_FILTERS = [
    ("dangling-operator", "email ="),
    ("unbalanced-quote", 'email = "x'),
    ("unknown-field", 'password = "x"'),
    ("unknown-state", "state = STATE_BOGUS"),
    ("unparseable-time", 'create_time > "yesterday"'),
    ("or-is-not-supported", 'email = "a@example.com" OR email = "b@example.com"'),
    ("unquoted-string", "email = bob"),
    ("sql-looking", "email = ''; DROP TABLE users; --"),
    ("too-long", 'display_name = "' + "x" * 2050 + '"'),
]


@pytest.mark.parametrize("text", [f[1] for f in BAD_FILTERS], ids=[f[0] for f in BAD_FILTERS])
async def test_a_filter_it_cannot_parse_is_invalid_argument_naming_filter(
    world: World, text: str
) -> None:
    await expect_invalid(world.admin.users.ListUsers(list_request(filter=text)), "filter")


ORDERINGS = [
    ("", "create_time", False),
    ("create_time", "create_time", False),
    ("create_time desc", "create_time", True),
    ("email", "email", False),
    ("email desc", "email", True),
    ("display_name", "display_name", False),
    ("display_name desc", "display_name", True),
]


@pytest.mark.parametrize(
    ("order_by", "key", "descending"), ORDERINGS, ids=[o[0] or "default" for o in ORDERINGS]
)
async def test_order_by_sorts_the_listing(
    world: World, order_by: str, key: str, descending: bool
) -> None:
    # Creation order, email order and name order all differ.
    for prefix, name in (("zz", "Amy"), ("aa", "Zed"), ("mm", "Kim")):
        await world.seed_user(email=new_email(prefix), display_name=name)

    users = await list_all(world.admin, order_by=order_by, page_size=3)

    def sort_key(user: user_pb2.User) -> tuple[object, str]:
        if key == "create_time":
            return (user.create_time.ToNanoseconds(), user.id)
        return (getattr(user, key), user.id)

    assert len(users) == 7
    assert users == sorted(users, key=sort_key, reverse=descending)


@pytest.mark.parametrize("order_by", ["password", "email upward", "state", "email desc desc"])
async def test_unknown_order_by_is_invalid_argument_naming_order_by(
    world: World, order_by: str
) -> None:
    await expect_invalid(world.admin.users.ListUsers(list_request(order_by=order_by)), "order_by")


async def test_pages_together_hold_every_user_once_and_the_last_has_no_token(
    world: World,
) -> None:
    for _ in range(3):
        await world.seed_user()

    users = await list_all(world.service, page_size=2)

    assert len(users) == 7
    assert len({u.id for u in users}) == 7


async def test_total_size_counts_every_match_not_just_the_page(world: World) -> None:
    page = await world.admin.users.ListUsers(list_request(page_size=1))

    assert len(page.users) == 1
    assert page.total_size == 4
    assert page.next_page_token


async def test_total_size_counts_only_matches_of_the_filter(world: World) -> None:
    page = await world.admin.users.ListUsers(list_request(filter='roles:"admin"', page_size=1))

    assert page.total_size == 1
    assert not page.next_page_token


async def test_negative_page_size_is_invalid_argument(world: World) -> None:
    await expect_invalid(world.admin.users.ListUsers(list_request(page_size=-1)), "page_size")


async def test_page_token_reused_with_another_filter_is_invalid_argument(world: World) -> None:
    first = await world.admin.users.ListUsers(list_request(page_size=1))

    await expect_invalid(
        world.admin.users.ListUsers(
            list_request(page_size=1, page_token=first.next_page_token, filter='roles:"user"')
        ),
        "page_token",
    )


async def test_page_token_reused_with_another_order_is_invalid_argument(world: World) -> None:
    first = await world.admin.users.ListUsers(list_request(page_size=1, order_by="email"))

    await expect_invalid(
        world.admin.users.ListUsers(
            list_request(page_size=1, page_token=first.next_page_token, order_by="email desc")
        ),
        "page_token",
    )


async def test_page_token_reused_with_show_deleted_flipped_is_invalid_argument(
    world: World,
) -> None:
    first = await world.admin.users.ListUsers(list_request(page_size=1))

    await expect_invalid(
        world.admin.users.ListUsers(
            list_request(page_size=1, page_token=first.next_page_token, show_deleted=True)
        ),
        "page_token",
    )


async def test_garbled_page_token_is_invalid_argument(world: World) -> None:
    await expect_invalid(
        world.admin.users.ListUsers(list_request(page_token="definitely-not-a-token")),
        "page_token",
    )


async def test_page_token_may_be_reused_with_another_page_size(world: World) -> None:
    first = await world.admin.users.ListUsers(list_request(page_size=1))

    rest = await world.admin.users.ListUsers(
        list_request(page_size=10, page_token=first.next_page_token)
    )

    assert len(rest.users) == 3
    assert first.users[0].id not in {u.id for u in rest.users}


async def test_deleted_users_are_left_out_of_listings(world: World) -> None:
    await world.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=world.bob.id))

    users = await list_all(world.admin, page_size=100)

    assert world.bob.id not in {u.id for u in users}


async def test_admin_listing_with_show_deleted_includes_deleted_users(world: World) -> None:
    await world.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=world.bob.id))

    users = await list_all(world.admin, page_size=100, show_deleted=True)

    by_id = {u.id: u for u in users}
    assert by_id[world.bob.id].state == user_pb2.User.STATE_DELETED
    assert len(by_id) == 4


async def test_service_listing_with_show_deleted_is_permission_denied(world: World) -> None:
    await expect_denied(world.service.users.ListUsers(list_request(show_deleted=True)))


@pytest.mark.parametrize("needle", ["%", "_", "\\\\"])
async def test_contains_treats_wildcard_characters_literally(world: World, needle: str) -> None:
    users = await list_all(world.admin, filter=f'display_name:"{needle}"', page_size=100)

    assert users == []


async def test_contains_finds_a_literal_percent_sign(world: World) -> None:
    user_id, _, _ = await world.seed_user(display_name="100% sure")

    users = await list_all(world.admin, filter='display_name:"0%"', page_size=100)

    assert [u.id for u in users] == [user_id]


async def test_escaped_quotes_in_a_string_literal_match_literally(world: World) -> None:
    user_id, _, _ = await world.seed_user(display_name='Say "hi"')

    users = await list_all(world.admin, filter='display_name = "Say \\"hi\\""', page_size=100)

    assert [u.id for u in users] == [user_id]


async def test_state_deleted_filter_with_show_deleted_lists_only_deleted_users(
    world: World,
) -> None:
    await world.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=world.bob.id))

    users = await list_all(
        world.admin, filter="state = STATE_DELETED", show_deleted=True, page_size=100
    )

    assert [u.id for u in users] == [world.bob.id]
