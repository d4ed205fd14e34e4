"""UserService.GetUser, LookupUser and BatchGetUsers end to end."""

from __future__ import annotations

import random

from .helpers import (
    World,
    expect_invalid,
    expect_not_found,
    missing_id,
    user_service_pb2,
)


def get(user_id: str) -> user_service_pb2.GetUserRequest:
    return user_service_pb2.GetUserRequest(id=user_id)


def lookup(email: str) -> user_service_pb2.LookupUserRequest:
    return user_service_pb2.LookupUserRequest(email=email)


def batch_get(*ids: str) -> user_service_pb2.BatchGetUsersRequest:
    return user_service_pb2.BatchGetUsersRequest(ids=list(ids))


async def test_user_reads_itself_by_id(world: World) -> None:
    user = (await world.alice.users.GetUser(get(world.alice.id))).user

    assert user.id == world.alice.id
    assert user.email == world.alice.email


async def test_me_names_the_caller(world: World) -> None:
    user = (await world.bob.users.GetUser(get("me"))).user

    assert user.id == world.bob.id


async def test_me_names_the_calling_service_account(world: World) -> None:
    user = (await world.service.users.GetUser(get("me"))).user

    assert user.id == world.service.id


async def test_service_reads_any_user(world: World) -> None:
    user = (await world.service.users.GetUser(get(world.alice.id))).user

    assert user.email == world.alice.email


async def test_get_of_a_missing_user_is_not_found(world: World) -> None:
    await expect_not_found(world.admin.users.GetUser(get(missing_id())))


async def test_get_with_a_malformed_id_is_invalid_argument_naming_id(world: World) -> None:
    await expect_invalid(world.admin.users.GetUser(get("not-a-uuid")), "id")


async def test_get_with_an_empty_id_is_invalid_argument_naming_id(world: World) -> None:
    await expect_invalid(world.admin.users.GetUser(get("")), "id")


async def test_lookup_finds_a_user_by_email(world: World) -> None:
    user = (await world.service.users.LookupUser(lookup(world.alice.email))).user

    assert user.id == world.alice.id


async def test_lookup_ignores_the_case_of_the_email(world: World) -> None:
    user = (await world.admin.users.LookupUser(lookup(world.alice.email.upper()))).user

    assert user.id == world.alice.id


async def test_lookup_of_an_unknown_email_is_not_found(world: World) -> None:
    await expect_not_found(world.admin.users.LookupUser(lookup("nobody@example.com")))


async def test_lookup_with_an_empty_email_is_invalid_argument(world: World) -> None:
    await expect_invalid(world.admin.users.LookupUser(lookup("")), "email")


async def test_batch_get_returns_users_in_request_order(world: World) -> None:
    ids = [world.alice.id, world.admin.id, world.bob.id, world.service.id]
    random.Random(7).shuffle(ids)

    users = (await world.service.users.BatchGetUsers(batch_get(*ids))).users

    assert [u.id for u in users] == ids


async def test_batch_get_with_one_missing_id_is_not_found(world: World) -> None:
    await expect_not_found(world.admin.users.BatchGetUsers(batch_get(world.alice.id, missing_id())))


async def test_batch_get_with_a_malformed_id_is_invalid_argument(world: World) -> None:
    failure = await expect_invalid(
        world.admin.users.BatchGetUsers(batch_get(world.alice.id, "garbage"))
    )

    assert all(name.startswith("ids") for name in failure.violation_fields)


async def test_batch_get_with_no_ids_is_invalid_argument(world: World) -> None:
    await expect_invalid(world.admin.users.BatchGetUsers(batch_get()), "ids")


async def test_batch_get_of_more_than_1000_ids_is_invalid_argument(world: World) -> None:
    ids = [missing_id() for _ in range(1001)]

    await expect_invalid(world.admin.users.BatchGetUsers(batch_get(*ids)), "ids")
