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
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

from usersvc.domain.bulk_import import ImportedUser
from usersvc.domain.codes import CodeKind
from usersvc.domain.event_ports import EventRecorder
from usersvc.domain.events import EventDraft
from usersvc.domain.listing import Filter, ListedPage, ListQuery, Page
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import (
    Credentials,
    NewUser,
    RevokeReason,
    Session,
    User,
    UserPatch,
)
from usersvc.domain.role_checks import RoleCheck
from usersvc.domain.wire_size import OversizedUsers


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

    async def find_login(self, email: str) -> LoginAttempt | None:
        """The credentials and the lock of the user with this email
        (case-insensitive, deleted included), for a login to check; None
        when no user has it. Writes nothing."""

    async def count_login_failure(
        self, user_id: uuid.UUID, *, now: datetime, policy: LockoutPolicy
    ) -> datetime | None:
        """Count one failed login (a wrong password, checked) against the
        user unless the account is locked at ``now``, atomically: concurrent
        failures on any replica are counted exactly as the same failures one
        after the other would be. The failure that reaches
        ``policy.max_failures`` locks the account from ``now`` for
        ``policy.lock_seconds(lock_count)``, resets the count and adds one to
        lock_count (usersvc.domain.lockout), and gets the lock's end back;
        otherwise None. An unknown id or a locked account: nothing written."""

    async def clear_login_failures(
        self,
        user_id: uuid.UUID,
        *,
        unless_locked_at: datetime | None = None,
        events: Sequence[EventDraft] = (),
    ) -> bool:
        """Reset the failure count, the lock and the lock count (a login
        succeeded, or an administrator ends a lock), locking the row until
        the unit of work ends; the user's version and etag do not change.
        With ``unless_locked_at``, nothing changes if the account is locked
        at that time. False when there is no such user, or nothing changed
        because of the lock."""

    async def update_checked(
        self, change: UserUpdate, *, events: Sequence[EventDraft] = ()
    ) -> UpdateOutcome:
        """Apply ``change.patch`` when the user exists, is not deleted and
        passes ``change``'s etag and admin rules, in one statement that
        locks the row until the unit of work ends; bump version and
        update_time. The drafts' changed_fields are not used: each event
        gets the patched fields whose value the write changed, compared with
        the latest committed version (``UserPatch.changed_fields`` of
        ``outcome.before``). A changed email clears email_verified and voids
        the user's live codes. Nothing is written when a rule refuses (the
        outcome tells which). With ``change.role_check``, the caller's
        account is read in the same statement, which writes nothing unless
        the check passes. Raises TokenRevoked when that check fails (before
        any other rule's verdict; nothing written), EmailAlreadyExists (the
        transaction is then aborted)."""

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
class UserUpdate:
    """An update of one user and the rules it must pass, all checked by the
    write itself (UserRepository.update_checked)."""

    user_id: uuid.UUID
    patch: UserPatch
    # The version the caller's etag names (usersvc.domain.models
    # .version_in_etag): the write applies only to that version. None: to
    # any version.
    expected_version: int | None = None
    # A privilege-granting change (roles): this user must be an active
    # admin in the database, not merely in its token. None: no such rule.
    admin_caller: uuid.UUID | None = None
    # The pending re-check of the caller's privileged token
    # (usersvc.domain.role_checks), settled by the write itself: nothing is
    # written unless the caller's account is active and holds every role
    # the token claims, and the update raises TokenRevoked then. None: the
    # caller's token claims no privilege, or its check is done already.
    role_check: RoleCheck | None = None


@dataclass(frozen=True, slots=True)
class UpdateOutcome:
    """What a checked update found and did. ``before`` is the latest
    committed version of the user (None: there is no such user), ``after``
    the user as written (None: a rule refused the write; ``before`` and
    ``caller_is_admin`` tell which). ``caller_is_admin`` is the admin rule's
    answer, True when the update had none."""

    before: User | None
    after: User | None
    caller_is_admin: bool = True


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """What a login checks: the user's credentials, and the end of the
    account's latest lock (in the past when the lock is over; None when it
    never was locked or a success cleared it)."""

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
    OK = "ok"  # the token was the valid one and is now retired by this call
    RETIRED = "retired"  # an older generation: a replay, or a concurrent use that lost
    UNKNOWN = "unknown"  # never issued, or its session is gone


@dataclass(frozen=True, slots=True)
class RefreshChain:
    """A session's refresh token chain: the generation of its one valid
    token, and the key that authenticates each generation's tag."""

    generation: int
    tag_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    """What presenting a refresh token found. ``session`` is set for OK
    (as it is after this use) and RETIRED (the session to revoke); None for
    UNKNOWN. ``chain`` is the session's chain: for OK after this use (the
    successor's generation), for RETIRED as it is (to check the presented
    token's tag against: a chain token of an older generation is RETIRED
    only if its tag is right). OK says nothing about the session being
    active: check it."""

    status: RefreshStatus
    session: Session | None = None
    chain: RefreshChain | None = None


