"""AuthService sessions (usersvc.services.auth): refresh rotation and reuse
detection, logout, revoking all sessions, introspection and the revocation
check of authenticate. Fakes for storage, real tokens and bcrypt at cost 4."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import bcrypt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakes import (
    ACCESS_TTL_SECONDS,
    REFRESH_TTL_SECONDS,
    AuthServiceHarness,
    as_admin,
    as_mtls_service,
    as_service_account,
    as_user,
    auth_service,
)

from tests.support.users import patch_user
from usersvc.domain.errors import (
    InvalidArgument,
    InvalidCredentials,
    InvalidState,
    PermissionDenied,
    RefreshTokenInvalid,
    TokenRevoked,
    UserNotFound,
)
from usersvc.domain.models import ANONYMOUS, Principal, RevokeReason, User, UserPatch
from usersvc.services.inputs import LoginResult
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.sessions import parse_refresh_token
from usersvc.services.tokens import KeyRing, SigningKey, TokenService

PASSWORD = "correct horse battery staple"


class Harness:
    def __init__(self, built: AuthServiceHarness, hasher: BcryptPasswordHasher) -> None:
        self.built = built
        self.hasher = hasher
        self.db = built.db
        self.clock = built.clock
        self.auth = built.service

    def add_user(self, email: str = "ann@example.com", **fields: object) -> User:
        password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        return self.db.insert(email, password_hash=password_hash, **fields)  # type: ignore[arg-type]

    async def login(self, email: str = "ann@example.com") -> LoginResult:
        return await self.auth.login(email=email, password=PASSWORD)

    async def principal(self, result: LoginResult) -> Principal:
        return await self.auth.authenticate(result.access_token)

    async def session_id(self, result: LoginResult) -> uuid.UUID:
        # The signature check alone: the session may be revoked by now.
        return uuid.UUID(self.built.tokens.verify_access_token(result.access_token).session_id)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    yield Harness(auth_service(hasher), hasher)
    hasher.close()


def _generation_of(token: str) -> int:
    presented = parse_refresh_token(token)
    assert presented is not None
    return presented.generation


def _unknown_refresh_token() -> str:
    return "rt_" + base64.urlsafe_b64encode(bytes(range(72))).decode()


# -- login -------------------------------------------------------------------------


async def test_a_login_starts_a_session_named_by_the_access_tokens_sid(h: Harness) -> None:
    ann = h.add_user()
    result = await h.login()
    session = h.db.sessions[await h.session_id(result)]
    assert (session.user_id, session.revoke_time) == (ann.id, None)


async def test_a_session_ends_one_refresh_lifetime_after_the_login(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    session = h.db.sessions[await h.session_id(result)]
    assert session.expire_time == h.built.revoker.lifetimes.now() + timedelta(
        seconds=REFRESH_TTL_SECONDS
    )


async def test_a_login_returns_a_refresh_token_stored_only_as_its_hash(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    assert result.refresh_token.startswith("rt_")
    presented = parse_refresh_token(result.refresh_token)
    assert presented is not None
    (chain,) = h.db.refresh_chains.values()
    assert (chain.generation, chain.token_hash) == (1, presented.token_hash)
    assert (
        chain.token_hash
        == hashlib.sha256(base64.urlsafe_b64decode(result.refresh_token[3:])[24:56]).digest()
    )


async def test_a_login_after_a_concurrent_disable_is_refused_without_a_session(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann = h.add_user()
    real_verify = h.hasher.verify

    async def verify_then_disable(password: str, password_hash: str) -> bool:
        row = h.db.rows[ann.id]
        disabled = replace(row.user, disable_time=row.user.create_time)
        h.db.rows[ann.id] = type(row)(disabled, row.password_hash)
        return await real_verify(password, password_hash)

    monkeypatch.setattr(h.hasher, "verify", verify_then_disable)
    with pytest.raises(InvalidCredentials):
        await h.login()
    assert h.db.sessions == {}


# -- refresh -----------------------------------------------------------------------


async def test_a_refresh_answers_a_new_pair_in_the_same_session(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    second = await h.auth.refresh_token(refresh_token=first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    assert await h.session_id(second) == await h.session_id(first)
    assert (second.token_type, second.expires_in) == ("Bearer", ACCESS_TTL_SECONDS)


async def test_a_refresh_retires_the_presented_token_and_stores_the_new_one(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    second = await h.auth.refresh_token(refresh_token=first.refresh_token)
    presented = parse_refresh_token(second.refresh_token)
    assert presented is not None
    (chain,) = h.db.refresh_chains.values()
    assert (_generation_of(first.refresh_token), _generation_of(second.refresh_token)) == (1, 2)
    assert (chain.generation, chain.token_hash) == (2, presented.token_hash)


async def test_a_refresh_records_the_sessions_last_refresh_time(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    await h.auth.refresh_token(refresh_token=first.refresh_token)
    assert h.db.sessions[await h.session_id(first)].last_refresh_time is not None


async def test_a_refreshed_access_token_carries_the_users_current_roles(h: Harness) -> None:
    ann = h.add_user()
    first = await h.login()
    row = h.db.rows[ann.id]
    h.db.rows[ann.id] = type(row)(replace(row.user, roles=("admin", "user")), row.password_hash)
    second = await h.auth.refresh_token(refresh_token=first.refresh_token)
    assert (await h.principal(second)).roles == {"admin", "user"}
    assert second.user.roles == ("admin", "user")


async def test_an_unknown_refresh_token_is_invalid(h: Harness) -> None:
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=_unknown_refresh_token())


@pytest.mark.parametrize("token", ["", "rt_", "not-a-token", "x" * 10_000])
async def test_a_malformed_refresh_token_is_invalid_without_a_database_call(
    h: Harness, token: str
) -> None:
    def no_database() -> None:
        raise AssertionError("the database was asked")

    h.auth._uow_factory = no_database  # type: ignore[assignment]
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=token)


async def test_an_access_token_is_not_a_refresh_token(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=result.access_token)


async def test_a_reused_refresh_token_is_invalid(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    await h.auth.refresh_token(refresh_token=first.refresh_token)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)


async def test_a_reused_refresh_token_revokes_the_whole_session(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    await h.auth.refresh_token(refresh_token=first.refresh_token)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)
    session = h.db.sessions[await h.session_id(first)]
    assert session.revoke_reason is RevokeReason.REFRESH_TOKEN_REUSE
    assert h.db.notifications == [[session.id]]


async def test_after_a_reuse_the_successor_refresh_token_is_refused_too(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    second = await h.auth.refresh_token(refresh_token=first.refresh_token)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=second.refresh_token)


async def test_after_a_reuse_the_sessions_access_tokens_are_revoked(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    second = await h.auth.refresh_token(refresh_token=first.refresh_token)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)
    for result in (first, second):
        with pytest.raises(TokenRevoked):
            await h.auth.authenticate(result.access_token)


async def test_a_reuse_reaches_this_process_cache_at_once(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    await h.auth.refresh_token(refresh_token=first.refresh_token)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)
    assert list(h.built.revocations.locally) == [str(await h.session_id(first))]


async def test_a_reuse_on_an_already_revoked_session_announces_nothing_again(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    await h.auth.refresh_token(refresh_token=first.refresh_token)
    for _ in range(2):
        with pytest.raises(RefreshTokenInvalid):
            await h.auth.refresh_token(refresh_token=first.refresh_token)
    assert len(h.db.notifications) == 1


async def test_the_loser_of_a_concurrent_use_counts_as_reuse(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    presented = parse_refresh_token(first.refresh_token)
    assert presented is not None
    assert presented.session_id is not None
    async with h.db.uow() as winner:
        await winner.sessions.use_refresh_token(
            presented.session_id, 1, presented.token_hash, bytes(32)
        )
        with pytest.raises(RefreshTokenInvalid):
            await h.auth.refresh_token(refresh_token=first.refresh_token)
    assert h.db.sessions[await h.session_id(first)].revoke_reason is (
        RevokeReason.REFRESH_TOKEN_REUSE
    )


async def test_a_refresh_after_the_session_expired_is_invalid(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    h.clock.advance(REFRESH_TTL_SECONDS)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)


async def test_rotation_never_extends_a_session(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    h.clock.advance(REFRESH_TTL_SECONDS - 1)
    result = await h.auth.refresh_token(refresh_token=result.refresh_token)
    h.clock.advance(1)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=result.refresh_token)


async def test_a_refresh_of_a_logged_out_session_is_invalid(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    await h.auth.logout(principal=await h.principal(first))
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)


@pytest.mark.parametrize("state", ["disabled", "deleted"])
async def test_a_refresh_for_a_user_no_longer_active_is_invalid(h: Harness, state: str) -> None:
    ann = h.add_user()
    first = await h.login()
    row = h.db.rows[ann.id]
    changed = replace(row.user, **{f"{state[:-1]}_time": row.user.create_time})
    h.db.rows[ann.id] = type(row)(changed, row.password_hash)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)


async def test_a_refused_refresh_leaves_the_token_unused(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    h.clock.advance(REFRESH_TTL_SECONDS)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=first.refresh_token)
    (chain,) = h.db.refresh_chains.values()
    assert chain.generation == _generation_of(first.refresh_token)


# -- logout ------------------------------------------------------------------------


async def test_logout_revokes_the_callers_session(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    await h.auth.logout(principal=await h.principal(result))
    session = h.db.sessions[await h.session_id(result)]
    assert session.revoke_reason is RevokeReason.LOGOUT
    assert session.id in h.db.revocations


async def test_logout_announces_the_session_on_commit(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    sid = await h.session_id(result)
    await h.auth.logout(principal=await h.principal(result))
    assert (h.db.notifications, list(h.built.revocations.locally)) == ([[sid]], [str(sid)])


async def test_after_logout_the_access_token_is_revoked(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    await h.auth.logout(principal=await h.principal(result))
    with pytest.raises(TokenRevoked):
        await h.auth.authenticate(result.access_token)


async def test_logout_leaves_the_users_other_sessions_alone(h: Harness) -> None:
    h.add_user()
    first, second = await h.login(), await h.login()
    await h.auth.logout(principal=await h.principal(first))
    assert h.db.sessions[await h.session_id(second)].revoke_time is None


async def test_logout_with_the_sessions_refresh_token_succeeds(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    principal = await h.principal(result)
    await h.auth.logout(principal=principal, refresh_token=result.refresh_token)
    assert h.db.sessions[await h.session_id(result)].revoke_time is not None


async def test_logout_accepts_a_retired_refresh_token_of_the_session(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    second = await h.auth.refresh_token(refresh_token=first.refresh_token)
    await h.auth.logout(principal=await h.principal(second), refresh_token=first.refresh_token)
    assert h.db.sessions[await h.session_id(first)].revoke_reason is RevokeReason.LOGOUT


@pytest.mark.parametrize("kind", ["other session", "unknown", "malformed"])
async def test_logout_with_a_refresh_token_not_of_the_session_ends_nothing(
    h: Harness, kind: str
) -> None:
    h.add_user()
    mine, other = await h.login(), await h.login()
    token = {
        "other session": other.refresh_token,
        "unknown": _unknown_refresh_token(),
        "malformed": "rt_nope",
    }[kind]
    with pytest.raises(InvalidArgument) as caught:
        await h.auth.logout(principal=await h.principal(mine), refresh_token=token)
    assert [v.field for v in caught.value.violations] == ["refresh_token"]
    assert all(s.revoke_time is None for s in h.db.sessions.values())


async def test_logging_out_twice_succeeds_and_announces_once(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    principal = await h.principal(result)
    await h.auth.logout(principal=principal)
    await h.auth.logout(principal=principal)
    assert len(h.db.notifications) == 1


async def test_logout_of_a_session_without_a_row_still_revokes_its_tokens(h: Harness) -> None:
    ann = h.add_user()
    sid = uuid.uuid4()
    await h.auth.logout(principal=replace(as_user(ann), session_id=str(sid)))
    assert sid in h.db.revocations


async def test_a_certificate_authenticated_service_has_no_session_to_log_out(
    h: Harness,
) -> None:
    with pytest.raises(InvalidState):
        await h.auth.logout(principal=as_mtls_service())


async def test_an_anonymous_caller_cannot_log_out(h: Harness) -> None:
    with pytest.raises(PermissionDenied):
        await h.auth.logout(principal=ANONYMOUS)


# -- revoke all sessions -----------------------------------------------------------


async def test_a_user_revokes_all_its_sessions_with_me_its_own_included(h: Harness) -> None:
    h.add_user()
    first, second = await h.login(), await h.login()
    count = await h.auth.revoke_all_sessions(principal=await h.principal(first), user_id="me")
    assert count == 2
    for result in (first, second):
        with pytest.raises(TokenRevoked):
            await h.auth.authenticate(result.access_token)


async def test_revoke_all_marks_the_reason_and_announces_every_session(h: Harness) -> None:
    h.add_user()
    first, second = await h.login(), await h.login()
    await h.auth.revoke_all_sessions(principal=await h.principal(first), user_id="me")
    sids = sorted([await h.session_id(first), await h.session_id(second)])
    assert h.db.notifications == [sids]
    assert {h.db.sessions[s].revoke_reason for s in sids} == {RevokeReason.REVOKE_ALL}


async def test_an_admin_revokes_another_users_sessions(h: Harness) -> None:
    ann = h.add_user()
    await h.login()
    count = await h.auth.revoke_all_sessions(principal=as_admin(), user_id=str(ann.id))
    assert count == 1


async def test_sessions_already_ended_are_not_counted(h: Harness) -> None:
    ann = h.add_user()
    first = await h.login()
    await h.login()
    await h.auth.logout(principal=await h.principal(first))
    assert await h.auth.revoke_all_sessions(principal=as_admin(), user_id=str(ann.id)) == 1


async def test_revoke_all_leaves_other_users_sessions_alone(h: Harness) -> None:
    ann = h.add_user()
    h.add_user("bob@example.com")
    bobs = await h.login("bob@example.com")
    await h.auth.revoke_all_sessions(principal=as_admin(), user_id=str(ann.id))
    assert h.db.sessions[await h.session_id(bobs)].revoke_time is None


@pytest.mark.parametrize(
    "caller", [as_user(uuid.uuid4()), as_service_account()], ids=["other user", "service"]
)
async def test_only_the_user_itself_and_admins_may_revoke_all(
    h: Harness, caller: Principal
) -> None:
    ann = h.add_user()
    await h.login()
    with pytest.raises(PermissionDenied):
        await h.auth.revoke_all_sessions(principal=caller, user_id=str(ann.id))
    assert h.db.notifications == []


async def test_a_refusal_does_not_tell_whether_the_user_exists(h: Harness) -> None:
    with pytest.raises(PermissionDenied):
        await h.auth.revoke_all_sessions(principal=as_user(uuid.uuid4()), user_id=str(uuid.uuid4()))


async def test_an_anonymous_caller_cannot_revoke_sessions(h: Harness) -> None:
    with pytest.raises(PermissionDenied):
        await h.auth.revoke_all_sessions(principal=ANONYMOUS, user_id=str(uuid.uuid4()))


async def test_revoking_the_sessions_of_a_missing_user_is_not_found(h: Harness) -> None:
    with pytest.raises(UserNotFound):
        await h.auth.revoke_all_sessions(principal=as_admin(), user_id=str(uuid.uuid4()))


async def test_a_malformed_user_id_is_invalid(h: Harness) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await h.auth.revoke_all_sessions(principal=as_admin(), user_id="nope")
    assert [v.field for v in caught.value.violations] == ["user_id"]


# -- authenticate and introspect ---------------------------------------------------


async def test_authenticate_asks_the_revocation_check_for_the_tokens_session(
    h: Harness,
) -> None:
    h.add_user()
    result = await h.login()
    before = h.built.revocations.checks
    await h.auth.authenticate(result.access_token)
    assert h.built.revocations.checks == before + 1


async def test_an_admin_sees_an_active_tokens_claims(h: Harness) -> None:
    ann = h.add_user(roles=("user", "admin"))
    result = await h.login()
    seen = await h.auth.introspect_token(principal=as_admin(), token=result.access_token)
    assert (seen.active, seen.subject, seen.roles, seen.session_id) == (
        True,
        str(ann.id),
        ("admin", "user"),
        str(await h.session_id(result)),
    )
    assert seen.expire_time == h.built.revoker.lifetimes.now() + timedelta(
        seconds=ACCESS_TTL_SECONDS
    )


async def test_a_certificate_authenticated_service_may_introspect(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    seen = await h.auth.introspect_token(principal=as_mtls_service(), token=result.access_token)
    assert seen.active


async def test_a_revoked_token_is_inactive(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    await h.auth.logout(principal=await h.principal(result))
    seen = await h.auth.introspect_token(principal=as_admin(), token=result.access_token)
    assert (seen.active, seen.subject, seen.expire_time) == (False, "", None)


async def test_an_expired_token_is_inactive(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    h.clock.advance(ACCESS_TTL_SECONDS + 60)
    seen = await h.auth.introspect_token(principal=as_admin(), token=result.access_token)
    assert not seen.active


async def test_a_token_signed_by_another_key_is_inactive(h: Harness) -> None:
    ann = h.add_user()
    foreign = TokenService(
        KeyRing(SigningKey.ed25519(Ed25519PrivateKey.generate())),
        issuer="usersvc",
        audience="usersvc",
        access_ttl_seconds=ACCESS_TTL_SECONDS,
        clock=h.clock,
    )
    token, _ = foreign.issue_access_token(ann, session_id=str(uuid.uuid4()))
    seen = await h.auth.introspect_token(principal=as_admin(), token=token)
    assert not seen.active


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "rt_" + "A" * 43, "x" * 100_000])
async def test_a_malformed_token_is_inactive_not_an_error(h: Harness, token: str) -> None:
    seen = await h.auth.introspect_token(principal=as_admin(), token=token)
    assert not seen.active


async def test_a_refresh_token_is_inactive(h: Harness) -> None:
    h.add_user()
    result = await h.login()
    seen = await h.auth.introspect_token(principal=as_admin(), token=result.refresh_token)
    assert not seen.active


@pytest.mark.parametrize(
    "caller", [as_user(uuid.uuid4()), ANONYMOUS], ids=["plain user", "anonymous"]
)
async def test_only_admins_and_services_may_introspect(h: Harness, caller: Principal) -> None:
    with pytest.raises(PermissionDenied):
        await h.auth.introspect_token(principal=caller, token="garbage")


async def _store_roles(h: Harness, user: User, *roles: str) -> None:
    # Behind the services' back: no session is revoked.
    async with h.db.uow() as uow:
        await patch_user(uow, user.id, UserPatch(roles=roles))
        await uow.commit()


async def test_an_admin_token_is_revoked_once_the_stored_roles_lack_admin(h: Harness) -> None:
    ann = h.add_user(roles=("user", "admin"))
    result = await h.login()
    await h.auth.authenticate(result.access_token)
    await _store_roles(h, ann, "user")
    with pytest.raises(TokenRevoked):
        await h.auth.authenticate(result.access_token)


@pytest.mark.parametrize("state", ["disabled", "deleted"])
async def test_an_admin_token_of_a_user_no_longer_active_is_revoked(h: Harness, state: str) -> None:
    h.add_user(roles=("user", "admin"))
    result = await h.login()
    other = h.add_user("zed@example.com", **{state: True})
    token, _ = h.built.tokens.issue_access_token(
        replace(other, roles=("user", "admin")), session_id=str(uuid.uuid4())
    )
    with pytest.raises(TokenRevoked):
        await h.auth.authenticate(token)
    await h.auth.authenticate(result.access_token)


async def test_a_plain_users_token_is_not_checked_against_the_stored_roles(h: Harness) -> None:
    ann = h.add_user()
    result = await h.login()
    await _store_roles(h, ann, "user", "service")
    principal = await h.auth.authenticate(result.access_token)
    assert principal.roles == frozenset({"user"})


async def test_introspection_of_a_token_whose_roles_changed_is_inactive(h: Harness) -> None:
    ann = h.add_user()
    result = await h.login()
    await _store_roles(h, ann, "user", "service")
    seen = await h.auth.introspect_token(principal=as_admin(), token=result.access_token)
    assert not seen.active


# -- the chain's storage and sessions from before it -------------------------------


async def test_a_hundred_rotations_keep_one_chain_entry_and_the_old_tokens_count_as_reuse(
    h: Harness,
) -> None:
    h.add_user()
    tokens = [(await h.login()).refresh_token]
    for _ in range(100):
        tokens.append((await h.auth.refresh_token(refresh_token=tokens[-1])).refresh_token)
    assert len(h.db.refresh_chains) == len(h.db.sessions) == 1
    assert _generation_of(tokens[-1]) == 101
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=tokens[37])
    (session,) = h.db.sessions.values()
    assert session.revoke_reason is RevokeReason.REFRESH_TOKEN_REUSE


async def test_a_made_up_older_generation_is_unknown_and_ends_nothing(h: Harness) -> None:
    h.add_user()
    first = await h.login()
    await h.auth.refresh_token(refresh_token=first.refresh_token)
    raw = bytearray(base64.urlsafe_b64decode(first.refresh_token[3:]))
    raw[-1] ^= 1  # the tag
    forged = "rt_" + base64.urlsafe_b64encode(bytes(raw)).decode()
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=forged)
    (session,) = h.db.sessions.values()
    assert session.revoke_time is None
    assert h.db.notifications == []


async def test_a_token_from_before_the_chain_works_once_and_is_reuse_after(h: Harness) -> None:
    ann = h.add_user()
    secret = bytes(range(32))
    legacy = "rt_" + base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    async with h.db.uow() as uow:
        session = uow.sessions.add_legacy_session(
            ann.id,
            h.built.revoker.lifetimes.now() + timedelta(seconds=REFRESH_TTL_SECONDS),
            hashlib.sha256(secret).digest(),
        )
        await uow.commit()
    refreshed = await h.auth.refresh_token(refresh_token=legacy)
    assert await h.session_id(refreshed) == session.id
    assert _generation_of(refreshed.refresh_token) == 1
    again = await h.auth.refresh_token(refresh_token=refreshed.refresh_token)
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=legacy)
    assert h.db.sessions[session.id].revoke_reason is RevokeReason.REFRESH_TOKEN_REUSE
    with pytest.raises(RefreshTokenInvalid):
        await h.auth.refresh_token(refresh_token=again.refresh_token)
