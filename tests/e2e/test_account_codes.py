"""Email verification and password reset by codes, end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest_asyncio
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from .conftest import RunningServer, running_server
from .helpers import (
    Account,
    Caller,
    ResponseRecorder,
    World,
    auth_service_pb2,
    expect_bad_credentials,
    expect_denied,
    expect_error,
    expect_invalid,
    expect_not_found,
    fails,
    new_email,
    new_password,
    user_pb2,
    user_service_pb2,
)
from .test_batch_writes import events_of

pb = user_service_pb2


async def expect_code_invalid(call: Any) -> None:
    await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "CODE_INVALID", fields=["code"])


async def verification_code(world: World, user_id: str) -> str:
    response = await world.service.users.CreateEmailVerificationCode(
        pb.CreateEmailVerificationCodeRequest(id=user_id)
    )
    assert len(response.code) == 8
    return str(response.code)


async def reset_code(world: World, email: str) -> str:
    response = await world.service.users.CreatePasswordResetCode(
        pb.CreatePasswordResetCodeRequest(email=email)
    )
    return str(response.code)


def verify(user_id: str, code: str) -> pb.VerifyEmailRequest:
    return pb.VerifyEmailRequest(id=user_id, code=code)


def reset(email: str, code: str, password: str) -> pb.ResetPasswordRequest:
    return pb.ResetPasswordRequest(email=email, code=code, new_password=password)


def wrong_code(code: str) -> str:
    # Same alphabet and length, another code.
    return ("B" if code[0] == "A" else "A") + code[1:]


# ------------------------------------------------------------ email verification


async def test_a_user_verifies_its_email_with_the_code_a_service_issued(world: World) -> None:
    code = await verification_code(world, world.alice.id)

    response = await world.alice.users.VerifyEmail(verify("me", code))

    assert response.user.email_verified
    assert (await world.get_as_admin(world.alice.id)).email_verified


async def test_a_new_user_is_not_verified(world: World) -> None:
    assert not (await world.get_as_admin(world.bob.id)).email_verified


async def test_a_code_typed_in_lower_case_is_accepted(world: World) -> None:
    code = await verification_code(world, world.alice.id)

    response = await world.admin.users.VerifyEmail(verify(world.alice.id, code.lower()))

    assert response.user.email_verified


async def test_a_used_code_cannot_be_used_again(world: World) -> None:
    code = await verification_code(world, world.alice.id)
    await world.alice.users.VerifyEmail(verify("me", code))

    await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", code)))


async def test_a_new_code_voids_the_previous_one(world: World) -> None:
    first = await verification_code(world, world.alice.id)
    second = await verification_code(world, world.alice.id)

    await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", first)))
    assert (await world.alice.users.VerifyEmail(verify("me", second))).user.email_verified


async def test_five_wrong_codes_void_the_right_one(world: World) -> None:
    code = await verification_code(world, world.alice.id)
    for _ in range(5):
        await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", wrong_code(code))))

    await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", code)))
    assert not (await world.get_as_admin(world.alice.id)).email_verified


async def test_four_wrong_codes_leave_the_right_one_usable(world: World) -> None:
    code = await verification_code(world, world.alice.id)
    for _ in range(4):
        await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", wrong_code(code))))

    assert (await world.alice.users.VerifyEmail(verify("me", code))).user.email_verified


async def test_a_code_of_another_user_is_invalid(world: World) -> None:
    bobs = await verification_code(world, world.bob.id)

    await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", bobs)))
    assert (await world.bob.users.VerifyEmail(verify("me", bobs))).user.email_verified


async def test_a_password_reset_code_does_not_verify_an_email(world: World) -> None:
    code = await reset_code(world, world.alice.email)

    await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", code)))


async def test_an_email_verification_code_does_not_reset_a_password(world: World) -> None:
    code = await verification_code(world, world.alice.id)

    await expect_code_invalid(
        world.anonymous.users.ResetPassword(
            reset(world.alice.email, code, new_password(world.recorder))
        )
    )


async def test_changing_the_email_clears_the_verification_and_voids_open_codes(
    world: World,
) -> None:
    await world.alice.users.VerifyEmail(
        verify("me", await verification_code(world, world.alice.id))
    )
    open_code = await verification_code(world, world.alice.id)

    updated = await world.alice.users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=world.alice.id, email=new_email("moved")),
            update_mask=field_mask_pb2.FieldMask(paths=["email"]),
        )
    )

    assert not updated.user.email_verified
    await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", open_code)))


async def test_setting_the_same_email_keeps_the_verification(world: World) -> None:
    await world.alice.users.VerifyEmail(
        verify("me", await verification_code(world, world.alice.id))
    )

    updated = await world.alice.users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=world.alice.id, email=world.alice.email),
            update_mask=field_mask_pb2.FieldMask(paths=["email"]),
        )
    )

    assert updated.user.email_verified


async def test_list_users_filters_on_email_verified(world: World) -> None:
    await world.alice.users.VerifyEmail(
        verify("me", await verification_code(world, world.alice.id))
    )

    verified = await world.admin.users.ListUsers(
        pb.ListUsersRequest(filter="email_verified = true")
    )
    unverified = await world.admin.users.ListUsers(
        pb.ListUsersRequest(filter="email_verified != true")
    )

    assert [u.id for u in verified.users] == [world.alice.id]
    assert world.alice.id not in {u.id for u in unverified.users}
    assert len(unverified.users) == 3


async def test_a_filter_comparing_email_verified_with_text_is_invalid(world: World) -> None:
    await expect_invalid(
        world.admin.users.ListUsers(pb.ListUsersRequest(filter='email_verified = "yes"')),
        "filter",
    )


async def test_an_import_may_carry_a_verified_email(world: World) -> None:
    import bcrypt

    email = new_email("imported")
    row = pb.ImportedUser(
        email=email,
        password_hash=bcrypt.hashpw(b"Imported-pass-1", bcrypt.gensalt(rounds=4)).decode(),
        email_verified=True,
    )

    async def stream() -> AsyncIterator[pb.ImportUsersRequest]:
        yield pb.ImportUsersRequest(users=[row])

    result = await world.admin.users.ImportUsers(stream())

    assert result.imported_count == 1
    looked_up = await world.admin.users.LookupUser(pb.LookupUserRequest(email=email))
    assert looked_up.user.email_verified


async def test_only_admins_and_services_issue_codes(world: World) -> None:
    await expect_denied(
        world.alice.users.CreateEmailVerificationCode(
            pb.CreateEmailVerificationCodeRequest(id=world.alice.id)
        )
    )
    await expect_denied(
        world.alice.users.CreatePasswordResetCode(
            pb.CreatePasswordResetCodeRequest(email=world.alice.email)
        )
    )


async def test_a_user_cannot_verify_another_users_email(world: World) -> None:
    code = await verification_code(world, world.alice.id)

    await expect_denied(world.bob.users.VerifyEmail(verify(world.alice.id, code)))


async def test_a_code_for_a_missing_user_is_not_found(world: World) -> None:
    from .helpers import missing_id

    await expect_not_found(
        world.admin.users.CreateEmailVerificationCode(
            pb.CreateEmailVerificationCodeRequest(id=missing_id())
        )
    )


async def test_malformed_codes_get_their_documented_errors_and_change_nothing(
    world: World,
) -> None:
    code = await verification_code(world, world.alice.id)

    await expect_invalid(world.alice.users.VerifyEmail(verify("me", "")), "code")
    await expect_invalid(world.alice.users.VerifyEmail(verify("me", "A" * 65)), "code")
    await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", "ABCD-EF0")))
    await expect_code_invalid(world.alice.users.VerifyEmail(verify("me", code + "A")))

    # None of them counted as a try or used the code.
    assert (await world.alice.users.VerifyEmail(verify("me", code))).user.email_verified


async def test_two_concurrent_verifications_with_the_right_code_succeed_exactly_once(
    world: World,
) -> None:
    for _ in range(10):
        code = await verification_code(world, world.bob.id)

        outcomes = await asyncio.gather(
            world.bob.users.VerifyEmail(verify("me", code)),
            world.admin.users.VerifyEmail(verify(world.bob.id, code)),
            return_exceptions=True,
        )

        succeeded = [o for o in outcomes if not isinstance(o, BaseException)]
        failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(succeeded) == 1, outcomes
        assert [f.code() for f in failed] == [grpc.StatusCode.INVALID_ARGUMENT]


# ---------------------------------------------------------------- expired codes


@pytest_asyncio.fixture(loop_scope="session")
async def short_lived(
    e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    """A server whose codes live one second."""
    settings = dataclasses.replace(e2e_settings, code_ttl_seconds=1)
    async with running_server(settings, recorder) as running:
        yield running


async def test_an_expired_code_is_invalid(world: World, short_lived: RunningServer) -> None:
    service = Caller(short_lived.channel, world.service.login.access_token)
    issued = await service.users.CreatePasswordResetCode(
        pb.CreatePasswordResetCodeRequest(email=world.alice.email)
    )
    # Waits for the clock, not for another task: expiry is the behaviour.
    expire = issued.expire_time.seconds + issued.expire_time.nanos / 1e9
    await asyncio.sleep(max(0.0, expire - time.time()) + 0.05)

    await expect_code_invalid(
        world.anonymous.users.ResetPassword(
            reset(world.alice.email, issued.code, new_password(world.recorder))
        )
    )
    assert (await world.login(world.alice.email, world.alice.password)).user.id


# ----------------------------------------------------------------- password reset


async def test_a_reset_sets_the_new_password(world: World) -> None:
    code = await reset_code(world, world.alice.email)
    new = new_password(world.recorder)

    await world.anonymous.users.ResetPassword(reset(world.alice.email.upper(), code, new))

    assert (await world.login(world.alice.email, new)).user.id == world.alice.id
    await expect_bad_credentials(world.login(world.alice.email, world.alice.password))


async def test_a_reset_ends_every_session_of_the_user(world: World) -> None:
    code = await reset_code(world, world.alice.email)

    await world.anonymous.users.ResetPassword(
        reset(world.alice.email, code, new_password(world.recorder))
    )

    await expect_error(
        world.alice.users.GetUser(pb.GetUserRequest(id="me")),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    refreshed = world.anonymous.auth.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=world.alice.login.refresh_token)
    )
    assert (await fails(refreshed)).code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_reset_clears_a_login_lock(world: World) -> None:
    for _ in range(5):
        await expect_bad_credentials(world.login(world.bob.email, "Wrong-password-1"))
    await expect_bad_credentials(world.login(world.bob.email, world.bob.password))
    new = new_password(world.recorder)

    await world.anonymous.users.ResetPassword(
        reset(world.bob.email, await reset_code(world, world.bob.email), new)
    )

    assert (await world.login(world.bob.email, new)).user.id == world.bob.id


async def test_a_reset_code_works_once(world: World) -> None:
    code = await reset_code(world, world.alice.email)
    await world.anonymous.users.ResetPassword(
        reset(world.alice.email, code, new_password(world.recorder))
    )

    await expect_code_invalid(
        world.anonymous.users.ResetPassword(
            reset(world.alice.email, code, new_password(world.recorder))
        )
    )


async def test_a_reset_code_is_bound_to_its_email(world: World) -> None:
    code = await reset_code(world, world.alice.email)

    await expect_code_invalid(
        world.anonymous.users.ResetPassword(
            reset(world.bob.email, code, new_password(world.recorder))
        )
    )
    assert (await world.login(world.bob.email, world.bob.password)).user.id


async def test_no_code_is_issued_for_an_unknown_disabled_or_deleted_email(world: World) -> None:
    disabled, _, _ = await world.seed_user(email=new_email("disabled"))
    await world.admin.users.DisableUser(pb.DisableUserRequest(id=disabled))
    deleted, deleted_email, _ = await world.seed_user(email=new_email("deleted"))
    await world.admin.users.DeleteUser(pb.DeleteUserRequest(id=deleted))
    disabled_email = (await world.get_as_admin(disabled)).email

    for email in (new_email("nobody"), disabled_email, deleted_email):
        response = await world.service.users.CreatePasswordResetCode(
            pb.CreatePasswordResetCodeRequest(email=email)
        )
        assert response.code == ""
        assert response.HasField("expire_time")


async def test_a_reset_for_an_unknown_email_is_code_invalid(world: World) -> None:
    code = await reset_code(world, world.alice.email)

    await expect_code_invalid(
        world.anonymous.users.ResetPassword(
            reset(new_email("nobody"), code, new_password(world.recorder))
        )
    )


async def test_a_reset_for_a_purged_user_is_code_invalid(world: World) -> None:
    user_id, email, _ = await world.seed_user()
    code = await reset_code(world, email)
    await world.admin.users.PurgeUser(pb.PurgeUserRequest(id=user_id))

    await expect_code_invalid(
        world.anonymous.users.ResetPassword(reset(email, code, new_password(world.recorder)))
    )


async def test_a_weak_new_password_is_refused_and_keeps_the_code(world: World) -> None:
    code = await reset_code(world, world.alice.email)

    await expect_error(
        world.anonymous.users.ResetPassword(reset(world.alice.email, code, "short")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEAK_PASSWORD",
        fields=["new_password"],
    )

    new = new_password(world.recorder)
    await world.anonymous.users.ResetPassword(reset(world.alice.email, code, new))
    assert (await world.login(world.alice.email, new)).user.id == world.alice.id


async def test_a_reset_with_an_empty_code_or_bad_email_is_invalid_argument(world: World) -> None:
    await expect_invalid(
        world.anonymous.users.ResetPassword(
            reset(world.alice.email, "", new_password(world.recorder))
        ),
        "code",
    )
    await expect_invalid(
        world.anonymous.users.ResetPassword(
            reset("not-an-email", "ABCDEFGH", new_password(world.recorder))
        ),
        "email",
    )


async def test_two_concurrent_resets_with_the_right_code_succeed_exactly_once(
    world: World,
) -> None:
    for _ in range(10):
        code = await reset_code(world, world.bob.email)
        first, second = new_password(world.recorder), new_password(world.recorder)

        outcomes = await asyncio.gather(
            world.anonymous.users.ResetPassword(reset(world.bob.email, code, first)),
            world.anonymous.users.ResetPassword(reset(world.bob.email, code, second)),
            return_exceptions=True,
        )

        winners = [
            p
            for p, o in zip((first, second), outcomes, strict=True)
            if not isinstance(o, BaseException)
        ]
        assert len(winners) == 1, outcomes
        assert (await world.login(world.bob.email, winners[0])).user.id == world.bob.id


async def test_reset_password_needs_no_credentials_but_the_code(world: World) -> None:
    account: Account = world.alice
    code = await reset_code(world, account.email)

    response = await world.anonymous.users.ResetPassword(
        reset(account.email, code, new_password(world.recorder))
    )

    assert response == pb.ResetPasswordResponse()


# ------------------------------------------------------------------------ events


async def test_verification_and_reset_write_their_events_without_the_codes(
    world: World, primary: RunningServer
) -> None:
    verification = await verification_code(world, world.alice.id)
    await world.alice.users.VerifyEmail(verify("me", verification))
    code = await reset_code(world, world.bob.email)
    await world.anonymous.users.ResetPassword(
        reset(world.bob.email, code, new_password(world.recorder))
    )

    verified = await events_of(world, "usersvc.user.email_verified.v1", 1)
    reset_events = await events_of(world, "usersvc.user.password_reset.v1", 1)

    assert [(e.user_id, e.user.email_verified, e.actor) for e in verified] == [
        (world.alice.id, True, world.alice.id)
    ]
    assert [(e.user_id, e.actor) for e in reset_events] == [(world.bob.id, "")]
    async with primary.container.engine.connect() as connection:
        stored = " ".join(
            (await connection.execute(text("SELECT CAST(events AS text) FROM events"))).scalars()
        )
    assert verification not in stored.upper()
    assert code not in stored.upper()
