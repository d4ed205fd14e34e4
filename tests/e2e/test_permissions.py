"""Who may call what: every RPC against every kind of caller, as docs/api.md's
"who may call" column says. A caller without permission is refused whether
or not the target exists."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from .conftest import RunningServer
from .helpers import (
    Caller,
    World,
    auth_service_pb2,
    create_request,
    expect_denied,
    expect_error,
    expect_token_invalid,
    missing_id,
    new_password,
    user_pb2,
    user_service_pb2,
)

OK, DENIED, UNAUTHENTICATED = "allowed", "denied", "unauthenticated"
KINDS = ("anonymous", "user-self", "user-other", "service", "admin")


@dataclass(frozen=True)
class Target:
    """The user an RPC acts on."""

    id: str
    email: str
    password: str


def cast_for(world: World, kind: str) -> tuple[Caller, Target]:
    caller: Caller = {
        "anonymous": world.anonymous,
        "user-self": world.alice,
        "user-other": world.alice,
        "service": world.service,
        "admin": world.admin,
    }[kind]
    victim = world.alice if kind == "user-self" else world.bob
    return caller, Target(victim.id, victim.email, victim.password)


Invoke = Callable[[World, Caller, Target], Awaitable[Any]]
Prepare = Callable[[World, Target, str], Awaitable[None]]


async def nothing(world: World, target: Target, kind: str) -> None:
    return None


async def deleted_unless_self(world: World, target: Target, kind: str) -> None:
    # Undelete needs a deleted target to be allowed at all; a deleted user
    # cannot call, so the self case is tried on a live one.
    if kind != "user-self":
        await world.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=target.id))


async def disabled_unless_self(world: World, target: Target, kind: str) -> None:
    if kind != "user-self":
        await world.admin.users.DisableUser(user_service_pb2.DisableUserRequest(id=target.id))


def change_password(world: World, caller: Caller, target: Target) -> Awaitable[Any]:
    # Everyone but an admin acting on someone else proves the current password,
    # so a refusal can only be about who is calling.
    current = "" if caller is world.admin else target.password
    return caller.users.ChangePassword(
        user_service_pb2.ChangePasswordRequest(
            id=target.id, current_password=current, new_password=new_password(world.recorder)
        )
    )


def rename(world: World, caller: Caller, target: Target) -> Awaitable[Any]:
    return caller.users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=target.id, display_name="Renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )


@dataclass(frozen=True)
class Rpc:
    invoke: Invoke
    expected: dict[str, str]
    prepare: Prepare = nothing


def admins_only(invoke: Invoke, prepare: Prepare = nothing) -> Rpc:
    return Rpc(
        invoke,
        {
            "anonymous": UNAUTHENTICATED,
            "user-self": DENIED,
            "user-other": DENIED,
            "service": DENIED,
            "admin": OK,
        },
        prepare,
    )


def readers(invoke: Invoke) -> Rpc:
    """Admins and services; users not even on themselves."""
    return Rpc(
        invoke,
        {
            "anonymous": UNAUTHENTICATED,
            "user-self": DENIED,
            "user-other": DENIED,
            "service": OK,
            "admin": OK,
        },
    )


def self_or_admin(invoke: Invoke) -> Rpc:
    return Rpc(
        invoke,
        {
            "anonymous": UNAUTHENTICATED,
            "user-self": OK,
            "user-other": DENIED,
            "service": DENIED,
            "admin": OK,
        },
    )


RPCS: dict[str, Rpc] = {
    "CreateUser": Rpc(
        lambda w, c, t: c.users.CreateUser(create_request(w.recorder)),
        {"anonymous": OK, "user-self": OK, "service": OK, "admin": OK},
    ),
    "GetUser": Rpc(
        lambda w, c, t: c.users.GetUser(user_service_pb2.GetUserRequest(id=t.id)),
        {
            "anonymous": UNAUTHENTICATED,
            "user-self": OK,
            "user-other": DENIED,
            "service": OK,
            "admin": OK,
        },
    ),
    "LookupUser": readers(
        lambda w, c, t: c.users.LookupUser(user_service_pb2.LookupUserRequest(email=t.email))
    ),
    "ListUsers": Rpc(
        lambda w, c, t: c.users.ListUsers(user_service_pb2.ListUsersRequest()),
        {"anonymous": UNAUTHENTICATED, "user-self": DENIED, "service": OK, "admin": OK},
    ),
    "BatchGetUsers": readers(
        lambda w, c, t: c.users.BatchGetUsers(user_service_pb2.BatchGetUsersRequest(ids=[t.id]))
    ),
    "BatchCreateUsers": Rpc(
        lambda w, c, t: c.users.BatchCreateUsers(
            user_service_pb2.BatchCreateUsersRequest(requests=[create_request(w.recorder)])
        ),
        {"anonymous": UNAUTHENTICATED, "user-self": DENIED, "service": OK, "admin": OK},
    ),
    "UpdateUser": self_or_admin(rename),
    "DeleteUser": self_or_admin(
        lambda w, c, t: c.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=t.id))
    ),
    "ChangePassword": self_or_admin(change_password),
    "UndeleteUser": admins_only(
        lambda w, c, t: c.users.UndeleteUser(user_service_pb2.UndeleteUserRequest(id=t.id)),
        deleted_unless_self,
    ),
    "PurgeUser": admins_only(
        lambda w, c, t: c.users.PurgeUser(user_service_pb2.PurgeUserRequest(id=t.id))
    ),
    "DisableUser": admins_only(
        lambda w, c, t: c.users.DisableUser(user_service_pb2.DisableUserRequest(id=t.id))
    ),
    "EnableUser": admins_only(
        lambda w, c, t: c.users.EnableUser(user_service_pb2.EnableUserRequest(id=t.id)),
        disabled_unless_self,
    ),
    "BatchUpdateUsers": admins_only(
        lambda w, c, t: c.users.BatchUpdateUsers(
            user_service_pb2.BatchUpdateUsersRequest(
                requests=[
                    user_service_pb2.UpdateUserRequest(
                        user=user_pb2.User(id=t.id, display_name="Renamed")
                    )
                ]
            )
        )
    ),
    "BatchDeleteUsers": admins_only(
        lambda w, c, t: c.users.BatchDeleteUsers(
            user_service_pb2.BatchDeleteUsersRequest(
                requests=[user_service_pb2.DeleteUserRequest(id=t.id)]
            )
        )
    ),
    "CreateEmailVerificationCode": readers(
        lambda w, c, t: c.users.CreateEmailVerificationCode(
            user_service_pb2.CreateEmailVerificationCodeRequest(id=t.id)
        )
    ),
    "CreatePasswordResetCode": readers(
        lambda w, c, t: c.users.CreatePasswordResetCode(
            user_service_pb2.CreatePasswordResetCodeRequest(email=t.email)
        )
    ),
    "Login": Rpc(
        lambda w, c, t: c.auth.Login(
            auth_service_pb2.LoginRequest(email=t.email, password=t.password)
        ),
        {"anonymous": OK, "user-self": OK, "service": OK, "admin": OK},
    ),
    "GetJwks": Rpc(
        lambda w, c, t: c.auth.GetJwks(auth_service_pb2.GetJwksRequest()),
        {"anonymous": OK, "user-self": OK, "service": OK, "admin": OK},
    ),
}

MATRIX = [
    pytest.param(rpc, kind, outcome, id=f"{rpc}-{kind}-{outcome}")
    for rpc, spec in RPCS.items()
    for kind, outcome in spec.expected.items()
]


@pytest.mark.parametrize(("rpc", "kind", "outcome"), MATRIX)
async def test_who_may_call_each_rpc(world: World, rpc: str, kind: str, outcome: str) -> None:
    spec = RPCS[rpc]
    caller, target = cast_for(world, kind)
    await spec.prepare(world, target, kind)

    call = spec.invoke(world, caller, target)

    if outcome == OK:
        await call
    elif outcome == DENIED:
        await expect_denied(call)
    else:
        await expect_token_invalid(call)


TARGETED_DENIALS = [
    pytest.param(rpc, kind, id=f"{rpc}-{kind}")
    for rpc, spec in RPCS.items()
    for kind, outcome in spec.expected.items()
    if outcome == DENIED and kind != "user-self"
]


@pytest.mark.parametrize(("rpc", "kind"), TARGETED_DENIALS)
async def test_denied_callers_are_denied_even_when_the_target_does_not_exist(
    world: World, rpc: str, kind: str
) -> None:
    caller, _ = cast_for(world, kind)
    ghost = Target(missing_id(), "ghost@example.com", "Ghost-password-1!")

    await expect_denied(RPCS[rpc].invoke(world, caller, ghost))


async def test_user_updating_its_own_roles_is_permission_denied(world: World) -> None:
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=world.alice.id, roles=["user", "admin"]),
        update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
    )

    await expect_denied(world.alice.users.UpdateUser(request))


async def test_user_updating_its_own_roles_changes_nothing(world: World) -> None:
    before = await world.get_as_admin(world.alice.id)
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=world.alice.id, display_name="Sneaky", roles=["admin"]),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "roles"]),
    )

    await expect_denied(world.alice.users.UpdateUser(request))

    assert await world.get_as_admin(world.alice.id) == before


async def test_service_updating_roles_is_permission_denied(world: World) -> None:
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=world.bob.id, roles=["user", "admin"]),
        update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
    )

    await expect_denied(world.service.users.UpdateUser(request))


async def test_service_creating_an_admin_is_permission_denied(world: World) -> None:
    await expect_denied(
        world.service.users.CreateUser(create_request(world.recorder, roles=["user", "admin"]))
    )


async def test_user_lookup_of_its_own_email_is_permission_denied(world: World) -> None:
    await expect_denied(
        world.alice.users.LookupUser(user_service_pb2.LookupUserRequest(email=world.alice.email))
    )


async def test_user_reading_another_user_via_batch_get_is_permission_denied(world: World) -> None:
    await expect_denied(
        world.alice.users.BatchGetUsers(user_service_pb2.BatchGetUsersRequest(ids=[world.bob.id]))
    )


# ----------------------------------------------------------------- sign-up disabled


async def test_anonymous_create_is_unauthenticated_when_sign_up_is_disabled(
    world: World, signup_closed: RunningServer
) -> None:
    anonymous = Caller(signup_closed.channel, None)

    await expect_error(
        anonymous.users.CreateUser(create_request(world.recorder)),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_INVALID",
    )


async def test_plain_user_create_is_permission_denied_when_sign_up_is_disabled(
    world: World, signup_closed: RunningServer
) -> None:
    alice = Caller(signup_closed.channel, world.alice.token)

    await expect_denied(alice.users.CreateUser(create_request(world.recorder)))


async def test_service_still_creates_users_when_sign_up_is_disabled(
    world: World, signup_closed: RunningServer
) -> None:
    service = Caller(signup_closed.channel, world.service.token)

    user = (await service.users.CreateUser(create_request(world.recorder))).user

    assert list(user.roles) == ["user"]


async def test_admin_still_creates_users_when_sign_up_is_disabled(
    world: World, signup_closed: RunningServer
) -> None:
    admin = Caller(signup_closed.channel, world.admin.token)

    user = (await admin.users.CreateUser(create_request(world.recorder, roles=["admin"]))).user

    assert set(user.roles) == {"admin", "user"}


async def test_login_still_works_when_sign_up_is_disabled(
    world: World, signup_closed: RunningServer
) -> None:
    anonymous = Caller(signup_closed.channel, None)

    response = await anonymous.auth.Login(
        auth_service_pb2.LoginRequest(email=world.bob.email, password=world.bob.password)
    )

    assert response.user.id == world.bob.id
