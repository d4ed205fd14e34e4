"""Sessions end to end over real gRPC: refresh rotation and reuse detection,
Logout, RevokeAllSessions, the user operations that end sessions, and
IntrospectToken. Revoked access tokens are refused with TOKEN_REVOKED by the
server that revoked them on the very next call."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .helpers import (
    Account,
    Caller,
    World,
    auth_service_pb2,
    claims_like,
    decode_failure,
    expect_denied,
    expect_error,
    expect_invalid,
    expect_not_found,
    expect_token_invalid,
    mint_token,
    missing_id,
    new_password,
    now,
    unverified_parts,
    user_service_pb2,
)

ME = user_service_pb2.GetUserRequest(id="me")


def refresh(token: str) -> auth_service_pb2.RefreshTokenRequest:
    return auth_service_pb2.RefreshTokenRequest(refresh_token=token)


def introspect(token: str) -> auth_service_pb2.IntrospectTokenRequest:
    return auth_service_pb2.IntrospectTokenRequest(token=token)


def holder(world: World, token: str) -> Caller:
    return Caller(world.channel, token, "holder")


def sid_of(token: str) -> str:
    _, claims = unverified_parts(token)
    return str(claims["sid"])


async def expect_revoked(caller: Caller) -> None:
    await expect_error(caller.users.GetUser(ME), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")


async def expect_refresh_refused(world: World, token: str) -> None:
    await expect_error(
        world.anonymous.auth.RefreshToken(refresh(token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )


async def still_works(caller: Caller) -> bool:
    return bool((await caller.users.GetUser(ME)).user.id)


async def second_session(world: World, account: Account) -> Caller:
    login = await world.login(account.email, account.password)
    return holder(world, login.access_token)


# ----------------------------------------------------------------- the whole story


async def test_the_documented_lifecycle_login_refresh_reuse_logout(world: World) -> None:
    # The README's session: each step depends on the one before.
    login = await world.login(world.alice.email, world.alice.password)
    rotated = await world.anonymous.auth.RefreshToken(refresh(login.refresh_token))
    assert await still_works(holder(world, rotated.access_token))

    await expect_refresh_refused(world, login.refresh_token)  # reuse: session revoked
    await expect_refresh_refused(world, rotated.refresh_token)
    await expect_revoked(holder(world, rotated.access_token))

    fresh = await world.login(world.alice.email, world.alice.password)
    caller = holder(world, fresh.access_token)
    await caller.auth.Logout(auth_service_pb2.LogoutRequest(refresh_token=fresh.refresh_token))
    await expect_revoked(caller)
    await expect_refresh_refused(world, fresh.refresh_token)


# ----------------------------------------------------------------- refresh


async def test_login_returns_an_opaque_refresh_token(world: World) -> None:
    token = world.alice.login.refresh_token
    assert token.startswith("rt_")
    assert token.count(".") == 0


async def test_refresh_returns_a_new_pair_in_the_same_session(world: World) -> None:
    old = world.alice.login
    new = await world.anonymous.auth.RefreshToken(refresh(old.refresh_token))
    assert new.refresh_token != old.refresh_token
    assert (new.token_type, new.expires_in, new.user.id) == ("Bearer", 900, world.alice.id)
    assert sid_of(new.access_token) == sid_of(old.access_token)
    assert await still_works(holder(world, new.access_token))


async def test_the_refreshed_refresh_token_refreshes_again(world: World) -> None:
    first = await world.anonymous.auth.RefreshToken(refresh(world.alice.login.refresh_token))
    second = await world.anonymous.auth.RefreshToken(refresh(first.refresh_token))
    assert sid_of(second.access_token) == sid_of(world.alice.token or "")


async def test_a_refreshed_session_keeps_its_earlier_access_token_working(world: World) -> None:
    await world.anonymous.auth.RefreshToken(refresh(world.alice.login.refresh_token))
    assert await still_works(world.alice)


async def test_reusing_a_refresh_token_is_refresh_token_invalid(world: World) -> None:
    token = world.alice.login.refresh_token
    await world.anonymous.auth.RefreshToken(refresh(token))
    await expect_refresh_refused(world, token)


async def test_after_a_reuse_the_rotations_new_refresh_token_is_refused_too(world: World) -> None:
    token = world.alice.login.refresh_token
    rotated = await world.anonymous.auth.RefreshToken(refresh(token))
    await expect_refresh_refused(world, token)
    await expect_refresh_refused(world, rotated.refresh_token)


async def test_after_a_reuse_every_access_token_of_the_session_is_revoked(world: World) -> None:
    token = world.alice.login.refresh_token
    rotated = await world.anonymous.auth.RefreshToken(refresh(token))
    await expect_refresh_refused(world, token)
    await expect_revoked(world.alice)
    await expect_revoked(holder(world, rotated.access_token))


async def test_a_reuse_leaves_the_users_other_sessions_working(world: World) -> None:
    other = await second_session(world, world.alice)
    token = world.alice.login.refresh_token
    await world.anonymous.auth.RefreshToken(refresh(token))
    await expect_refresh_refused(world, token)
    assert await still_works(other)


@pytest.mark.parametrize(
    "token", ["", "garbage", "rt_" + "A" * 43, "rt_" + "x" * 5000], ids=str.__len__
)
async def test_an_unknown_or_malformed_refresh_token_is_refused(world: World, token: str) -> None:
    await expect_refresh_refused(world, token)


async def test_an_access_token_is_not_a_refresh_token(world: World) -> None:
    await expect_refresh_refused(world, world.alice.token or "")


async def test_a_refresh_token_is_not_an_access_token(world: World) -> None:
    await expect_token_invalid(holder(world, world.alice.login.refresh_token).users.GetUser(ME))


async def test_concurrent_refreshes_of_one_token_give_exactly_one_new_pair(world: World) -> None:
    token = world.alice.login.refresh_token
    calls = [world.anonymous.auth.RefreshToken(refresh(token)) for _ in range(20)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    pairs = [r for r in results if isinstance(r, auth_service_pb2.RefreshTokenResponse)]
    reasons = Counter(
        decode_failure(r).reason for r in results if isinstance(r, grpc.aio.AioRpcError)
    )
    assert len(pairs) == 1
    assert reasons == Counter({"REFRESH_TOKEN_INVALID": 19})


async def test_the_losers_of_a_concurrent_refresh_count_as_reuse(world: World) -> None:
    token = world.alice.login.refresh_token
    calls = [world.anonymous.auth.RefreshToken(refresh(token)) for _ in range(5)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    [winner] = [r for r in results if isinstance(r, auth_service_pb2.RefreshTokenResponse)]
    await expect_refresh_refused(world, winner.refresh_token)
    await expect_revoked(holder(world, winner.access_token))


async def test_a_disabled_users_refresh_token_is_refused(world: World) -> None:
    await world.admin.users.DisableUser(user_service_pb2.DisableUserRequest(id=world.bob.id))
    await expect_refresh_refused(world, world.bob.login.refresh_token)


# ----------------------------------------------------------------- logout


async def test_after_logout_the_access_token_is_refused_as_revoked(world: World) -> None:
    await world.alice.auth.Logout(auth_service_pb2.LogoutRequest())
    await expect_revoked(world.alice)


async def test_after_logout_the_sessions_refresh_token_is_refused(world: World) -> None:
    await world.alice.auth.Logout(auth_service_pb2.LogoutRequest())
    await expect_refresh_refused(world, world.alice.login.refresh_token)


async def test_logout_with_the_sessions_refresh_token_succeeds(world: World) -> None:
    request = auth_service_pb2.LogoutRequest(refresh_token=world.alice.login.refresh_token)
    await world.alice.auth.Logout(request)
    await expect_revoked(world.alice)


async def test_logout_ends_only_the_callers_session(world: World) -> None:
    other = await second_session(world, world.alice)
    await world.alice.auth.Logout(auth_service_pb2.LogoutRequest())
    assert await still_works(other)
    assert await still_works(world.bob)


async def test_logout_with_another_sessions_refresh_token_is_invalid_and_ends_nothing(
    world: World,
) -> None:
    request = auth_service_pb2.LogoutRequest(refresh_token=world.bob.login.refresh_token)
    await expect_invalid(world.alice.auth.Logout(request), "refresh_token")
    assert await still_works(world.alice)
    assert await still_works(world.bob)


async def test_logout_without_a_token_is_unauthenticated(world: World) -> None:
    await expect_token_invalid(world.anonymous.auth.Logout(auth_service_pb2.LogoutRequest()))


async def test_a_logged_out_token_cannot_log_out_again(world: World) -> None:
    await world.alice.auth.Logout(auth_service_pb2.LogoutRequest())
    await expect_error(
        world.alice.auth.Logout(auth_service_pb2.LogoutRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )


# ----------------------------------------------------------------- revoke all sessions


async def test_a_user_revokes_all_its_sessions_its_own_included(world: World) -> None:
    other = await second_session(world, world.alice)
    response = await world.alice.auth.RevokeAllSessions(
        auth_service_pb2.RevokeAllSessionsRequest(user_id="me")
    )
    assert response.revoked_count == 2
    await expect_revoked(world.alice)
    await expect_revoked(other)


async def test_an_admin_revokes_another_users_sessions(world: World) -> None:
    response = await world.admin.auth.RevokeAllSessions(
        auth_service_pb2.RevokeAllSessionsRequest(user_id=world.bob.id)
    )
    assert response.revoked_count == 1
    await expect_revoked(world.bob)
    assert await still_works(world.admin)
    assert await still_works(world.alice)


async def test_a_user_may_not_revoke_another_users_sessions(world: World) -> None:
    await expect_denied(
        world.alice.auth.RevokeAllSessions(
            auth_service_pb2.RevokeAllSessionsRequest(user_id=world.bob.id)
        )
    )
    assert await still_works(world.bob)


async def test_a_service_may_not_revoke_sessions(world: World) -> None:
    await expect_denied(
        world.service.auth.RevokeAllSessions(
            auth_service_pb2.RevokeAllSessionsRequest(user_id=world.bob.id)
        )
    )


async def test_a_user_asking_about_a_missing_user_is_denied_not_told(world: World) -> None:
    await expect_denied(
        world.alice.auth.RevokeAllSessions(
            auth_service_pb2.RevokeAllSessionsRequest(user_id=missing_id())
        )
    )


async def test_revoking_the_sessions_of_a_missing_user_is_not_found(world: World) -> None:
    await expect_not_found(
        world.admin.auth.RevokeAllSessions(
            auth_service_pb2.RevokeAllSessionsRequest(user_id=missing_id())
        )
    )


async def test_revoke_all_without_a_token_is_unauthenticated(world: World) -> None:
    await expect_token_invalid(
        world.anonymous.auth.RevokeAllSessions(
            auth_service_pb2.RevokeAllSessionsRequest(user_id=world.bob.id)
        )
    )


# ----------------------------------------------------------------- user operations


async def test_disabling_a_user_revokes_its_access_tokens(world: World) -> None:
    await world.admin.users.DisableUser(user_service_pb2.DisableUserRequest(id=world.bob.id))
    await expect_revoked(world.bob)


async def test_an_enabled_user_logs_in_afresh_but_old_tokens_stay_revoked(world: World) -> None:
    await world.admin.users.DisableUser(user_service_pb2.DisableUserRequest(id=world.bob.id))
    await world.admin.users.EnableUser(user_service_pb2.EnableUserRequest(id=world.bob.id))
    assert await still_works(await second_session(world, world.bob))
    await expect_revoked(world.bob)


async def test_deleting_a_user_revokes_its_tokens(world: World) -> None:
    await world.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=world.bob.id))
    await expect_revoked(world.bob)
    await expect_refresh_refused(world, world.bob.login.refresh_token)


async def test_a_user_deleting_itself_loses_its_own_session(world: World) -> None:
    await world.alice.users.DeleteUser(user_service_pb2.DeleteUserRequest(id="me"))
    await expect_revoked(world.alice)


async def test_purging_a_user_revokes_its_tokens(world: World) -> None:
    await world.admin.users.PurgeUser(user_service_pb2.PurgeUserRequest(id=world.bob.id))
    await expect_revoked(world.bob)
    await expect_refresh_refused(world, world.bob.login.refresh_token)


async def test_changing_ones_own_password_keeps_this_session_and_ends_the_others(
    world: World,
) -> None:
    other = await second_session(world, world.alice)
    await world.alice.users.ChangePassword(
        user_service_pb2.ChangePasswordRequest(
            id="me",
            current_password=world.alice.password,
            new_password=new_password(world.recorder),
        )
    )
    assert await still_works(world.alice)
    await expect_revoked(other)


async def test_an_admin_changing_a_users_password_ends_all_its_sessions(world: World) -> None:
    await world.admin.users.ChangePassword(
        user_service_pb2.ChangePasswordRequest(
            id=world.bob.id, new_password=new_password(world.recorder)
        )
    )
    await expect_revoked(world.bob)
    await expect_refresh_refused(world, world.bob.login.refresh_token)


async def test_a_failed_password_change_ends_no_session(world: World) -> None:
    other = await second_session(world, world.alice)
    await expect_error(
        world.alice.users.ChangePassword(
            user_service_pb2.ChangePasswordRequest(
                id="me", current_password="Wrong-password-1", new_password="Another-pass-2!"
            )
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )
    assert await still_works(other)


# ----------------------------------------------------------------- introspection


async def test_an_admin_introspects_an_active_token(world: World) -> None:
    token = world.alice.token or ""
    seen = await world.admin.auth.IntrospectToken(introspect(token))
    _, claims = unverified_parts(token)
    assert (seen.active, seen.sub, list(seen.roles), seen.session_id) == (
        True,
        world.alice.id,
        ["user"],
        claims["sid"],
    )
    assert seen.expire_time.ToDatetime(tzinfo=UTC) == datetime.fromtimestamp(claims["exp"], UTC)


async def test_a_service_introspects_a_token(world: World) -> None:
    seen = await world.service.auth.IntrospectToken(introspect(world.alice.token or ""))
    assert seen.active


async def test_a_revoked_token_is_inactive(world: World) -> None:
    await world.alice.auth.Logout(auth_service_pb2.LogoutRequest())
    seen = await world.admin.auth.IntrospectToken(introspect(world.alice.token or ""))
    assert seen == auth_service_pb2.IntrospectTokenResponse(active=False)


async def test_an_expired_token_is_inactive(world: World, signing_key: Ed25519PrivateKey) -> None:
    header, claims = unverified_parts(world.alice.token or "")
    expired = claims_like(claims, iat=now() - 3600, nbf=now() - 3600, exp=now() - 1800)
    token = mint_token(signing_key, kid=header["kid"], claims=expired)
    seen = await world.admin.auth.IntrospectToken(introspect(token))
    assert seen == auth_service_pb2.IntrospectTokenResponse(active=False)


async def test_a_token_signed_by_a_foreign_key_is_inactive(world: World) -> None:
    header, claims = unverified_parts(world.alice.token or "")
    forged = mint_token(Ed25519PrivateKey.generate(), kid=header["kid"], claims=claims)
    seen = await world.admin.auth.IntrospectToken(introspect(forged))
    assert seen == auth_service_pb2.IntrospectTokenResponse(active=False)


@pytest.mark.parametrize(
    "token", ["", "garbage", "a.b.c", "eyJhbGciOiJub25lIn0.e30.", "x" * 100_000], ids=str.__len__
)
async def test_a_malformed_token_is_inactive_never_an_error(world: World, token: str) -> None:
    seen = await world.admin.auth.IntrospectToken(introspect(token))
    assert seen == auth_service_pb2.IntrospectTokenResponse(active=False)


async def test_a_refresh_token_is_inactive(world: World) -> None:
    seen = await world.admin.auth.IntrospectToken(introspect(world.alice.login.refresh_token))
    assert not seen.active


async def test_a_plain_user_may_not_introspect(world: World) -> None:
    await expect_denied(world.alice.auth.IntrospectToken(introspect(world.bob.token or "")))


async def test_introspection_without_a_token_is_unauthenticated(world: World) -> None:
    await expect_token_invalid(world.anonymous.auth.IntrospectToken(introspect("garbage")))


async def test_introspecting_a_token_with_an_unknown_session_reports_it_active(
    world: World, signing_key: Ed25519PrivateKey
) -> None:
    # Sessions are checked by revocation, not by lookup: the hot path never
    # reads the sessions table.
    header, claims = unverified_parts(world.alice.token or "")
    token = mint_token(
        signing_key, kid=header["kid"], claims=claims_like(claims, sid=str(uuid.uuid4()))
    )
    seen = await world.admin.auth.IntrospectToken(introspect(token))
    assert seen.active