@dataclass(frozen=True, slots=True)
class CleanupResult:
    sessions: int  # expired sessions deleted (their refresh tokens with them)
    revocations: int  # session_revocations rows past their expire_time deleted


class SessionRepository(Protocol):
    async def create(
        self,
        user_id: uuid.UUID,
        expire_time: datetime,
        *,
        refresh_hash: bytes,
        tag_key: bytes,
    ) -> Session:
        """A new active session of the user whose valid refresh token is
        the first generation, with the secret whose hash is
        ``refresh_hash``. Raises UserNotFound when the user row does not
        exist."""

    async def use_refresh_token(
        self, session_id: uuid.UUID, generation: int, token_hash: bytes, successor_hash: bytes
    ) -> RefreshOutcome:
        """Move the session's chain to the next generation, whose secret
        hashes to ``successor_hash``, if ``generation`` and ``token_hash``
        are its valid token's, atomically: of any number of concurrent
        callers presenting the same valid token, exactly one gets OK (once
        its unit of work commits); the others get RETIRED, as does any
        older generation (the caller checks its tag against the chain).
        Also records the session's last_refresh_time on OK. The rows
        written per session stay the same however often this runs."""

    async def use_legacy_refresh_token(
        self, token_hash: bytes, successor_hash: bytes, tag_key: bytes
    ) -> RefreshOutcome:
        """The same for a token from before the chain, known by its hash:
        OK starts the session's chain (first generation, ``tag_key``);
        RETIRED when it was used already."""

    async def refresh_chain(self, session_id: uuid.UUID) -> RefreshChain | None:
        """The session's chain; None without a session or before its chain
        started."""

    async def find_legacy_refresh_token(self, token_hash: bytes) -> uuid.UUID | None:
        """The session of a token from before the chain, used or not."""

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


@dataclass(frozen=True, slots=True)
class UserWrite:
    """One item of a batch update: the user and the validated fields to
    set (None: leave as is)."""

    user_id: uuid.UUID
    patch: UserPatch
    # The paths whose value differs from the stored one (the event's).
    changed_fields: tuple[str, ...] = ()


