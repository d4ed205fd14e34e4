"""BatchCreateUsers (atomic, ordered, bounded) and request_id idempotency,
including a retry that lands on another replica."""

from __future__ import annotations

import asyncio
import secrets

import grpc

from .conftest import RunningServer
from .helpers import (
    Caller,
    World,
    create_request,
    expect_error,
    expect_invalid,
    new_email,
    user_service_pb2,
)


def batch(
    world: World, emails: list[str], request_id: str = ""
) -> user_service_pb2.BatchCreateUsersRequest:
    return user_service_pb2.BatchCreateUsersRequest(
        requests=[create_request(world.recorder, email=email) for email in emails],
        request_id=request_id,
    )


async def count_users(world: World, filter_text: str = "") -> int:
    page = await world.admin.users.ListUsers(
        user_service_pb2.ListUsersRequest(filter=filter_text, page_size=1)
    )
    return page.total_size


def email_filter(email: str) -> str:
    return f'email = "{email}"'


def request_id() -> str:
    return f"req-{secrets.token_hex(8)}"


# ----------------------------------------------------------------- batch create


async def test_batch_create_returns_the_users_in_request_order(world: World) -> None:
    emails = [new_email(prefix) for prefix in ("zulu", "alpha", "mike", "bravo")]

    users = (await world.service.users.BatchCreateUsers(batch(world, emails))).users

    assert [u.email for u in users] == emails
    assert len({u.id for u in users}) == 4


async def test_batch_created_users_can_log_in(world: World) -> None:
    request = batch(world, [new_email("batch")])

    await world.admin.users.BatchCreateUsers(request)

    login = await world.login(request.requests[0].email, request.requests[0].password)
    assert login.user.email == request.requests[0].email


async def test_batch_with_one_bad_email_creates_nothing_and_names_the_item(
    world: World,
) -> None:
    emails = [new_email("ok1"), new_email("ok2"), "broken", new_email("ok3")]

    await expect_invalid(
        world.admin.users.BatchCreateUsers(batch(world, emails)), "requests[2].email"
    )

    assert await count_users(world) == 4


async def test_batch_with_one_weak_password_creates_nothing(world: World) -> None:
    request = batch(world, [new_email("a"), new_email("b")])
    request.requests[1].password = "password"

    await expect_error(
        world.admin.users.BatchCreateUsers(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEAK_PASSWORD",
        fields=["requests[1].password"],
    )

    assert await count_users(world) == 4


async def test_batch_with_an_email_already_taken_creates_nothing(world: World) -> None:
    emails = [new_email("fresh"), world.alice.email]

    await expect_error(
        world.admin.users.BatchCreateUsers(batch(world, emails)),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )

    assert await count_users(world, email_filter(emails[0])) == 0


async def test_batch_repeating_an_email_is_invalid_argument_naming_the_repeat(
    world: World,
) -> None:
    email = new_email("twice")

    await expect_invalid(
        world.admin.users.BatchCreateUsers(batch(world, [email, email.upper()])),
        "requests[1].email",
    )

    assert await count_users(world) == 4


async def test_batch_of_more_than_1000_users_is_invalid_argument(world: World) -> None:
    emails = [f"bulk{i}@example.com" for i in range(1001)]

    await expect_invalid(world.admin.users.BatchCreateUsers(batch(world, emails)), "requests")

    assert await count_users(world) == 4


async def test_empty_batch_is_invalid_argument(world: World) -> None:
    await expect_invalid(world.admin.users.BatchCreateUsers(batch(world, [])), "requests")


async def test_batch_item_with_its_own_request_id_is_invalid_argument(world: World) -> None:
    request = batch(world, [new_email("x")])
    request.requests[0].request_id = request_id()

    await expect_invalid(world.admin.users.BatchCreateUsers(request), "requests[0].request_id")


async def test_service_batch_granting_admin_is_permission_denied(world: World) -> None:
    request = batch(world, [new_email("x")])
    request.requests[0].roles.append("admin")

    await expect_error(
        world.service.users.BatchCreateUsers(request),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


# ----------------------------------------------------------------- idempotency


async def test_create_retried_with_the_same_request_id_returns_the_first_user(
    world: World,
) -> None:
    request = create_request(world.recorder, request_id=request_id())

    first = (await world.anonymous.users.CreateUser(request)).user
    second = (await world.anonymous.users.CreateUser(request)).user

    assert second == first


async def test_create_retried_with_the_same_request_id_stores_one_user(world: World) -> None:
    request = create_request(world.recorder, request_id=request_id())

    await world.admin.users.CreateUser(request)
    await world.admin.users.CreateUser(request)

    assert await count_users(world, email_filter(request.email)) == 1


async def test_request_id_reused_with_another_body_is_invalid_argument(world: World) -> None:
    key = request_id()
    await world.admin.users.CreateUser(create_request(world.recorder, request_id=key))

    await expect_invalid(
        world.admin.users.CreateUser(create_request(world.recorder, request_id=key)),
        "request_id",
    )


async def test_create_without_request_id_twice_is_a_conflict_not_a_replay(world: World) -> None:
    request = create_request(world.recorder)
    await world.admin.users.CreateUser(request)

    await expect_error(
        world.admin.users.CreateUser(request),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )


async def test_batch_retried_with_the_same_request_id_returns_the_first_users(
    world: World,
) -> None:
    request = batch(world, [new_email("b1"), new_email("b2")], request_id=request_id())

    first = (await world.admin.users.BatchCreateUsers(request)).users
    second = (await world.admin.users.BatchCreateUsers(request)).users

    assert list(second) == list(first)
    assert await count_users(world) == 6


async def test_retry_on_another_replica_returns_the_first_user(
    world: World, replica: RunningServer
) -> None:
    request = create_request(world.recorder, request_id=request_id())
    first = (await world.anonymous.users.CreateUser(request)).user

    again = (await Caller(replica.channel, None).users.CreateUser(request)).user

    assert again == first
    assert await count_users(world, email_filter(request.email)) == 1


async def test_concurrent_retries_on_two_replicas_create_one_user(
    world: World, replica: RunningServer
) -> None:
    request = create_request(world.recorder, request_id=request_id())
    here = world.admin.users.CreateUser(request)
    there = Caller(replica.channel, world.admin.token).users.CreateUser(request)

    first, second = await asyncio.gather(here, there)

    assert first.user == second.user
    assert await count_users(world, email_filter(request.email)) == 1


async def test_failed_create_does_not_burn_its_request_id(world: World) -> None:
    key = request_id()
    taken = create_request(world.recorder, email=world.alice.email, request_id=key)
    await expect_error(
        world.admin.users.CreateUser(taken),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )
    await world.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=world.alice.id))
    await world.admin.users.PurgeUser(user_service_pb2.PurgeUserRequest(id=world.alice.id))

    user = (await world.admin.users.CreateUser(taken)).user

    assert user.email == world.alice.email
