"""Role changes and privilege: a change of roles ends the user's sessions, and
a token that claims more than the user's current roles grants nothing, even
before any revocation of it has arrived."""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from .conftest import RunningServer
from .helpers import (
    World,
    auth_service_pb2,
    expect_error,
    user_pb2,
    user_service_pb2,
)


def set_roles(user_id: str, *roles: str) -> user_service_pb2.UpdateUserRequest:
    return user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=user_id, roles=list(roles)),
        update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
    )


def rename(user_id: str, name: str, *, etag: str = "") -> user_service_pb2.UpdateUserRequest:
    return user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=user_id, display_name=name, etag=etag),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )


async def test_a_role_change_ends_every_session_of_the_user(world: World) -> None:
    promoted = await world.account("promoted")
    await world.admin.users.UpdateUser(set_roles(promoted.id, "user", "service"))

    await expect_error(
        promoted.users.GetUser(user_service_pb2.GetUserRequest(id="me")),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    introspected = await world.service.auth.IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token=promoted.token)
    )
    assert not introspected.active


async def test_an_admin_demoting_itself_cannot_take_the_role_back_with_its_old_token(
    world: World,
) -> None:
    admin = await world.account("self-demoting", roles=("user", "admin"))
    await admin.users.UpdateUser(set_roles(admin.id, "user"))

    await expect_error(
        admin.users.UpdateUser(set_roles(admin.id, "user", "admin")),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    assert list((await world.get_as_admin(admin.id)).roles) == ["user"]


async def test_an_admin_token_grants_nothing_once_the_database_no_longer_says_admin(
    world: World, primary: RunningServer
) -> None:
    # The role is taken away behind the service's back: no session is
    # revoked, so only the check against the stored roles can refuse.
    admin = await world.account("quietly-demoted", roles=("user", "admin"))
    await admin.users.ListUsers(user_service_pb2.ListUsersRequest(page_size=1))
    async with primary.container.engine.begin() as connection:
        await connection.execute(
            text("UPDATE users SET roles = ARRAY['user'] WHERE id = CAST(:id AS uuid)"),
            {"id": admin.id},
        )

    before = await world.get_as_admin(world.alice.id)
    for call in (
        admin.users.ListUsers(user_service_pb2.ListUsersRequest(page_size=1)),
        admin.users.UpdateUser(set_roles(admin.id, "user", "admin")),
        # ... and UpdateUser's own write refuses itself (display_name: the
        # write lane's one statement, which reads the caller's roles too).
        admin.users.UpdateUser(rename(world.alice.id, "Renamed by a demoted admin")),
        admin.users.UpdateUser(rename(world.alice.id, "Renamed", etag=before.etag)),
        admin.users.UpdateUser(rename(str(uuid.uuid4()), "Nobody")),
        # The plain reads check the stored roles in their own statement...
        admin.users.LookupUser(user_service_pb2.LookupUserRequest(email=world.alice.email)),
        admin.users.GetUser(user_service_pb2.GetUserRequest(id=world.alice.id)),
        admin.users.BatchGetUsers(user_service_pb2.BatchGetUsersRequest(ids=[world.alice.id])),
        # ... and one that ends before its read is checked all the same.
        admin.users.LookupUser(user_service_pb2.LookupUserRequest(email="not an email")),
    ):
        await expect_error(call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    introspected = await world.service.auth.IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token=admin.token)
    )
    assert not introspected.active
    assert list((await world.get_as_admin(admin.id)).roles) == ["user"]
    assert await world.get_as_admin(world.alice.id) == before


async def test_a_create_with_an_admin_token_the_database_no_longer_backs_writes_nothing(
    world: World, primary: RunningServer
) -> None:
    # CreateUser settles the re-check in its own write: refused, it must
    # have written no user (with or without an idempotency key).
    admin = await world.account("demoted-creator", roles=("user", "admin"))
    async with primary.container.engine.begin() as connection:
        await connection.execute(
            text("UPDATE users SET roles = ARRAY['user'] WHERE id = CAST(:id AS uuid)"),
            {"id": admin.id},
        )

    emails = ["by-demoted-1@example.com", "by-demoted-2@example.com"]
    for email, request_id, roles in ((emails[0], "", ["admin"]), (emails[1], "req-demoted", [])):
        await expect_error(
            admin.users.CreateUser(
                user_service_pb2.CreateUserRequest(
                    email=email,
                    password="correct horse battery staple",
                    roles=roles,
                    request_id=request_id,
                )
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )
    for email in emails:
        await expect_error(
            world.admin.users.LookupUser(user_service_pb2.LookupUserRequest(email=email)),
            grpc.StatusCode.NOT_FOUND,
            "USER_NOT_FOUND",
        )


async def test_an_admin_token_the_database_backs_creates_users_with_roles(world: World) -> None:
    admin = await world.account("backed-creator", roles=("user", "admin"))
    created = await admin.users.CreateUser(
        user_service_pb2.CreateUserRequest(
            email="made-admin@example.com",
            password="correct horse battery staple",
            roles=["user", "admin"],
        )
    )
    assert sorted(created.user.roles) == ["admin", "user"]
    assert (await world.get_as_admin(created.user.id)).email == "made-admin@example.com"


async def test_introspection_of_a_plain_users_token_reports_the_current_roles(
    world: World,
) -> None:
    introspected = await world.service.auth.IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token=world.alice.token)
    )
    assert introspected.active
    assert list(introspected.roles) == ["user"]


async def test_a_role_change_in_a_batch_update_ends_that_users_sessions_only(
    world: World,
) -> None:
    promoted = await world.account("batch-promoted")
    renamed = await world.account("batch-renamed")
    await world.admin.users.BatchUpdateUsers(
        user_service_pb2.BatchUpdateUsersRequest(
            requests=[
                set_roles(promoted.id, "user", "admin"),
                user_service_pb2.UpdateUserRequest(
                    user=user_pb2.User(id=renamed.id, display_name="Renamed"),
                    update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                ),
            ]
        )
    )

    await expect_error(
        promoted.users.GetUser(user_service_pb2.GetUserRequest(id="me")),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    assert (await renamed.users.GetUser(user_service_pb2.GetUserRequest(id="me"))).user.id