class AccountRepository(Protocol):
    """Codes (email verification, password reset) and the set-based
    writes of the batch methods. Every method raises DatabaseUnavailable
    when the database cannot be reached."""

    async def lock_users(self, user_ids: Sequence[uuid.UUID]) -> list[User]:
        """The stored users among ``user_ids`` (deleted included), locked
        until the unit of work ends, taken in id order (two batches over
        the same users cannot deadlock); any order."""

    async def lock_active_user_by_email(self, email: str) -> uuid.UUID | None:
        """The id of the user with this email (case-insensitive) that is
        neither deleted nor disabled, locked against concurrent code
        creation; None when there is none."""

    async def replace_code(
        self, user_id: uuid.UUID, kind: CodeKind, code_hash: bytes, expire_time: datetime
    ) -> bool:
        """Void the user's live code of ``kind`` and store a new one. The
        same statements run when the user does not exist (no row changes
        then, and False is returned), so both cases cost the same."""

    async def consume_code(
        self,
        kind: CodeKind,
        code_hash: bytes,
        *,
        now: datetime,
        max_attempts: int,
        user_id: uuid.UUID | None = None,
        email: str | None = None,
    ) -> uuid.UUID | None:
        """Check and use the live, unexpired code of ``kind`` of the user
        (by id, or by the email of an active user) in one conditional
        UPDATE: when its hash is ``code_hash`` it is consumed and the user
        id returned; otherwise a wrong try is counted (the try that reaches
        ``max_attempts`` voids the code) and None is returned. Of
        concurrent callers with the right code exactly one gets the id.
        Raises ValueError unless exactly one of user_id and email is given."""

    async def set_email_verified(
        self, user_id: uuid.UUID, *, events: Sequence[EventDraft] = ()
    ) -> User:
        """Mark the email verified; bumps version; ``events`` about the user
        in the same statement. Raises UserNotFound."""

    async def taken_emails(
        self, emails: Sequence[str], *, except_ids: Sequence[uuid.UUID]
    ) -> set[str]:
        """The emails among ``emails`` (lower-cased) held by users other
        than ``except_ids`` (deleted users included)."""

    async def update_many(
        self, writes: Sequence[UserWrite], *, events: Sequence[EventDraft] = ()
    ) -> list[User]:
        """Apply every patch in one statement, bump each version and
        update_time; a changed email clears email_verified and voids the
        user's live codes. Each draft of ``events`` is written for every
        user, in the same statement, with that write's changed_fields.
        Returns the users in input order. Raises EmailAlreadyExists (the
        transaction is then aborted), UserNotFound for a user that is not
        stored."""

    async def delete_many(
        self, user_ids: Sequence[uuid.UUID], *, events: Sequence[EventDraft] = ()
    ) -> list[User]:
        """Soft-delete the users in one statement (keeping an earlier
        delete_time), bump each version, ``events`` for every user in the
        same statement; input order. Raises UserNotFound."""

    async def live_session_ids(self, user_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """The ids of the users' sessions not yet revoked."""

    async def relax_commit(self) -> None:
        """The unit of work's commit will not wait for the WAL flush (a
        crash may lose it): for writes whose loss is harmless, so that they
        cost what a read costs."""


class UserReader(Protocol):
    """Plain reads of users, each outside any unit of work: one statement,
    its own snapshot, nothing locked. For the read-only calls (GetUser,
    LookupUser, BatchGetUsers, ListUsers without a filter) only; a flow that reads and then writes
    reads through its unit of work. Returns what the same UserRepository
    methods return.

    Given a ``role_check`` (usersvc.domain.role_checks), a read also reads
    the checked account, in the same statement where it can, and settles
    the check before it returns: it raises TokenRevoked, and returns no
    user, when the account no longer backs the caller's token."""

    async def get(self, user_id: uuid.UUID, *, role_check: RoleCheck | None = None) -> User | None:
        """The user, deleted or not. Raises DatabaseUnavailable, TokenRevoked."""

    async def get_many(
        self, user_ids: Sequence[uuid.UUID], *, role_check: RoleCheck | None = None
    ) -> list[User]:
        """The stored users among ``user_ids`` (deleted included), in no
        particular order. Raises DatabaseUnavailable, TokenRevoked."""

    async def get_many_within(
        self, user_ids: Sequence[uuid.UUID], *, max_bytes: int
    ) -> list[User] | OversizedUsers:
        """What get_many returns when those users' sizes
        (usersvc.domain.wire_size.user_wire_bytes, or a few bytes more)
        add up to at most ``max_bytes``; else, without reading the users,
        their sizes. Raises DatabaseUnavailable."""

    async def get_by_email(self, email: str, *, role_check: RoleCheck | None = None) -> User | None:
        """Case-insensitive match, deleted included. Raises
        DatabaseUnavailable, TokenRevoked."""

    async def list_unfiltered(
        self,
        query: ListQuery,
        *,
        role_check: RoleCheck | None = None,
        count_up_to: int | None = None,
    ) -> ListedPage:
        """UserRepository.list of a query without a filter (the common
        ListUsers page); ``role_check`` as in ``get``. With
        ``count_up_to``, also the number of matches as
        UserRepository.count_matches(exact_up_to=count_up_to) gives it, when
        the read can tell it without counting rows (else None). Raises
        ValueError for a query with a filter (a programming error), and
        as UserRepository.list; DatabaseUnavailable, TokenRevoked."""


class UserWriter(Protocol):
    """Updates and creates that are one statement committed on its own,
    outside any unit of work: nothing else has to happen in their
    transaction. Not for patches of email (its codes are voided in the same
    transaction) or roles (the user's sessions end in the same
    transaction): those go through UserRepository.update_checked in a unit
    of work."""

    async def update(
        self, change: UserUpdate, *, events: Sequence[EventDraft] = ()
    ) -> UpdateOutcome:
        """UserRepository.update_checked, committed. Raises TokenRevoked as
        update_checked does, ValueError for a
        patch of email or roles (a programming error), DatabaseUnavailable
        (also when the connection is lost during the statement: the write
        may then have been committed)."""

    async def create(
        self,
        new: NewUser,
        *,
        events: Sequence[EventDraft] = (),
        role_check: RoleCheck | None = None,
    ) -> User:
        """UserRepository.add, committed: for a create with nothing else in
        its transaction (no idempotency key to store). ``role_check``, the
        caller's pending re-check (usersvc.domain.role_checks), is settled
        before anything is written, and a failed one writes nothing. Raises
        TokenRevoked, EmailAlreadyExists (metadata {"email"}),
        DatabaseUnavailable (also when the connection is lost during the
        statement: the user may then have been created)."""


class RevocationChecker(Protocol):
    async def is_revoked(self, session_id: str) -> bool:
        """True when the session was revoked (the revocation log holds it).
        Raises DatabaseUnavailable when it cannot tell."""


class UnitOfWork(Protocol):
    users: UserRepository
    idempotency: IdempotencyRepository
    sessions: SessionRepository
    accounts: AccountRepository
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
