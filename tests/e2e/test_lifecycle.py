"""Soft delete, undelete, purge, disable and enable, end to end."""

from __future__ import annotations

import grpc

from .helpers import (
    World,
    create_request,
    expect_bad_credentials,
    expect_error,
    expect_not_found,
    missing_id,
    user_pb2,
    user_service_pb2,
)

DELETED = user_pb2.User.STATE_DELETED
DISABLED = user_pb2.User.STATE_DISABLED
ACTIVE = user_pb2.User.STATE_ACTIVE


def delete(user_id: str, etag: str = "") -> user_service_pb2.DeleteUserRequest:
    return user_service_pb2.DeleteUserRequest(id=user_id, etag=etag)


def undelete(user_id: str) -> user_service_pb2.UndeleteUserRequest:
    return user_service_pb2.UndeleteUserRequest(id=user_id)


def purge(user_id: str) -> user_service_pb2.PurgeUserRequest:
    return user_service_pb2.PurgeUserRequest(id=user_id)


def disable(user_id: str) -> user_service_pb2.DisableUserRequest:
    return user_service_pb2.DisableUserRequest(id=user_id)


def enable(user_id: str) -> user_service_pb2.EnableUserRequest:
    return user_service_pb2.EnableUserRequest(id=user_id)


async def expect_invalid_state(call: object, code: grpc.StatusCode) -> None:
    await expect_error(call, code, "INVALID_STATE")  # type: ignore[arg-type]


# ----------------------------------------------------------------- delete


async def test_delete_returns_the_user_deleted_with_a_delete_time(world: World) -> None:
    user = (await world.admin.users.DeleteUser(delete(world.bob.id))).user

    assert user.state == DELETED
    assert user.HasField("delete_time")


async def test_user_may_delete_itself_by_me(world: World) -> None:
    user = (await world.alice.users.DeleteUser(delete("me"))).user

    assert user.id == world.alice.id
    assert user.state == DELETED


