"""UserService.ChangePassword end to end."""

from __future__ import annotations

import grpc

from .helpers import (
    World,
    expect_bad_credentials,
    expect_error,
    expect_not_found,
    missing_id,
    new_password,
    user_service_pb2,
)


def change(user_id: str, new: str, current: str = "") -> user_service_pb2.ChangePasswordRequest:
    return user_service_pb2.ChangePasswordRequest(
        id=user_id, current_password=current, new_password=new
    )


async def test_user_changing_its_own_password_logs_in_with_the_new_one(world: World) -> None:
    new = new_password(world.recorder)

    await world.alice.users.ChangePassword(change("me", new, world.alice.password))

    assert (await world.login(world.alice.email, new)).user.id == world.alice.id


async def test_after_a_change_the_old_password_no_longer_logs_in(world: World) -> None:
    new = new_password(world.recorder)

    await world.alice.users.ChangePassword(change(world.alice.id, new, world.alice.password))

    await expect_bad_credentials(world.login(world.alice.email, world.alice.password))


async def test_own_change_with_a_wrong_current_password_is_invalid_credentials(
    world: World,
) -> None:
    await expect_bad_credentials(
        world.alice.users.ChangePassword(
            change("me", new_password(world.recorder), "Not-the-password-1")
        )
    )


async def test_own_change_with_a_wrong_current_password_keeps_the_old_password(
    world: World,
) -> None:
    await expect_bad_credentials(
        world.alice.users.ChangePassword(
            change("me", new_password(world.recorder), "Not-the-password-1")
        )
    )

    assert (await world.login(world.alice.email, world.alice.password)).user.id


async def test_own_change_without_the_current_password_is_refused(world: World) -> None:
    await expect_error(
        world.alice.users.ChangePassword(change("me", new_password(world.recorder))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        fields=["current_password"],
    )


async def test_admin_changes_another_users_password_without_the_current_one(
    world: World,
) -> None:
    new = new_password(world.recorder)

    await world.admin.users.ChangePassword(change(world.bob.id, new))

    assert (await world.login(world.bob.email, new)).user.id == world.bob.id


async def test_admin_changing_its_own_password_needs_the_current_one(world: World) -> None:
    await expect_error(
        world.admin.users.ChangePassword(change("me", new_password(world.recorder))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        fields=["current_password"],
    )


async def test_weak_new_password_is_refused_naming_new_password(world: World) -> None:
    await expect_error(
        world.alice.users.ChangePassword(change("me", "password", world.alice.password)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEAK_PASSWORD",
        fields=["new_password"],
    )


async def test_new_password_over_72_bytes_is_weak(world: World) -> None:
    await expect_error(
        world.admin.users.ChangePassword(change(world.bob.id, "ü" * 40)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEAK_PASSWORD",
        fields=["new_password"],
    )


async def test_current_password_over_72_bytes_is_not_an_internal_error(world: World) -> None:
    await expect_bad_credentials(
        world.alice.users.ChangePassword(change("me", new_password(world.recorder), "x" * 100))
    )


async def test_admin_change_for_a_missing_user_is_not_found(world: World) -> None:
    await expect_not_found(
        world.admin.users.ChangePassword(change(missing_id(), new_password(world.recorder)))
    )


async def test_wrong_current_passwords_count_towards_the_login_lock(world: World) -> None:
    # The default lock: 5 failures. A stolen access token must not guess the
    # current password faster than Login allows.
    account = await world.account("guessed")
    for attempt in range(5):
        await expect_bad_credentials(
            account.users.ChangePassword(
                change("me", new_password(world.recorder), f"Wrong-guess-{attempt}")
            )
        )

    # Locked now: the right password is refused the same way, by Login and
    # by ChangePassword.
    await expect_bad_credentials(world.login(account.email, account.password))
    await expect_bad_credentials(
        account.users.ChangePassword(change("me", new_password(world.recorder), account.password))
    )


async def test_a_successful_change_clears_the_failure_count(world: World) -> None:
    account = await world.account("mistyped")
    for attempt in range(4):
        await expect_bad_credentials(
            account.users.ChangePassword(
                change("me", new_password(world.recorder), f"Wrong-guess-{attempt}")
            )
        )
    new = new_password(world.recorder)
    await account.users.ChangePassword(change("me", new, account.password))

    # Four more failures would lock an account whose count had not been cleared.
    for attempt in range(4):
        await expect_bad_credentials(world.login(account.email, f"Wrong-guess-{attempt}"))
    assert (await world.login(account.email, new)).user.id == account.id
