"""Interfaces the services depend on; adapters implement them.

Contract shared by every implementation (the SQL one and the unit-test fakes):
write methods take ``events`` (usersvc.domain.events.EventDraft): they are
written about each user the write touches, in the same statement and
transaction, with the user as it is after the change;
repositories flush but never commit; the unit of work commits. Methods raise
only ``usersvc.domain.errors`` types (EmailAlreadyExists, DatabaseUnavailable,
...), never driver or ORM exceptions.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

from usersvc.domain.bulk_import import ImportedUser
from usersvc.domain.event_ports import EventRecorder
from usersvc.domain.events import EventDraft
from usersvc.domain.listing import Filter, ListQuery, Page
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import (
    Credentials,
    NewUser,
    RevokeReason,
    Session,
    User,
    UserPatch,
)


class UserRepository(Protocol):
    async def add(self, new: NewUser, *, events: Sequence[EventDraft] = ()) -> User:
        """Insert one user. Raises EmailAlreadyExists."""

    async def add_many(
        self, news: Sequence[NewUser], *, events: Sequence[EventDraft] = ()
    ) -> list[User]:
        """Insert users in order, in one statement where possible.
        Raises EmailAlreadyExists with metadata {"email": ...} of a clash
        (with another row or within the batch)."""

    async def import_batch(
        self, users: Sequence[ImportedUser], *, events: Sequence[EventDraft] = ()
    ) -> list[bool]:
        """Insert the users whose email is free, skipping (not failing on)
        those whose email is taken, case-insensitively, by a stored user or
        an earlier user of the batch. Per input, in order: True when it was
        inserted. A concurrent unit of work inserting the same email is
        waited for; the user is skipped if that one commits."""

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        """The user, deleted or not; ``for_update`` locks the row until the
        unit of work ends."""

    async def get_many(self, user_ids: Sequence[uuid.UUID]) -> list[User]:
        """The users that exist among ``user_ids`` (deleted included), any order."""

    async def get_by_email(self, email: str) -> User | None:
        """Case-insensitive match, deleted included."""

    async def get_credentials_by_email(self, email: str) -> Credentials | None:
        """Case-insensitive match, deleted included."""

    async def get_credentials(self, user_id: uuid.UUID) -> Credentials | None: ...

    async def start_login_attempt(
        self, email: str, *, now: datetime, policy: LockoutPolicy
    ) -> LoginAttempt | None:
        """Count one login attempt against the user with this email
        (case-insensitive, deleted included) unless the account is locked at
        ``now``, atomically: concurrent attempts on any replica are all
        counted. The attempt that reaches ``policy.max_failures`` locks the
        account from ``now`` for ``policy.lock_seconds(lock_count)``, resets
        the count and adds one to lock_count (usersvc.domain.lockout). None
        when no user has the email or the account is locked; nothing is
        written then."""

    async def clear_login_failures(
        self, user_id: uuid.UUID, *, events: Sequence[EventDraft] = ()
    ) -> bool:
        """Reset the failure count, the lock and the lock count (a login
        succeeded), locking the row until the unit of work ends; the user's
        version and etag do not change. False when there is no such user."""

    async def update(
        self, user_id: uuid.UUID, patch: UserPatch, *, events: Sequence[EventDraft] = ()
    ) -> User:
        """Apply the patch, bump version and update_time. Raises
        EmailAlreadyExists, UserNotFound."""

    async def set_password_hash(
        self, user_id: uuid.UUID, password_hash: str, *, events: Sequence[EventDraft] = ()
    ) -> User:
        """Bumps version. Raises UserNotFound."""

    async def set_disabled(
        self, user_id: uuid.UUID, disabled: bool, *, events: Sequence[EventDraft] = ()
    ) -> User:
        """Set or clear disable_time; bumps version. Raises UserNotFound."""

    async def set_deleted(
        self, user_id: uuid.UUID, deleted: bool, *, events: Sequence[EventDraft] = ()
    ) -> User:
        """Set or clear delete_time; bumps version. Raises UserNotFound."""

    async def purge(self, user_id: uuid.UUID, *, events: Sequence[EventDraft] = ()) -> bool:
        """Delete the row for good; False when there was none."""

    async def list(self, query: ListQuery) -> Page:
        """One keyset page: rows strictly after ``query.after`` in the
        ordering (ties broken by id), at most ``page_size`` rows."""

    async def count(self, filter: Filter, *, show_deleted: bool) -> int: ...

    async def count_matches(self, filter: Filter, *, show_deleted: bool, exact_up_to: int) -> int:
        """The number of users matching: exact when at most ``exact_up_to``
        do, otherwise an estimate (never below ``exact_up_to + 1``) that
        does not read every match."""


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """A counted login attempt: the user's credentials to check, and
    ``locked_until`` when this attempt was the last one allowed (the account
    is locked until then unless the password turns out right)."""

    credentials: Credentials
    locked_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    fingerprint: str
    users: tuple[User, ...]


class IdempotencyRepository(Protocol):
    async def get(self, scope: str, key: str) -> IdempotencyRecord | None: ...

    async def add(self, scope: str, key: str, record: IdempotencyRecord) -> None:
        """Store the first response of a request. Raises IdempotencyKeyTaken
        when another transaction stored the same (scope, key) first."""


class IdempotencyKeyTaken(Exception):
    """A concurrent request with the same key won; re-read its record."""


class RefreshStatus(enum.Enum):
    OK = "ok"  # the token was unused and is now retired by this call
    RETIRED = "retired"  # already used: a replay, or a concurrent use that lost
    UNKNOWN = "unknown"  # never issued, or its session is gone


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    """What presenting a refresh token found. ``session`` is set for OK
    (as it is after this use) and RETIRED (the session to revoke); None for
    UNKNOWN. OK says nothing about the session being active: check it."""

    status: RefreshStatus
    session: Session | None = None


@dataclass(frozen=True, slots=True)
class CleanupResult:
    sessions: int  # expired sessions deleted (their refresh tokens with them)
    revocations: int  # session_revocations rows past their expire_time deleted


class SessionRepository(Protocol):
    async def create(self, user_id: uuid.UUID, expire_time: datetime) -> Session:
        """A new active session of the user. Raises UserNotFound when the
        user row does not exist."""

    async def add_refresh_token(self, session_id: uuid.UUID, token_hash: bytes) -> None:
        """Store the hash of a new, unused refresh token of the session."""

    async def use_refresh_token(self, token_hash: bytes) -> RefreshOutcome:
        """Retire the token atomically: of any number of concurrent callers
        presenting the same unused token, exactly one gets OK (once its unit
        of work commits); the others get RETIRED. Also records the session's
        last_refresh_time on OK."""

    async def find_refresh_token(self, token_hash: bytes) -> uuid.UUID | None:
        """The session of a refresh token, used or not; None when unknown."""

    async def get(self, session_id: uuid.UUID) -> Session | None: ...

    async def revoke(
        self,
        *,
        reason: RevokeReason,
        revocation_expire_time: datetime,
        session_ids: Sequence[uuid.UUID] | None = None,
        user_id: uuid.UUID | None = None,
        except_session_id: uuid.UUID | None = None,
    ) -> list[uuid.UUID]:
        """End sessions within the unit of work: the given ``session_ids``,
        or every session of ``user_id`` but ``except_session_id``. Sessions
        already revoked stay as they were. Each newly ended session id goes
        to the revocation log (kept until ``revocation_expire_time``, when no
        access token of it can still be valid) and is announced to every
        replica when the unit of work commits, never when it rolls back.
        ``session_ids`` are logged even without a session row (tokens issued
        before sessions were stored). Returns the ids this call added to the
        log: the sessions it ended, plus such row-less ids. Raises ValueError
        unless exactly one of ``session_ids`` and ``user_id`` is given."""

    async def delete_expired(
        self, *, session_cutoff: datetime, revocation_cutoff: datetime, limit: int
    ) -> CleanupResult:
        """Delete at most ``limit`` sessions whose expire_time is before
        ``session_cutoff`` and at most ``limit`` revocation log rows whose
        expire_time is before ``revocation_cutoff``; rows another unit of
        work holds are skipped, not waited for."""


class UserReader(Protocol):
    """Plain reads of users, each outside any unit of work: one statement,
    its own snapshot, nothing locked. For the read-only calls (GetUser,
    LookupUser, BatchGetUsers) only; a flow that reads and then writes
    reads through its unit of work. Returns what the same UserRepository
    methods return."""

    async def get(self, user_id: uuid.UUID) -> User | None:
        """The user, deleted or not. Raises DatabaseUnavailable."""

    async def get_many(self, user_ids: Sequence[uuid.UUID]) -> list[User]:
        """The stored users among ``user_ids`` (deleted included), in no
        particular order. Raises DatabaseUnavailable."""

    async def get_by_email(self, email: str) -> User | None:
        """Case-insensitive match, deleted included. Raises DatabaseUnavailable."""


class RevocationChecker(Protocol):
    async def is_revoked(self, session_id: str) -> bool:
        """True when the session was revoked (the revocation log holds it).
        Raises DatabaseUnavailable when it cannot tell."""


class UnitOfWork(Protocol):
    users: UserRepository
    idempotency: IdempotencyRepository
    sessions: SessionRepository
    # Events not carried by a write above (usersvc.domain.event_ports).
    events: EventRecorder

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Roll back whatever was not committed and release the connection."""

    async def commit(self) -> None:
        """Raises EmailAlreadyExists, IdempotencyKeyTaken, DatabaseUnavailable."""

    async def rollback(self) -> None: ...