async def test_deleted_user_is_not_found_for_a_service(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    await expect_not_found(
        world.service.users.GetUser(user_service_pb2.GetUserRequest(id=world.bob.id))
    )


async def test_deleted_user_is_not_found_by_lookup_for_a_service(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    await expect_not_found(
        world.service.users.LookupUser(user_service_pb2.LookupUserRequest(email=world.bob.email))
    )


async def test_deleted_user_is_not_found_in_batch_get_for_a_service(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    await expect_not_found(
        world.service.users.BatchGetUsers(
            user_service_pb2.BatchGetUsersRequest(ids=[world.alice.id, world.bob.id])
        )
    )


async def test_admin_still_reads_a_deleted_user(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    user = await world.get_as_admin(world.bob.id)

    assert user.state == DELETED


async def test_admin_still_looks_up_a_deleted_user(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    user = (
        await world.admin.users.LookupUser(
            user_service_pb2.LookupUserRequest(email=world.bob.email)
        )
    ).user

    assert user.id == world.bob.id


async def test_deleted_users_email_stays_taken(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    await expect_error(
        world.anonymous.users.CreateUser(create_request(world.recorder, email=world.bob.email)),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )


async def test_deleted_user_cannot_log_in(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    await expect_bad_credentials(world.login(world.bob.email, world.bob.password))


async def test_delete_with_a_stale_etag_is_aborted_and_the_user_stays(world: World) -> None:
    stale = await world.get_as_admin(world.bob.id)
    await world.admin.users.DisableUser(disable(world.bob.id))

    await expect_error(
        world.admin.users.DeleteUser(delete(world.bob.id, etag=stale.etag)),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )

    assert (await world.get_as_admin(world.bob.id)).state == DISABLED


async def test_delete_with_the_current_etag_deletes(world: World) -> None:
    current = await world.get_as_admin(world.bob.id)

    user = (await world.admin.users.DeleteUser(delete(world.bob.id, etag=current.etag))).user

    assert user.state == DELETED


async def test_deleting_a_deleted_user_is_failed_precondition(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    await expect_invalid_state(
        world.admin.users.DeleteUser(delete(world.bob.id)), grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_delete_of_a_missing_user_is_not_found(world: World) -> None:
    await expect_not_found(world.admin.users.DeleteUser(delete(missing_id())))


# ----------------------------------------------------------------- undelete


async def test_undelete_restores_an_active_user(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    user = (await world.admin.users.UndeleteUser(undelete(world.bob.id))).user

    assert user.state == ACTIVE
    assert not user.HasField("delete_time")


async def test_undelete_restores_a_disabled_user_as_disabled(world: World) -> None:
    await world.admin.users.DisableUser(disable(world.bob.id))
    await world.admin.users.DeleteUser(delete(world.bob.id))

    user = (await world.admin.users.UndeleteUser(undelete(world.bob.id))).user

    assert user.state == DISABLED


async def test_undeleted_user_is_visible_to_services_again(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))
    await world.admin.users.UndeleteUser(undelete(world.bob.id))

    user = (
        await world.service.users.GetUser(user_service_pb2.GetUserRequest(id=world.bob.id))
    ).user

    assert user.id == world.bob.id


async def test_undeleted_user_logs_in_again(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))
    await world.admin.users.UndeleteUser(undelete(world.bob.id))

    login = await world.login(world.bob.email, world.bob.password)

    assert login.user.id == world.bob.id


async def test_undelete_of_a_live_user_is_already_exists_invalid_state(world: World) -> None:
    await expect_invalid_state(
        world.admin.users.UndeleteUser(undelete(world.bob.id)), grpc.StatusCode.ALREADY_EXISTS
    )


async def test_undelete_of_a_missing_user_is_not_found(world: World) -> None:
    await expect_not_found(world.admin.users.UndeleteUser(undelete(missing_id())))


# ----------------------------------------------------------------- purge


async def test_purged_user_is_gone_even_for_admins(world: World) -> None:
    await world.admin.users.PurgeUser(purge(world.bob.id))

    await expect_not_found(
        world.admin.users.GetUser(user_service_pb2.GetUserRequest(id=world.bob.id))
    )


async def test_purge_frees_a_deleted_users_email(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))
    await world.admin.users.PurgeUser(purge(world.bob.id))

    user = (
        await world.anonymous.users.CreateUser(
            create_request(world.recorder, email=world.bob.email)
        )
    ).user

    assert user.id != world.bob.id


async def test_purged_user_cannot_log_in(world: World) -> None:
    await world.admin.users.PurgeUser(purge(world.bob.id))

    await expect_bad_credentials(world.login(world.bob.email, world.bob.password))


async def test_purge_of_a_missing_user_is_not_found(world: World) -> None:
    await expect_not_found(world.admin.users.PurgeUser(purge(missing_id())))


# ----------------------------------------------------------------- disable / enable


async def test_disable_sets_the_disabled_state(world: World) -> None:
    user = (await world.admin.users.DisableUser(disable(world.bob.id))).user

    assert user.state == DISABLED


async def test_disabled_user_cannot_log_in(world: World) -> None:
    await world.admin.users.DisableUser(disable(world.bob.id))

    await expect_bad_credentials(world.login(world.bob.email, world.bob.password))


async def test_disabled_login_looks_exactly_like_a_wrong_password(world: World) -> None:
    wrong = await expect_bad_credentials(world.login(world.alice.email, "Wrong-pass-123!"))
    await world.admin.users.DisableUser(disable(world.bob.id))

    disabled = await expect_bad_credentials(world.login(world.bob.email, world.bob.password))

    assert disabled.details == wrong.details
    assert disabled.error_infos[0].metadata == wrong.error_infos[0].metadata


async def test_disable_is_idempotent(world: World) -> None:
    await world.admin.users.DisableUser(disable(world.bob.id))

    user = (await world.admin.users.DisableUser(disable(world.bob.id))).user

    assert user.state == DISABLED


async def test_enable_lets_a_disabled_user_log_in_again(world: World) -> None:
    await world.admin.users.DisableUser(disable(world.bob.id))
    enabled = (await world.admin.users.EnableUser(enable(world.bob.id))).user

    login = await world.login(world.bob.email, world.bob.password)

    assert enabled.state == ACTIVE
    assert login.user.state == ACTIVE


async def test_enable_of_an_active_user_is_idempotent(world: World) -> None:
    user = (await world.admin.users.EnableUser(enable(world.bob.id))).user

    assert user.state == ACTIVE


async def test_disable_of_a_deleted_user_is_failed_precondition(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    await expect_invalid_state(
        world.admin.users.DisableUser(disable(world.bob.id)), grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_enable_of_a_deleted_user_is_failed_precondition(world: World) -> None:
    await world.admin.users.DeleteUser(delete(world.bob.id))

    await expect_invalid_state(
        world.admin.users.EnableUser(enable(world.bob.id)), grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_disable_of_a_missing_user_is_not_found(world: World) -> None:
    await expect_not_found(world.admin.users.DisableUser(disable(missing_id())))


async def test_enable_of_a_missing_user_is_not_found(world: World) -> None:
    await expect_not_found(world.admin.users.EnableUser(enable(missing_id())))
