"""AuthService: the use cases behind usersvc.v1.AuthService (login, refresh,
logout, revocation, introspection, keys, token checks).

Every failed login gets the same answer after the same work: unknown email,
wrong password, disabled or deleted user, a temporarily locked account and
unusable input all cost one bcrypt check at the configured cost and end in
InvalidCredentials, so neither the answer nor its timing tells whether an
email is registered, or whether a guess made during a lock was right.

Repeated failures lock an account for a while (usersvc.domain.lockout): a
wrong password, once checked, is counted in the users row by one atomic
statement, so that concurrent failures on however many replicas lock the
account exactly as the same failures one after the other would, and
concurrent logins with the right password never count at all. Guesses that
were already being checked when the lock fell are still answered (all with
InvalidCredentials, a right one too: a success re-checks the lock).

Every login starts a session; its access tokens name it (``sid``) and its
refresh tokens rotate within it, single-use. A refresh token presented a
second time (a replay, or the loser of two concurrent uses) revokes the whole
session (RFC 9700 section 4.14.2): one of the two holders is not the owner,
and the server cannot tell which.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import jwt

from usersvc.domain import policies
from usersvc.domain.errors import (
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    InvalidState,
    PermissionDenied,
    RefreshTokenInvalid,
    TokenInvalid,
    TokenRevoked,
    Unauthenticated,
    UserNotFound,
)
from usersvc.domain.events import EventDraft, EventType, LoginFailureCause
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import (
    Principal,
    PrincipalKind,
    RevokeReason,
    User,
    UserState,
)
from usersvc.domain.passwords import MAX_PASSWORD_BYTES
from usersvc.domain.ports import (
    LoginAttempt,
    LoginOutcomeHook,
    RefreshChain,
    RefreshOutcome,
    RefreshStatus,
    RevocationChecker,
    UnitOfWork,
    UnitOfWorkFactory,
    UserReader,
)
from usersvc.domain.role_checks import RoleCheck
from usersvc.domain.validation import normalize_email, parse_user_id
from usersvc.services.inputs import LoginResult, TokenIntrospection
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.sessions import (
    FIRST_GENERATION,
    PresentedRefreshToken,
    RefreshSecret,
    SessionRevoker,
    issue_refresh_token,
    new_refresh_secret,
    new_tag_key,
    parse_refresh_token,
    session_id_of,
)
from usersvc.services.tokens import TokenService
from usersvc.services.users import UnitOfWorkUserReader

logger = logging.getLogger(__name__)

TOKEN_TYPE = "Bearer"  # noqa: S105 (an RFC 6750 scheme name, not a secret)
# Checked against the dummy hash when there is nothing real to check; any
# valid-length text works, the result is discarded.
_PLACEHOLDER_PASSWORD = "not-a-password"  # noqa: S105
_INACTIVE = TokenIntrospection(active=False)
# Counting a failure against no user: the write a counted failure makes, on
# no row (uuid7 ids are never all zeros).
_NOBODY = uuid.UUID(int=0)
_LOGIN_SUCCEEDED = (EventDraft(EventType.LOGIN_SUCCEEDED),)


class AuthService:
    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        hasher: BcryptPasswordHasher,
        tokens: TokenService,
        revocations: RevocationChecker,
        sessions: SessionRevoker,
        lockout: LockoutPolicy | None = None,
        clock: Callable[[], float] = time.time,
        on_login: LoginOutcomeHook | None = None,
        reader: UserReader | None = None,
    ) -> None:
        """``lockout`` limits failed logins (the defaults of LockoutPolicy
        when None); ``clock`` tells the time of locks (seconds since the
        epoch, like time.time); ``on_login`` hears each login's outcome
        (metrics); ``reader`` reads a caller's current roles (through a
        unit of work when None). Raises nothing."""
        self._reader: UserReader = reader or UnitOfWorkUserReader(uow_factory)
        self._on_login = on_login
        self._lockout = lockout or LockoutPolicy()
        self._clock = clock
        self._uow_factory = uow_factory
        self._hasher = hasher
        self._tokens = tokens
        self._revocations = revocations
        self._sessions = sessions
        self._lifetimes = sessions.lifetimes

    # -- login and refresh -------------------------------------------------------

    async def login(self, *, email: str, password: str) -> LoginResult:
        """A new session of the active user with these credentials: an access
        token and a refresh token. Each attempt on an existing account counts
        towards its temporary lock; a success clears the count.

        Raises InvalidCredentials for every kind of failure (one answer for
        all, locked accounts included), DatabaseUnavailable.
        """
        problems: list[FieldViolation] = []
        normalized = normalize_email(email, field="email", errors=problems)
        usable = not problems and 0 < len(password.encode("utf-8", "replace")) <= MAX_PASSWORD_BYTES
        now = datetime.fromtimestamp(self._clock(), UTC)
        candidate: LoginAttempt | None = None
        if usable:
            # Read only: no connection is held while bcrypt runs, and an
            # attempt is counted only once its password turned out wrong.
            async with self._uow_factory() as uow:
                candidate = await uow.users.find_login(normalized)
        if candidate is None or _locked(candidate.locked_until, now):
            # Unknown email or a locked account: the same bcrypt work and the
            # same write as a wrong password, so that timing tells neither
            # apart from one. A locked account's own hash is not even looked
            # at, and nothing is counted.
            await self._hasher.verify(_PLACEHOLDER_PASSWORD, await self._hasher.dummy_hash())
            self._outcome("unknown_or_locked" if usable else "malformed")
            if usable:
                await self._record_failure(now, email=normalized)
            raise InvalidCredentials()
        credentials = candidate.credentials
        matches = await self._hasher.verify(password, credentials.password_hash)
        if not matches or credentials.user.state is not UserState.ACTIVE:
            # A stored hash cheaper than the configured cost (an import, an
            # older setting) would answer faster than an unknown email does:
            # pad to the configured cost so time does not tell them apart.
            await self._hasher.pad(credentials.password_hash)
            # Only a wrong password is a failure that counts; the right one
            # for a disabled or deleted account does the same write, on no
            # row.
            locked_until = await self._record_failure(
                now, user=credentials.user, password_matched=matches
            )
            if matches:
                self._outcome("inactive")
            else:
                self._outcome("bad_password" if locked_until is None else "locked_out")
            if locked_until is not None:
                logger.warning(
                    "account locked after repeated failed logins",
                    extra={
                        "user_id": str(credentials.user.id),
                        "locked_until": locked_until.isoformat(),
                    },
                )
            raise InvalidCredentials()
        # Hashed before the unit of work opens: bcrypt never holds a
        # connection.
        new_hash = None
        if self._hasher.needs_rehash(credentials.password_hash):
            new_hash = await self._hasher.hash(password)
        secret = new_refresh_secret()
        tag_key = new_tag_key()
        session_now = self._lifetimes.now()
        user_id = credentials.user.id
        async with self._uow_factory() as uow:
            # Locked, then read again: a disable, delete or password change
            # that committed since the check above wins (its revocation could
            # not have seen this session), and one still running waits for
            # this login and then revokes the session it creates.
            # Clearing the failure count also takes the row lock; a refusal
            # below rolls the clearing back. It clears nothing on an account
            # that concurrent wrong guesses locked since the check above: as
            # if this attempt had come after them, it is refused.
            if not await uow.users.clear_login_failures(
                user_id, unless_locked_at=now, events=_LOGIN_SUCCEEDED
            ):
                self._outcome("locked_out")
                raise InvalidCredentials()
            latest = await uow.users.get_credentials(user_id)
            if (
                latest is None
                or latest.user.state is not UserState.ACTIVE
                or not hmac.compare_digest(
                    latest.password_hash.encode(), credentials.password_hash.encode()
                )
            ):
                self._outcome("inactive")
                raise InvalidCredentials()
            user = latest.user
            if new_hash is not None:
                # After a change of the configured cost, or an import at
                # another cost: store a hash at the configured one.
                user = await uow.users.set_password_hash(user_id, new_hash)
            session = await uow.sessions.create(
                user_id,
                self._lifetimes.session_expire_time(session_now),
                refresh_hash=secret.token_hash,
                tag_key=tag_key,
            )
            await uow.commit()
        self._outcome("success")
        chain = RefreshChain(FIRST_GENERATION, tag_key)
        return self._result(user, session.id, issue_refresh_token(session.id, chain, secret))

    async def _record_failure(
        self,
        now: datetime,
        *,
        email: str = "",
        user: User | None = None,
        password_matched: bool = False,
    ) -> datetime | None:
        """After bcrypt, in one transaction for every kind of failure: count
        a wrong password of ``user`` (the same statement on no row for the
        others) and write the auth.login_failed event (and auth
        .account_locked when this failure locked the account); ``email``
        when no account was checked. Returns the end of the lock this
        failure started. Raises DatabaseUnavailable."""
        counted = user.id if user is not None and not password_matched else _NOBODY
        async with self._uow_factory() as uow:
            locked_until = await uow.users.count_login_failure(
                counted, now=now, policy=self._lockout
            )
            if user is None:
                await uow.events.add_login_failure(email)
            else:
                cause = (
                    LoginFailureCause.DISABLED
                    if password_matched
                    else LoginFailureCause.WRONG_PASSWORD
                )
                drafts = [EventDraft(EventType.LOGIN_FAILED, attributes={"cause": cause.value})]
                if locked_until is not None:
                    drafts.append(
                        EventDraft(
                            EventType.ACCOUNT_LOCKED,
                            attributes={"locked_until": locked_until.isoformat()},
                        )
                    )
                await uow.events.add(user.id, drafts)
            await uow.commit()
        return locked_until

    def _outcome(self, outcome: str) -> None:
        if self._on_login is not None:
            self._on_login(outcome)

    async def refresh_token(self, *, refresh_token: str) -> LoginResult:
        """A new token pair for the session of ``refresh_token``, which is
        retired. A retired token revokes its whole session.

        Raises RefreshTokenInvalid (malformed, unknown, retired, session
        revoked or expired, user no longer active), DatabaseUnavailable.
        """
        presented = parse_refresh_token(refresh_token)
        if presented is None:
            raise RefreshTokenInvalid()
        successor = new_refresh_secret()
        now = self._lifetimes.now()
        async with self._uow_factory() as uow:
            outcome = await self._use(uow, presented, successor)
            session = outcome.session
            if outcome.status is RefreshStatus.RETIRED and session is not None:
                revocation = await self._sessions.revoke_sessions(
                    uow, [session.id], RevokeReason.REFRESH_TOKEN_REUSE
                )
                await uow.events.add(
                    session.user_id,
                    [
                        EventDraft(
                            EventType.REFRESH_TOKEN_REUSED,
                            attributes={"session_id": str(session.id)},
                        )
                    ],
                )
                await uow.commit()
                self._sessions.committed(revocation)
                if revocation.session_ids:
                    logger.warning(
                        "a retired refresh token was presented again; session revoked",
                        extra={"session_id": str(session.id), "user_id": str(session.user_id)},
                    )
                raise RefreshTokenInvalid()
            chain = outcome.chain
            if outcome.status is not RefreshStatus.OK or session is None or chain is None:
                raise RefreshTokenInvalid()
            # Leaving without a commit keeps the presented token valid; it
            # is refused all the same while the session stays dead.
            if not session.is_active(now):
                raise RefreshTokenInvalid()
            user = await uow.users.get(session.user_id)
            if user is None or user.state is not UserState.ACTIVE:
                raise RefreshTokenInvalid()
            await uow.commit()
        return self._result(user, session.id, issue_refresh_token(session.id, chain, successor))

    @staticmethod
    async def _use(
        uow: UnitOfWork, presented: PresentedRefreshToken, successor: RefreshSecret
    ) -> RefreshOutcome:
        if presented.legacy_hash is not None:
            return await uow.sessions.use_legacy_refresh_token(
                presented.legacy_hash, successor.token_hash, new_tag_key()
            )
        if presented.session_id is None:
            return RefreshOutcome(RefreshStatus.UNKNOWN)
        outcome = await uow.sessions.use_refresh_token(
            presented.session_id, presented.generation, presented.token_hash, successor.token_hash
        )
        if outcome.status is RefreshStatus.RETIRED and (
            outcome.chain is None or not presented.issued_in(outcome.chain)
        ):
            # An older generation with a wrong tag: made up, not replayed.
            return RefreshOutcome(RefreshStatus.UNKNOWN)
        return outcome

    def _result(self, user: User, session_id: uuid.UUID, refresh_token: str) -> LoginResult:
        access_token, expires_in = self._tokens.issue_access_token(user, session_id=str(session_id))
        return LoginResult(
            access_token=access_token,
            refresh_token=refresh_token,
            token_type=TOKEN_TYPE,
            expires_in=expires_in,
            user=user,
        )

    # -- ending sessions ---------------------------------------------------------

    async def logout(self, *, principal: Principal, refresh_token: str = "") -> None:
        """Ends the caller's session; its access and refresh tokens stop
        working. ``refresh_token``, when given, must belong to that session
        (retired ones too); otherwise nothing changes. Ending a session that
        already ended succeeds.

        Raises PermissionDenied (anonymous), InvalidState (a caller without
        a session: a certificate-authenticated service), TokenInvalid (a sid
        that is not a session id), InvalidArgument (field "refresh_token"),
        DatabaseUnavailable.
        """
        if not principal.is_authenticated:
            raise PermissionDenied("this method needs an authenticated caller")
        if principal.kind is not PrincipalKind.USER or not principal.session_id:
            raise InvalidState(
                "the caller has no session to end: it authenticated with a client "
                "certificate, not an access token"
            )
        session_id = session_id_of(principal.session_id)
        if session_id is None:
            raise TokenInvalid()
        presented = parse_refresh_token(refresh_token) if refresh_token else None
        if refresh_token and presented is None:
            raise _foreign_refresh_token()
        async with self._uow_factory() as uow:
            if presented is not None and not await _belongs_to(uow, presented, session_id):
                raise _foreign_refresh_token()
            revocation = await self._sessions.revoke_sessions(
                uow, [session_id], RevokeReason.LOGOUT
            )
            await uow.commit()
        self._sessions.committed(revocation)

    async def revoke_all_sessions(self, *, principal: Principal, user_id: str) -> int:
        """Ends every session of the user ("me": the caller, whose own
        session ends too); returns how many were still live.

        Raises PermissionDenied, InvalidArgument (field "user_id"),
        UserNotFound, DatabaseUnavailable.
        """
        if not principal.is_authenticated:
            raise PermissionDenied("this method needs an authenticated caller")
        target = parse_user_id(user_id, "user_id", principal)
        policies.ensure(
            policies.can_revoke_sessions(principal, target), "revoke this user's sessions"
        )
        async with self._uow_factory() as uow:
            if await uow.users.get(target) is None:
                raise UserNotFound(metadata={"id": str(target)})
            revocation = await self._sessions.revoke_user(uow, target, RevokeReason.REVOKE_ALL)
            await uow.commit()
        self._sessions.committed(revocation)
        return len(revocation.session_ids)

    # -- checking tokens ---------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        """The caller a valid access token names. No database query while
        the revocation cache is healthy, except the re-check of a token
        that claims a privilege.

        Raises TokenExpired, TokenInvalid, TokenRevoked, DatabaseUnavailable
        (the revocation cache is stale and the database cannot be asked).
        """
        principal, role_check = await self.authenticate_deferring_role_check(token)
        if role_check is not None:
            await self.settle_role_check(role_check)
        return principal

    async def authenticate_deferring_role_check(
        self, token: str
    ) -> tuple[Principal, RoleCheck | None]:
        """``authenticate`` without the re-check of a privileged token's
        roles, which it returns instead (None for a token claiming no
        privilege), for the caller to settle before acting on the principal:
        in the statement of a plain read (usersvc.domain.role_checks), or
        with ``settle_role_check``.

        Raises TokenExpired, TokenInvalid, TokenRevoked, DatabaseUnavailable.
        """
        principal = self._tokens.verify_access_token(token)
        if await self._revocations.is_revoked(principal.session_id):
            raise TokenRevoked()
        if policies.claims_privilege(principal):
            # A role change revokes the user's sessions, but the revocation
            # takes up to a second to reach other replicas, and a role
            # changed by other means revokes nothing: a token claiming more
            # than "user" counts only while the stored roles still hold
            # what it claims. One primary-key read, on admin and service
            # tokens only.
            return principal, RoleCheck.of(principal)
        return principal, None

    async def settle_role_check(self, role_check: RoleCheck) -> None:
        """Do ``role_check`` with a read of its account of its own (nothing
        when it is done already). Raises TokenRevoked when it fails,
        DatabaseUnavailable."""
        if not role_check.done:
            role_check.settle_on(await self._reader.get(role_check.account_id))
        role_check.ensure_passed()

    async def _current_holder(self, principal: Principal, *, exact: bool) -> User:
        """The token's user as stored now, when it is active and holds every
        role the token claims (exactly those with ``exact``).

        Raises TokenRevoked otherwise, DatabaseUnavailable.
        """
        user_id = principal.user_id()
        user = None if user_id is None else await self._reader.get(user_id)
        if (
            user is None
            or user.state is not UserState.ACTIVE
            or not policies.holds_claimed_roles(principal, user.roles)
            or (exact and principal.roles != frozenset(user.roles))
        ):
            raise TokenRevoked("the access token's roles are no longer the user's")
        return user

    async def introspect_token(self, *, principal: Principal, token: str) -> TokenIntrospection:
        """Whether ``token`` is an access token that authenticate would
        accept now, and what it says. Any bad token is simply inactive.

        Raises PermissionDenied (callers other than admins and services),
        DatabaseUnavailable.
        """
        policies.ensure(policies.can_introspect(principal), "introspect tokens")
        try:
            subject = await self.authenticate(token)
            # Roles reported are the stored ones: a token whose roles
            # changed since it was issued is no longer active.
            await self._current_holder(subject, exact=True)
        except Unauthenticated:
            return _INACTIVE
        return TokenIntrospection(
            active=True,
            subject=subject.subject,
            roles=tuple(sorted(subject.roles)),
            session_id=subject.session_id,
            expire_time=_expire_time(token),
        )

    def jwks_json(self) -> str:
        """The public verification keys (RFC 7517). Raises nothing."""
        return self._tokens.jwks_json()


def _locked(locked_until: datetime | None, now: datetime) -> bool:
    return locked_until is not None and locked_until > now


async def _belongs_to(
    uow: UnitOfWork, presented: PresentedRefreshToken, session_id: uuid.UUID
) -> bool:
    """Whether the token, valid or retired, was issued in the session."""
    if presented.legacy_hash is not None:
        return await uow.sessions.find_legacy_refresh_token(presented.legacy_hash) == session_id
    if presented.session_id != session_id:
        return False
    chain = await uow.sessions.refresh_chain(session_id)
    return chain is not None and presented.issued_in(chain)


def _foreign_refresh_token() -> InvalidArgument:
    return InvalidArgument.single("refresh_token", "is not a refresh token of the caller's session")


def _expire_time(verified_token: str) -> datetime | None:
    # Only called once TokenService has verified this very string, so reading
    # the claim without checking the signature again is safe.
    try:
        exp = jwt.decode(verified_token, options={"verify_signature": False})["exp"]
        return datetime.fromtimestamp(float(exp), UTC)
    except (jwt.PyJWTError, KeyError, TypeError, ValueError, OverflowError):
        return None
