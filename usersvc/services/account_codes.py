"""Email verification and password reset by codes (usersvc.domain.codes).

usersvc sends no mail: an admin or another service asks for a code and
delivers it; the person types it back. Codes are stored only as
HMAC-SHA256(key, kind ":" code), the key derived from the token signing key
(``code_key``), so a copy of the database alone neither reveals a code nor
lets anyone check guesses offline. Rotating the signing key voids the codes
outstanding then (they live minutes).

No enumeration (ASVS V6.3.8): CreatePasswordResetCode and ResetPassword do
the same work whether or not the email belongs to an active user: a code is
drawn and hashed, the same statements run (matching nothing), and their
commits skip the WAL flush on every path that may touch nothing, so that no
path waits for the disk when another does not. ResetPassword hashes the new
password with bcrypt before it looks at the code, for the same reason.

Every write below is one call on the unit of work, with its event
(user.email_verified, user.password_reset) in the same statement; the
sessions a reset ends write their auth.session_revoked events as any
revocation does.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from usersvc.domain import policies
from usersvc.domain.codes import (
    CODE_ALPHABET,
    CODE_LENGTH,
    MAX_CODE_ATTEMPTS,
    MAX_CODE_FIELD_LENGTH,
    CodeKind,
    normalize_code,
)
from usersvc.domain.errors import (
    CodeInvalid,
    FieldViolation,
    InvalidState,
    PermissionDenied,
    UserNotFound,
)
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.models import Principal, RevokeReason, User, UserState, uuid7
from usersvc.domain.passwords import PasswordPolicy
from usersvc.domain.ports import PasswordHasher, UnitOfWorkFactory
from usersvc.domain.validation import normalize_email, parse_user_id, raise_for_violations
from usersvc.services.sessions import SessionRevoker
from usersvc.services.tokens import KeyRing

_KEY_LABEL = b"usersvc account codes v1"
# The events of the two writes; no event ever holds a code.
_EMAIL_VERIFIED = (EventDraft(EventType.USER_EMAIL_VERIFIED),)
_PASSWORD_RESET = (EventDraft(EventType.USER_PASSWORD_RESET),)


def code_key(key_ring: KeyRing) -> bytes:
    """The HMAC key of codes, derived from the signing key (Ed25519 private
    key or HS256 secret), so every replica holding the same signing key
    derives the same one and no new secret needs configuring. Raises
    nothing."""
    private = key_ring.signing_key.private_key
    if isinstance(private, Ed25519PrivateKey):
        material = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    else:
        material = private
    return hmac.new(material, _KEY_LABEL, hashlib.sha256).digest()


def new_code() -> str:
    """A fresh code: CODE_LENGTH characters of CODE_ALPHABET from
    ``secrets`` (5 bits each). Raises nothing."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


@dataclass(frozen=True, slots=True)
class IssuedCode:
    """A code to hand to the caller (empty: none was issued) and its end."""

    code: str = field(repr=False)
    expire_time: datetime


