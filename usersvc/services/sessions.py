"""Sessions: refresh tokens, lifetimes, and revoking within a unit of work.

A refresh token is ``rt_`` + base64url of 72 bytes: the session id (16), a
generation number (8, big-endian), 32 random bytes (the secret) and a
16-byte tag, HMAC-SHA256 of session id and generation under the session's
own random key. The session row keeps the chain in constant space however
often it is refreshed: the one valid generation, the SHA-256 of its secret
(256 bits nobody can guess, so one fast hash is a safe thing to store) and
the tag key. Refreshing moves the row to the next generation in one
conditional UPDATE; a token of an older generation whose tag is right was
issued and retired, so presenting it again ends the session (reuse
detection), while a made-up one (a wrong tag) is simply unknown. The key
lets only someone who reads the database forge a retired token, which can
do no more than end that session.

Sessions from before the chain (migration 0006) keep the one token they had,
``rt_`` + base64url of its 32 random bytes, recognised by its hash
(``legacy_refresh_hash``) until it is rotated into the chain.

The prefix lets secret scanners and people recognise a token; a string of
any other shape is refused before the database is asked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from usersvc.domain.models import RevokeReason
from usersvc.domain.ports import RefreshChain, RevokedHook, UnitOfWork
from usersvc.domain.revocations import REVOCATION_MARGIN

REFRESH_TOKEN_PREFIX = "rt_"  # noqa: S105 (a marker, not a secret)
_SECRET_BYTES = 32
_TAG_BYTES = 16
TAG_KEY_BYTES = 32
_GENERATION_BYTES = 8
_TOKEN_BYTES = 16 + _GENERATION_BYTES + _SECRET_BYTES + _TAG_BYTES
# base64url without padding.
REFRESH_TOKEN_LENGTH = len(REFRESH_TOKEN_PREFIX) + (4 * _TOKEN_BYTES + 2) // 3
LEGACY_REFRESH_TOKEN_LENGTH = len(REFRESH_TOKEN_PREFIX) + 43
FIRST_GENERATION = 1
_MAX_GENERATION = 2**63 - 1  # PostgreSQL's bigint

# Called after a commit that revoked sessions, with their ids and the log's
# expire time: how this process refuses their access tokens at once, without
# waiting for its own NOTIFY to come back.
RevocationHook = Callable[[Sequence[str], datetime], None]


@dataclass(frozen=True, slots=True)
class RefreshSecret:
    """The random part of a refresh token about to be issued, and its hash
    to store."""

    value: bytes = field(repr=False)
    token_hash: bytes = field(repr=False)


def new_refresh_secret() -> RefreshSecret:
    """Fresh random bytes for a refresh token. Raises nothing."""
    secret = secrets.token_bytes(_SECRET_BYTES)
    return RefreshSecret(secret, _digest(secret))


def new_tag_key() -> bytes:
    """A session's key for the tags of its refresh tokens. Raises nothing."""
    return secrets.token_bytes(TAG_KEY_BYTES)


def issue_refresh_token(session_id: uuid.UUID, chain: RefreshChain, secret: RefreshSecret) -> str:
    """The token of ``chain``'s generation of the session. Raises nothing."""
    raw = (
        session_id.bytes
        + chain.generation.to_bytes(_GENERATION_BYTES, "big")
        + secret.value
        + _tag(chain.tag_key, session_id, chain.generation)
    )
    return REFRESH_TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class PresentedRefreshToken:
    """A refresh token as presented: of the chain (session_id, generation,
    the hash of its secret, its tag), or from before it (legacy_hash)."""

    session_id: uuid.UUID | None = None
    generation: int = 0
    token_hash: bytes = field(default=b"", repr=False)
    tag: bytes = field(default=b"", repr=False)
    legacy_hash: bytes | None = field(default=None, repr=False)

    def issued_in(self, chain: RefreshChain) -> bool:
        """Whether the tag says this generation was issued in ``chain``
        (constant-time). Raises nothing."""
        if self.session_id is None or not 0 < self.generation <= chain.generation:
            return False
        expected = _tag(chain.tag_key, self.session_id, self.generation)
        return hmac.compare_digest(expected, self.tag)


def parse_refresh_token(token: str) -> PresentedRefreshToken | None:
    """What ``token`` says; None when it cannot be a refresh token of ours
    (wrong prefix, length or alphabet). Raises nothing."""
    if not isinstance(token, str) or not token.startswith(REFRESH_TOKEN_PREFIX):
        return None
    if len(token) == LEGACY_REFRESH_TOKEN_LENGTH:
        legacy = _decode(token, _SECRET_BYTES)
        return None if legacy is None else PresentedRefreshToken(legacy_hash=_digest(legacy))
    if len(token) != REFRESH_TOKEN_LENGTH:
        return None
    raw = _decode(token, _TOKEN_BYTES)
    if raw is None:
        return None
    generation = int.from_bytes(raw[16 : 16 + _GENERATION_BYTES], "big")
    if not FIRST_GENERATION <= generation <= _MAX_GENERATION:
        return None
    secret_start = 16 + _GENERATION_BYTES
    return PresentedRefreshToken(
        session_id=uuid.UUID(bytes=raw[:16]),
        generation=generation,
        token_hash=_digest(raw[secret_start : secret_start + _SECRET_BYTES]),
        tag=raw[secret_start + _SECRET_BYTES :],
    )


def _decode(token: str, length: int) -> bytes | None:
    encoded = token[len(REFRESH_TOKEN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return None
    # Non-canonical spellings (other trailing bits) decode to the same
    # bytes; only the one we issued counts.
    canonical = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    if len(raw) != length or canonical != encoded:
        return None
    return raw


def _tag(key: bytes, session_id: uuid.UUID, generation: int) -> bytes:
    message = session_id.bytes + generation.to_bytes(_GENERATION_BYTES, "big")
    return hmac.new(key, message, hashlib.sha256).digest()[:_TAG_BYTES]


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