UnitOfWorkFactory = Callable[[], UnitOfWork]


class PasswordHasher(Protocol):
    async def hash(self, password: str) -> str:
        """bcrypt hash, computed off the event loop."""

    async def verify(self, password: str, password_hash: str) -> bool:
        """Constant-time check, off the event loop."""

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash's cost is not the configured cost."""


# -- Hooks: how the services and the API layer report what happened ---------
# (usersvc.observability.metrics implements them) without knowing about
# Prometheus. Each is optional: None means metrics are off, and the caller
# then does no work for them at all.

# A login attempt's outcome; one of usersvc.observability.metrics.LOGIN_OUTCOMES.
LoginOutcomeHook = Callable[[str], None]
# A call refused by a rate limit, with the bucket kind ("auth" or "api").
RateLimitedHook = Callable[[str], None]
# Sessions revoked in one committed transaction: the reason and how many.
RevokedHook = Callable[[str, int], None]


class MethodObserver(Protocol):
    """Counts and times the calls of one gRPC method."""

    def started(self) -> None:
        """A call began. Raises nothing."""

    def handled(self, code: str, seconds: float) -> None:
        """A call ended with ``code`` (a grpc.StatusCode name such as
        ``NOT_FOUND``) after ``seconds``. Raises nothing."""


class CallObserver(Protocol):
    """Hands out one MethodObserver per method, built once per method."""

    def for_method(
        self, method: str, *, request_streaming: bool, response_streaming: bool
    ) -> MethodObserver:
        """The observer of ``method`` (``/package.Service/Method``). Raises nothing."""