class AccountCodeService:
    """The use cases behind CreateEmailVerificationCode, VerifyEmail,
    CreatePasswordResetCode and ResetPassword."""

    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        hasher: PasswordHasher,
        password_policy: PasswordPolicy,
        sessions: SessionRevoker,
        key: bytes,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``key`` is the HMAC key of codes (see code_key). Raises nothing."""
        self._uow_factory = uow_factory
        self._hasher = hasher
        self._policy = password_policy
        self._sessions = sessions
        self._key = key
        self._ttl = timedelta(seconds=ttl_seconds)
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _hash(self, kind: CodeKind, code: str) -> bytes:
        message = f"{kind.value}:{code}".encode("ascii")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    # -- email verification -------------------------------------------------

    async def create_email_verification_code(
        self, *, principal: Principal, user_id: str
    ) -> IssuedCode:
        """A new email verification code for the user, voiding its previous
        one.

        Raises PermissionDenied (admins and services only), InvalidArgument,
        UserNotFound (missing or deleted), InvalidState (disabled user).
        """
        policies.ensure(policies.can_issue_codes(principal), "issue verification codes")
        target = _target(principal, user_id, "id")
        code = new_code()
        code_hash = self._hash(CodeKind.EMAIL_VERIFICATION, code)
        expire_time = self._now() + self._ttl
        async with self._uow_factory() as uow:
            user = await uow.users.get(target, for_update=True)
            if user is None or user.state is UserState.DELETED:
                raise UserNotFound(metadata={"id": str(target)})
            if user.state is UserState.DISABLED:
                raise InvalidState("the user is disabled")
            await uow.accounts.replace_code(
                target, CodeKind.EMAIL_VERIFICATION, code_hash, expire_time
            )
            await uow.commit()
        return IssuedCode(code, expire_time)

    async def verify_email(self, *, principal: Principal, user_id: str, code: str) -> User:
        """Marks the user's email verified with a live code, consuming it.
        A wrong code counts as a try (the fifth voids the code).

        Raises PermissionDenied, InvalidArgument (id; code empty or over 64
        characters), UserNotFound (missing or deleted), CodeInvalid.
        """
        target = _target(principal, user_id, "id")
        policies.ensure(policies.can_verify_email(principal, target), "verify this user's email")
        errors: list[FieldViolation] = []
        presented = _presented_code(code, errors)
        raise_for_violations(errors)
        if presented is None:
            raise CodeInvalid()
        code_hash = self._hash(CodeKind.EMAIL_VERIFICATION, presented)
        async with self._uow_factory() as uow:
            user = await uow.users.get(target, for_update=True)
            if user is None or user.state is UserState.DELETED:
                raise UserNotFound(metadata={"id": str(target)})
            consumed = await uow.accounts.consume_code(
                CodeKind.EMAIL_VERIFICATION,
                code_hash,
                now=self._now(),
                max_attempts=MAX_CODE_ATTEMPTS,
                user_id=target,
            )
            if consumed is None:
                # The wrong try stays counted.
                await uow.accounts.relax_commit()
                await uow.commit()
                raise CodeInvalid()
            user = await uow.accounts.set_email_verified(target, events=_EMAIL_VERIFIED)
            await uow.commit()
        return user

    # -- password reset -----------------------------------------------------

    async def create_password_reset_code(self, *, principal: Principal, email: str) -> IssuedCode:
        """A new password reset code for the active user with ``email``,
        voiding its previous one; an empty code when there is no such user,
        after the same work.

        Raises PermissionDenied (admins and services only), InvalidArgument
        (email syntax).
        """
        policies.ensure(policies.can_issue_codes(principal), "issue password reset codes")
        errors: list[FieldViolation] = []
        normalized = normalize_email(email, field="email", errors=errors)
        raise_for_violations(errors)
        code = new_code()
        code_hash = self._hash(CodeKind.PASSWORD_RESET, code)
        expire_time = self._now() + self._ttl
        async with self._uow_factory() as uow:
            # A code lost to a crash is asked for again; the flush would
            # make a real email's answer slower than an unknown one's.
            await uow.accounts.relax_commit()
            owner = await uow.accounts.lock_active_user_by_email(normalized)
            # Without an owner the same statements run for an id that
            # matches nothing (a fresh one).
            stored = await uow.accounts.replace_code(
                owner or uuid7(), CodeKind.PASSWORD_RESET, code_hash, expire_time
            )
            await uow.commit()
        return IssuedCode(code if stored else "", expire_time)

    async def reset_password(self, *, email: str, code: str, new_password: str) -> None:
        """Sets a new password with a live reset code: ends every session
        of the user, clears a login lock and consumes the code. Anyone may
        call it (the code is the credential).

        Raises InvalidArgument (email syntax; code empty or over 64
        characters), WeakPassword (field "new_password"), CodeInvalid (an
        unknown email, or a wrong, used, voided or expired code; a wrong
        code counts as a try).
        """
        errors: list[FieldViolation] = []
        normalized = normalize_email(email, field="email", errors=errors)
        presented = _presented_code(code, errors)
        password_errors = self._policy.violations(
            new_password, field="new_password", email=normalized
        )
        raise_for_violations(errors, password_errors)
        if presented is None:
            raise CodeInvalid()
        code_hash = self._hash(CodeKind.PASSWORD_RESET, presented)
        # Before the code is looked at, on every path: bcrypt is the
        # slowest step and must not tell a real user from a stranger.
        new_hash = await self._hasher.hash(new_password)
        async with self._uow_factory() as uow:
            user_id = await uow.accounts.consume_code(
                CodeKind.PASSWORD_RESET,
                code_hash,
                now=self._now(),
                max_attempts=MAX_CODE_ATTEMPTS,
                email=normalized,
            )
            if user_id is None:
                await uow.accounts.relax_commit()
                await uow.commit()
                raise CodeInvalid()
            await uow.users.set_password_hash(user_id, new_hash, events=_PASSWORD_RESET)
            await uow.users.clear_login_failures(user_id)
            revocation = await self._sessions.revoke_user(uow, user_id, RevokeReason.PASSWORD_RESET)
            await uow.commit()
        self._sessions.committed(revocation)


def _target(principal: Principal, raw_id: str, field: str) -> uuid.UUID:
    """Raises PermissionDenied for anonymous callers, InvalidArgument."""
    if not principal.is_authenticated:
        raise PermissionDenied("this method needs an authenticated caller")
    return parse_user_id(raw_id, field, principal)


def _presented_code(code: str, errors: list[FieldViolation]) -> str | None:
    """The canonical code, or None when it cannot be one of ours; appends a
    violation of "code" when it is empty or oversized."""
    if not code:
        errors.append(FieldViolation("code", "is required"))
        return None
    if len(code) > MAX_CODE_FIELD_LENGTH:
        errors.append(FieldViolation("code", f"must be at most {MAX_CODE_FIELD_LENGTH} characters"))
        return None
    return normalize_code(code)


__all__ = ["AccountCodeService", "IssuedCode", "code_key", "new_code"]
