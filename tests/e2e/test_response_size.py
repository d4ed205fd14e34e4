"""No response grows past the 4 MiB a default gRPC client accepts, with
1000 users carrying the most labels an admin may give them: ListUsers
returns shorter pages (with a next_page_token), BatchGetUsers refuses with a
clear message, and repeated ids are refused. Anonymous sign-ups and users
editing themselves stay within a small label budget.

The channels here are grpc's defaults (max_receive_message_length 4 MiB):
a larger response would fail on the client as RESOURCE_EXHAUSTED."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest_asyncio

from .conftest import RunningServer
from .helpers import (
    Account,
    ResponseRecorder,
    World,
    create_request,
    expect_invalid,
    user_pb2,
    user_service_pb2,
)

HEAVY_USERS = 1000
MAX_LABELS = 64
MAX_KEY = 63
MAX_VALUE = 256
FOUR_MIB = 4 * 1024 * 1024


def maximal_labels(seed: str) -> dict[str, str]:
    return {
        f"k{index:02d}{seed}".ljust(MAX_KEY, "x")[:MAX_KEY]: secrets.token_hex(MAX_VALUE // 2)
        for index in range(MAX_LABELS)
    }


@dataclass
class Heavy:
    admin: Account
    domain: str
    ids: list[str]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def heavy(primary: RunningServer, recorder: ResponseRecorder) -> Heavy:
    """1000 users with 64 labels of 63-character keys and 256-character
    values (about 21 KB each, 21 MB together), seeded through the service
    layer in batches."""
    from usersvc.domain.models import ROLE_ADMIN, Principal, PrincipalKind
    from usersvc.services.inputs import CreateUserInput

    world = World(
        user_service=primary.container.user_service, channel=primary.channel, recorder=recorder
    )
    admin = await world.account("sizer", roles=("user", "admin"))
    operator = Principal(kind=PrincipalKind.SERVICE, subject="e2e", roles=frozenset({ROLE_ADMIN}))
    domain = f"heavy-{secrets.token_hex(4)}.example.com"
    password = "Heavy-" + secrets.token_hex(8)
    recorder.secrets.add(password)
    ids: list[str] = []
    for start in range(0, HEAVY_USERS, 250):
        users = await primary.container.user_service.batch_create_users(
            principal=operator,
            request_id="",
            requests=[
                CreateUserInput(
                    email=f"u{index:04d}@{domain}",
                    password=password,
                    display_name="N" * 200,
                    roles=("user",),
                    labels=maximal_labels(f"{index:04d}"),
                )
                for index in range(start, start + 250)
            ],
        )
        ids.extend(str(user.id) for user in users)
    return Heavy(admin, domain, ids)


def listing(heavy: Heavy, token: str = "") -> user_service_pb2.ListUsersRequest:
    return user_service_pb2.ListUsersRequest(
        page_size=1000, filter=f'email:"@{heavy.domain}"', page_token=token
    )


async def test_a_page_of_1000_heavy_users_is_cut_below_4_mib_with_a_token(heavy: Heavy) -> None:
    page = await heavy.admin.users.ListUsers(listing(heavy))
    size = page.ByteSize()
    print(f"first ListUsers page: {len(page.users)} users, {size} bytes")
    assert size < FOUR_MIB
    assert 0 < len(page.users) < HEAVY_USERS
    assert page.next_page_token
    assert page.total_size == HEAVY_USERS


async def test_walking_the_short_pages_lists_every_heavy_user_once(heavy: Heavy) -> None:
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await heavy.admin.users.ListUsers(listing(heavy, token))
        assert page.ByteSize() < FOUR_MIB
        seen.extend(user.id for user in page.users)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    print(f"{HEAVY_USERS} heavy users in {pages} pages")
    assert sorted(seen) == sorted(heavy.ids)


async def test_batch_get_of_1000_heavy_users_is_refused_with_a_clear_message(
    heavy: Heavy,
) -> None:
    failure = await expect_invalid(
        heavy.admin.users.BatchGetUsers(user_service_pb2.BatchGetUsersRequest(ids=heavy.ids)),
        "ids",
    )
    assert "4 MiB" in failure.details
    assert "fewer ids" in failure.details


async def test_batch_get_of_as_many_heavy_users_as_fit_answers(heavy: Heavy) -> None:
    response = await heavy.admin.users.BatchGetUsers(
        user_service_pb2.BatchGetUsersRequest(ids=heavy.ids[:150])
    )
    assert [user.id for user in response.users] == heavy.ids[:150]
    assert response.ByteSize() < FOUR_MIB


async def test_batch_get_repeating_one_id_is_refused_naming_the_repeats(heavy: Heavy) -> None:
    failure = await expect_invalid(
        heavy.admin.users.BatchGetUsers(
            user_service_pb2.BatchGetUsersRequest(ids=[heavy.ids[0]] * 1000)
        )
    )
    assert failure.violation_fields[0] == "ids[1]"
    assert "repeats ids[0]" in failure.bad_requests[0].field_violations[0].description


# -- label budget of self-service callers -------------------------------------------


async def test_anonymous_sign_up_may_not_carry_more_than_16_labels(
    world: World, recorder: ResponseRecorder
) -> None:
    labels = {f"k{index}": "v" for index in range(17)}
    failure = await expect_invalid(
        world.anonymous.users.CreateUser(create_request(recorder, labels=labels)), "labels"
    )
    assert "16" in failure.details or "16" in str(failure.bad_requests)


async def test_anonymous_sign_up_may_not_carry_more_than_4_kib_of_labels(
    world: World, recorder: ResponseRecorder
) -> None:
    labels = {f"k{index}": "v" * MAX_VALUE for index in range(16)}
    await expect_invalid(
        world.anonymous.users.CreateUser(create_request(recorder, labels=labels)), "labels"
    )


async def test_anonymous_sign_up_within_the_budget_is_accepted(
    world: World, recorder: ResponseRecorder
) -> None:
    labels = {f"k{index}": "v" * 200 for index in range(16)}
    response = await world.anonymous.users.CreateUser(create_request(recorder, labels=labels))
    assert dict(response.user.labels) == labels


async def test_a_user_may_not_give_itself_maximal_labels(world: World) -> None:
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=world.alice.id, labels=maximal_labels("self")),
        update_mask={"paths": ["labels"]},
    )
    await expect_invalid(world.alice.users.UpdateUser(request), "user.labels")


async def test_admins_and_services_keep_the_full_label_limits(
    world: World, recorder: ResponseRecorder
) -> None:
    for caller in (world.admin, world.service):
        labels = maximal_labels(caller.name[:4])
        response = await caller.users.CreateUser(create_request(recorder, labels=labels))
        assert dict(response.user.labels) == labels
