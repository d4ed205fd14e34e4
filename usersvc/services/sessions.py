"""Sessions: refresh tokens, lifetimes, and revoking within a unit of work.

A refresh token is ``rt_`` + base64url of 32 random bytes: 256 bits nobody
can guess, so a single SHA-256 of those bytes is a safe thing to store (a
slow password hash protects low-entropy secrets, which these are not). The
prefix lets secret scanners and people recognise one; a string of any other
shape is refused before the database is asked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from usersvc.domain.models import RevokeReason
from usersvc.domain.ports import RevokedHook, UnitOfWork
from usersvc.domain.revocations import REVOCATION_MARGIN

REFRESH_TOKEN_PREFIX = "rt_"  # noqa: S105 (a marker, not a secret)
_SECRET_BYTES = 32
# base64url of 32 bytes without padding.
_ENCODED_LENGTH = 43
REFRESH_TOKEN_LENGTH = len(REFRESH_TOKEN_PREFIX) + _ENCODED_LENGTH

# Called after a commit that revoked sessions, with their ids and the log's
# expire time: how this process refuses their access tokens at once, without
# waiting for its own NOTIFY to come back.
RevocationHook = Callable[[Sequence[str], datetime], None]


@dataclass(frozen=True, slots=True)
class RefreshToken:
    value: str = field(repr=False)
    token_hash: bytes = field(repr=False)


def new_refresh_token() -> RefreshToken:
    """A fresh random refresh token and the hash to store. Raises nothing."""
    secret = secrets.token_bytes(_SECRET_BYTES)
    encoded = base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")
    return RefreshToken(REFRESH_TOKEN_PREFIX + encoded, _digest(secret))


def refresh_token_hash(token: str) -> bytes | None:
    """The stored hash of ``token``; None when it cannot be a refresh token
    of ours (wrong prefix, length or alphabet). Raises nothing."""
    if (
        not isinstance(token, str)
        or len(token) != REFRESH_TOKEN_LENGTH
        or not token.startswith(REFRESH_TOKEN_PREFIX)
    ):
        return None
    encoded = token[len(REFRESH_TOKEN_PREFIX) :]
    try:
        secret = base64.urlsafe_b64decode(encoded + "=")
    except (binascii.Error, ValueError):
        return None
    # Non-canonical spellings (other trailing bits) decode to the same
    # bytes; only the one we issued counts.
    canonical = base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")
    if len(secret) != _SECRET_BYTES or canonical != encoded:
        return None
    return _digest(secret)


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def session_id_of(text: str) -> uuid.UUID | None:
    """The session id a token's sid claim names; None when it is not a
    UUID. Raises nothing."""
    try:
        return uuid.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return None


class SessionLifetimes:
    """The clock and the lifetimes that session arithmetic needs. Its
    methods raise nothing."""

    def __init__(
        self,
        *,
        access_ttl_seconds: int,
        refresh_ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.access_ttl = timedelta(seconds=access_ttl_seconds)
        self.refresh_ttl = timedelta(seconds=refresh_ttl_seconds)
        self._clock = clock

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def session_expire_time(self, now: datetime) -> datetime:
        """When a session started at ``now`` ends, however often refreshed."""
        return now + self.refresh_ttl

    def revocation_expire_time(self, now: datetime) -> datetime:
        """Until when a revocation made at ``now`` must be remembered: no
        access token of the session can be accepted after it."""
        return now + self.access_ttl + REVOCATION_MARGIN


@dataclass(frozen=True, slots=True)
class Revocation:
    """Sessions a unit of work revoked, to announce locally once it commits."""

    session_ids: tuple[uuid.UUID, ...]
    expire_time: datetime
    reason: RevokeReason | None = None


class SessionRevoker:
    """Revokes sessions inside the caller's unit of work and, after the
    caller committed, tells this process's revocation cache."""

    def __init__(
        self,
        *,
        lifetimes: SessionLifetimes,
        on_revoked: RevocationHook | None,
        on_counted: RevokedHook | None = None,
    ) -> None:
        """``on_counted`` hears each committed revocation's reason and size
        (metrics). Raises nothing."""
        self.lifetimes = lifetimes
        self._on_revoked = on_revoked
        self._on_counted = on_counted

    async def revoke_user(
        self,
        uow: UnitOfWork,
        user_id: uuid.UUID,
        reason: RevokeReason,
        *,
        except_session_id: uuid.UUID | None = None,
    ) -> Revocation:
        """Revoke every session of the user but ``except_session_id``,
        within ``uow`` (the caller commits). Raises DatabaseUnavailable."""
        expire_time = self.lifetimes.revocation_expire_time(self.lifetimes.now())
        ids = await uow.sessions.revoke(
            reason=reason,
            revocation_expire_time=expire_time,
            user_id=user_id,
            except_session_id=except_session_id,
        )
        return Revocation(tuple(ids), expire_time, reason)

    async def revoke_sessions(
        self, uow: UnitOfWork, session_ids: Sequence[uuid.UUID], reason: RevokeReason
    ) -> Revocation:
        """Revoke the given sessions within ``uow`` (the caller commits).
        Raises DatabaseUnavailable."""
        expire_time = self.lifetimes.revocation_expire_time(self.lifetimes.now())
        ids = await uow.sessions.revoke(
            reason=reason, revocation_expire_time=expire_time, session_ids=session_ids
        )
        return Revocation(tuple(ids), expire_time, reason)

    def committed(self, revocation: Revocation) -> None:
        """Hand a committed revocation to this process's cache. Raises
        nothing the hook does not raise."""
        if revocation.session_ids and self._on_revoked is not None:
            self._on_revoked([str(i) for i in revocation.session_ids], revocation.expire_time)
        if revocation.session_ids and self._on_counted is not None and revocation.reason:
            self._on_counted(revocation.reason.value, len(revocation.session_ids))
