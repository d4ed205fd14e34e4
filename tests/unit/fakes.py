"""In-memory fakes of the ports in usersvc.domain.ports, for unit tests.

They keep the contract the SQL adapters keep: a unit of work sees a private
copy of the data and publishes it only on commit (rolled back otherwise);
emails are unique case-insensitively (checked when written and again at
commit, like a unique index); an idempotency key taken by another unit of
work since this one began fails the commit with IdempotencyKeyTaken;
repositories raise only domain errors. Sessions follow the SQL schema too:
deleting a user deletes its sessions, a session's deletion its refresh
tokens; the revocation log outlives both; "notifications" are published on
commit only, like PostgreSQL's NOTIFY.

Listing is plain storage: ``list`` pages through the users in the order they
were stored and ``count`` counts them all, whatever the filter, ordering and
show_deleted (what those select is tested against PostgreSQL, in
tests/integration/test_user_service_listing.py and test_filters.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from usersvc.domain.bulk_import import ImportedUser
from usersvc.domain.errors import EmailAlreadyExists, UserNotFound
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.listing import Cursor, Filter, ListQuery, Page
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import (
    ROLE_ADMIN,
    ROLE_SERVICE,
    ROLE_USER,
    Credentials,
    NewUser,
    Principal,
    PrincipalKind,
    RevokeReason,
    Session,
    User,
    UserPatch,
    UserState,
    uuid7,
)
from usersvc.domain.passwords import PasswordPolicy
from usersvc.domain.ports import (
    CleanupResult,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    LoginAttempt,
    RefreshChain,
    RefreshOutcome,
    RefreshStatus,
    UpdateOutcome,
    UserUpdate,
    UserWriter,
)
from usersvc.services.auth import AuthService
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.sessions import SessionLifetimes, SessionRevoker
from usersvc.services.tokens import KeyRing, SigningKey, TokenService
from usersvc.services.users import UserService

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class _Row:
    user: User
    password_hash: str
    # Login lockout state (usersvc.domain.lockout), outside the resource.
    failed_login_count: int = 0
    lock_count: int = 0
    locked_until: datetime | None = None


@dataclass(frozen=True)
class StoredChain:
    """A session's refresh token chain, as the sessions row holds it."""

    generation: int
    token_hash: bytes | None
    tag_key: bytes | None
    legacy_hash: bytes | None = None


@dataclass(frozen=True)
class StoredRevocation:
    revoke_time: datetime
    expire_time: datetime


@dataclass
class _SessionState:
    """The session tables, as one unit of work sees them."""

    sessions: dict[uuid.UUID, Session] = field(default_factory=dict)
    chains: dict[uuid.UUID, StoredChain] = field(default_factory=dict)
    revocations: dict[uuid.UUID, StoredRevocation] = field(default_factory=dict)

    def copy(self) -> _SessionState:
        return _SessionState(dict(self.sessions), dict(self.chains), dict(self.revocations))

    def apply(self, base: _SessionState, changed: _SessionState) -> None:
        """Write into self what ``changed`` changed relative to ``base``
        (row by row, like a transaction's writes), keeping what other units
        of work committed meanwhile."""
        for name in ("sessions", "chains", "revocations"):
            target, before, after = (getattr(x, name) for x in (self, base, changed))
            for key, value in after.items():
                if before.get(key) != value:
                    target[key] = value
            for key in before.keys() - after.keys():
                target.pop(key, None)


class FakeDatabase:
    """Committed state shared by the units of work made by ``uow``."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, _Row] = {}
        self.idempotency: dict[tuple[str, str], IdempotencyRecord] = {}
        self.session_state = _SessionState()
        # Each committed revocation's session ids, in commit order.
        self.notifications: list[list[uuid.UUID]] = []
        # Sessions whose chain an open unit of work has advanced: the row
        # lock that makes a concurrent use see the token as retired.
        self.claimed_chains: set[uuid.UUID] = set()
        self.commits = 0
        self.open_units = 0
        # Committed events as (type, user id, attributes, changed fields).
        self.events: list[FakeEvent] = []
        # Sizes of the import_batch calls of every unit of work, in order.
        self.import_batches: list[int] = []
        # The ListQuery of every list call, in order.
        self.list_queries: list[ListQuery] = []
        # Run (once) at the start of the next commit, with the committing
        # unit of work: how a test makes a concurrent transaction win a race.
        self.before_next_commit: list[Callable[[FakeUnitOfWork], None]] = []
        self._ticks = 0

    def now(self) -> datetime:
        """A clock that moves one millisecond per call: every write gets a
        distinct, increasing time."""
        self._ticks += 1
        return EPOCH + timedelta(milliseconds=self._ticks)

    def uow(self) -> FakeUnitOfWork:
        """The UnitOfWorkFactory."""
        return FakeUnitOfWork(self)

    # -- arranging tests ---------------------------------------------------------

    def insert(
        self,
        email: str = "someone@example.com",
        *,
        password_hash: str = "fake$4$none",
        display_name: str = "",
        roles: Sequence[str] = (ROLE_USER,),
        labels: Mapping[str, str] | None = None,
        disabled: bool = False,
        deleted: bool = False,
        create_time: datetime | None = None,
    ) -> User:
        """A committed user, as if created long ago."""
        now = create_time or self.now()
        user = User(
            id=uuid7(),
            email=email.lower(),
            display_name=display_name,
            roles=tuple(sorted(set(roles))),
            labels=dict(labels or {}),
            create_time=now,
            update_time=now,
            disable_time=now if disabled else None,
            delete_time=now if deleted else None,
            version=1,
        )
        self.rows[user.id] = _Row(user, password_hash)
        return user

    def user(self, user_id: uuid.UUID) -> User | None:
        row = self.rows.get(user_id)
        return None if row is None else row.user

    def password_hash(self, user_id: uuid.UUID) -> str:
        return self.rows[user_id].password_hash

    @property
    def sessions(self) -> dict[uuid.UUID, Session]:
        return self.session_state.sessions

    @property
    def refresh_chains(self) -> dict[uuid.UUID, StoredChain]:
        return self.session_state.chains

    @property
    def revocations(self) -> dict[uuid.UUID, StoredRevocation]:
        return self.session_state.revocations


class FakeUnitOfWork:
    users: FakeUserRepository
    idempotency: FakeIdempotencyRepository
    sessions: FakeSessionRepository
    events: FakeEventRecorder

    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self._begin()

    def _begin(self) -> None:
        self.rows: dict[uuid.UUID, _Row] = dict(self.db.rows)
        self.keys: dict[tuple[str, str], IdempotencyRecord] = dict(self.db.idempotency)
        self.written: set[uuid.UUID] = set()
        self.purged: set[uuid.UUID] = set()
        self.new_keys: set[tuple[str, str]] = set()
        self._session_base = self.db.session_state.copy()
        self.session_state = self._session_base.copy()
        self.pending_notifications: list[list[uuid.UUID]] = []
        self.pending_events: list[FakeEvent] = []
        self.claims: set[uuid.UUID] = set()
        self.events = FakeEventRecorder(self)
        self.users = FakeUserRepository(self)
        self.idempotency = FakeIdempotencyRepository(self)
        self.sessions = FakeSessionRepository(self)

    def _release_claims(self) -> None:
        self.db.claimed_chains -= getattr(self, "claims", set())

    async def __aenter__(self) -> Self:
        self.db.open_units += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.db.open_units -= 1
        self._release_claims()
        self._begin()  # whatever was not committed is gone

    async def commit(self) -> None:
        hooks, self.db.before_next_commit = self.db.before_next_commit, []
        for hook in hooks:
            hook(self)
        for key in self.new_keys:
            if key in self.db.idempotency:
                raise IdempotencyKeyTaken(key)
        for user_id in self.written:
            email = self.rows[user_id].user.email.lower()
            for other_id, other in self.db.rows.items():
                if (
                    other_id != user_id
                    and other_id not in self.purged
                    and other.user.email.lower() == email
                ):
                    raise EmailAlreadyExists(metadata={"email": email})
        for user_id in self.purged:
            self.db.rows.pop(user_id, None)
        for user_id in self.written:
            self.db.rows[user_id] = self.rows[user_id]
        for key in self.new_keys:
            self.db.idempotency[key] = self.keys[key]
        committed = self.db.session_state
        committed.apply(self._session_base, self.session_state)
        for user_id in self.purged:
            # ON DELETE CASCADE, as in the schema.
            for session_id in [s.id for s in committed.sessions.values() if s.user_id == user_id]:
                del committed.sessions[session_id]
        committed.chains = {i: c for i, c in committed.chains.items() if i in committed.sessions}
        self.db.notifications.extend(self.pending_notifications)
        self.db.events.extend(self.pending_events)
        self.db.commits += 1
        self._release_claims()
        self._begin()

    async def rollback(self) -> None:
        self._release_claims()
        self._begin()


@dataclass(frozen=True)
class FakeEvent:
    type: str
    user_id: uuid.UUID | None
    attributes: Mapping[str, str]
    changed_fields: tuple[str, ...] = ()


class FakeEventRecorder:
    """usersvc.domain.event_ports.EventRecorder: events join the unit of
    work's pending ones and are kept only if it commits."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def record(self, user_id: uuid.UUID | None, drafts: Sequence[EventDraft]) -> None:
        self._uow.pending_events.extend(
            FakeEvent(d.type.value, user_id, dict(d.attributes), tuple(d.changed_fields))
            for d in drafts
        )

    async def add(self, user_id: uuid.UUID | None, drafts: Sequence[EventDraft]) -> None:
        self.record(user_id, drafts)

    async def add_login_failure(self, email: str) -> None:
        owner = next((i for i, r in self._uow.rows.items() if r.user.email == email.lower()), None)
        cause = "unknown_email" if owner is None else "locked"
        self._uow.pending_events.append(
            FakeEvent(EventType.LOGIN_FAILED.value, owner, {"cause": cause})
        )


class FakeUserRepository:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow
        # Sizes of the import_batch calls, for tests of the batching.
        self.import_batches = uow.db.import_batches

    @property
    def _rows(self) -> dict[uuid.UUID, _Row]:
        return self._uow.rows

    def _owner_of(self, email: str) -> uuid.UUID | None:
        for user_id, row in self._rows.items():
            if row.user.email.lower() == email.lower():
                return user_id
        return None

    def _write(self, user: User, password_hash: str) -> User:
        row = self._rows.get(user.id)
        if row is None:
            self._rows[user.id] = _Row(user, password_hash)
        else:
            self._rows[user.id] = replace(row, user=user, password_hash=password_hash)
        self._uow.written.add(user.id)
        return user

    def _bump(self, user_id: uuid.UUID, events: Sequence[EventDraft], **changes: Any) -> User:
        row = self._rows.get(user_id)
        if row is None:
            raise UserNotFound(metadata={"id": str(user_id)})
        self._uow.events.record(user_id, events)
        password_hash = changes.pop("password_hash", row.password_hash)
        user = replace(
            row.user, version=row.user.version + 1, update_time=self._uow.db.now(), **changes
        )
        return self._write(user, password_hash)

    async def add(self, new: NewUser, *, events: Sequence[EventDraft] = ()) -> User:
        if self._owner_of(new.email) is not None:
            raise EmailAlreadyExists(metadata={"email": new.email.lower()})
        now = self._uow.db.now()
        user = User(
            id=uuid7(),
            email=new.email,
            display_name=new.display_name,
            roles=tuple(new.roles),
            labels=dict(new.labels),
            create_time=now,
            update_time=now,
            disable_time=None,
            delete_time=None,
            version=1,
        )
        self._uow.events.record(user.id, events)
        return self._write(user, new.password_hash)

    async def add_many(
        self, news: Sequence[NewUser], *, events: Sequence[EventDraft] = ()
    ) -> list[User]:
        return [await self.add(new, events=events) for new in news]

    async def import_batch(
        self, users: Sequence[ImportedUser], *, events: Sequence[EventDraft] = ()
    ) -> list[bool]:
        self.import_batches.append(len(users))
        inserted = []
        for new in users:
            if self._owner_of(new.email) is not None:
                inserted.append(False)
                continue
            now = self._uow.db.now()
            created = now if new.create_time is None else min(new.create_time, now)
            user = User(
                id=uuid7(),
                email=new.email,
                display_name=new.display_name,
                roles=tuple(new.roles),
                labels=dict(new.labels),
                create_time=created,
                update_time=now,
                disable_time=None,
                delete_time=None,
                version=1,
            )
            self._write(user, new.password_hash)
            self._uow.events.record(user.id, events)
            inserted.append(True)
        return inserted

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        row = self._rows.get(user_id)
        return None if row is None else row.user

    async def get_many(self, user_ids: Sequence[uuid.UUID]) -> list[User]:
        # Reversed on purpose: the port promises no order.
        found = [self._rows[i].user for i in user_ids if i in self._rows]
        return found[::-1]

    async def get_by_email(self, email: str) -> User | None:
        owner = self._owner_of(email)
        return None if owner is None else self._rows[owner].user

    async def get_credentials_by_email(self, email: str) -> Credentials | None:
        owner = self._owner_of(email)
        return None if owner is None else await self.get_credentials(owner)

    async def get_credentials(self, user_id: uuid.UUID) -> Credentials | None:
        row = self._rows.get(user_id)
        return None if row is None else Credentials(row.user, row.password_hash)

    async def find_login(self, email: str) -> LoginAttempt | None:
        owner = self._owner_of(email)
        if owner is None:
            return None
        row = self._rows[owner]
        return LoginAttempt(Credentials(row.user, row.password_hash), row.locked_until)

    async def count_login_failure(
        self, user_id: uuid.UUID, *, now: datetime, policy: LockoutPolicy
    ) -> datetime | None:
        row = self._rows.get(user_id)
        if row is None or (row.locked_until is not None and row.locked_until > now):
            return None
        count = row.failed_login_count + 1
        locked_until = None
        if count >= policy.max_failures:
            locked_until = now + timedelta(seconds=policy.lock_seconds(row.lock_count))
            row = replace(
                row, failed_login_count=0, lock_count=row.lock_count + 1, locked_until=locked_until
            )
        else:
            row = replace(row, failed_login_count=count)
        self._rows[user_id] = row
        self._uow.written.add(user_id)
        return locked_until

    async def clear_login_failures(
        self,
        user_id: uuid.UUID,
        *,
        unless_locked_at: datetime | None = None,
        events: Sequence[EventDraft] = (),
    ) -> bool:
        row = self._rows.get(user_id)
        if row is None:
            return False
        if (
            unless_locked_at is not None
            and row.locked_until is not None
            and row.locked_until > unless_locked_at
        ):
            return False
        self._uow.events.record(user_id, events)
        self._rows[user_id] = replace(row, failed_login_count=0, lock_count=0, locked_until=None)
        self._uow.written.add(user_id)
        return True

    async def update_checked(
        self, change: UserUpdate, *, events: Sequence[EventDraft] = ()
    ) -> UpdateOutcome:
        """The rules the SQL statement checks, on this unit of work's rows:
        the caller's token still held (TokenRevoked first), not deleted, the
        expected version, the caller an active admin."""
        if change.role_check is not None:
            change.role_check.settle_on(self._user(change.role_check.account_id))
        row = self._rows.get(change.user_id)
        if row is None:
            return UpdateOutcome(before=None, after=None)
        before = row.user
        caller_is_admin = True
        if change.admin_caller is not None:
            caller = before if change.admin_caller == before.id else self._user(change.admin_caller)
            caller_is_admin = (
                caller is not None
                and caller.state is UserState.ACTIVE
                and caller.has_role(ROLE_ADMIN)
            )
        expected = change.expected_version
        if (
            before.delete_time is not None
            or (expected is not None and expected != before.version)
            or not caller_is_admin
        ):
            return UpdateOutcome(before=before, after=None, caller_is_admin=caller_is_admin)
        changed = change.patch.changed_fields(before)
        drafts = [replace(draft, changed_fields=changed) for draft in events]
        after = self._apply(change.user_id, change.patch, drafts)
        return UpdateOutcome(before=before, after=after, caller_is_admin=caller_is_admin)

    def _apply(self, user_id: uuid.UUID, patch: UserPatch, events: Sequence[EventDraft]) -> User:
        if patch.email is not None:
            owner = self._owner_of(patch.email)
            if owner is not None and owner != user_id:
                raise EmailAlreadyExists(metadata={"email": patch.email.lower()})
        changes = {
            name: value
            for name, value in (
                ("email", patch.email),
                ("display_name", patch.display_name),
                ("roles", patch.roles),
                ("labels", None if patch.labels is None else dict(patch.labels)),
            )
            if value is not None
        }
        return self._bump(user_id, events, **changes)

    def _user(self, user_id: uuid.UUID) -> User | None:
        row = self._rows.get(user_id)
        return None if row is None else row.user

    async def set_password_hash(
        self, user_id: uuid.UUID, password_hash: str, *, events: Sequence[EventDraft] = ()
    ) -> User:
        return self._bump(user_id, events, password_hash=password_hash)

    async def set_disabled(
        self, user_id: uuid.UUID, disabled: bool, *, events: Sequence[EventDraft] = ()
    ) -> User:
        return self._bump(user_id, events, disable_time=self._uow.db.now() if disabled else None)

    async def set_deleted(
        self, user_id: uuid.UUID, deleted: bool, *, events: Sequence[EventDraft] = ()
    ) -> User:
        return self._bump(user_id, events, delete_time=self._uow.db.now() if deleted else None)

    async def purge(self, user_id: uuid.UUID, *, events: Sequence[EventDraft] = ()) -> bool:
        if self._rows.pop(user_id, None) is None:
            return False
        self._uow.events.record(user_id, events)
        self._uow.purged.add(user_id)
        self._uow.written.discard(user_id)
        return True

    async def list(self, query: ListQuery) -> Page:
        """The stored users in the order they were stored, ``page_size`` at a
        time, resuming after the cursor's row. Plain storage: the filter,
        ordering and show_deleted are the SQL adapter's business (tested
        against PostgreSQL in tests/integration); the queries asked are kept
        in ``FakeDatabase.list_queries``."""
        self._uow.db.list_queries.append(query)
        stored = [row.user for row in self._rows.values()]
        if query.after is not None:
            position = [user.id for user in stored].index(query.after.id)
            stored = stored[position + 1 :]
        page = tuple(stored[: query.page_size])
        more = len(stored) > query.page_size
        next_cursor = Cursor(page[-1].create_time, page[-1].id) if more else None
        return Page(users=page, next_cursor=next_cursor)

    async def count(self, filter: Filter, *, show_deleted: bool) -> int:
        """Every stored user (plain storage, as ``list``)."""
        return len(self._rows)

    async def count_matches(self, filter: Filter, *, show_deleted: bool, exact_up_to: int) -> int:
        """Every stored user (plain storage, as ``list``): exact, whatever
        the cap; estimates beyond it are tested against PostgreSQL."""
        return len(self._rows)


class FakeIdempotencyRepository:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        return self._uow.keys.get((scope, key))

    async def add(self, scope: str, key: str, record: IdempotencyRecord) -> None:
        if (scope, key) in self._uow.keys:
            raise IdempotencyKeyTaken((scope, key))
        self._uow.keys[(scope, key)] = record
        self._uow.new_keys.add((scope, key))


class FakeSessionRepository:
    """SessionRepository on the unit of work's copy of the session tables.
    Ignores the last-write-wins races a real database would order by row
    locks, except for the one that matters: a refresh token retired by an
    open unit of work is RETIRED to every other one."""

    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    @property
    def _state(self) -> _SessionState:
        return self._uow.session_state

    async def create(
        self,
        user_id: uuid.UUID,
        expire_time: datetime,
        *,
        refresh_hash: bytes = bytes(32),
        tag_key: bytes = bytes(32),
    ) -> Session:
        if user_id not in self._uow.rows:
            raise UserNotFound(metadata={"id": str(user_id)})
        session = Session(
            id=uuid7(),
            user_id=user_id,
            create_time=self._uow.db.now(),
            expire_time=expire_time,
            revoke_time=None,
            revoke_reason=None,
        )
        self._state.sessions[session.id] = session
        self._state.chains[session.id] = StoredChain(1, refresh_hash, tag_key)
        return session

    def add_legacy_session(
        self, user_id: uuid.UUID, expire_time: datetime, token_hash: bytes
    ) -> Session:
        """Arrange a session from before the chain, with its one token."""
        session = Session(
            id=uuid7(),
            user_id=user_id,
            create_time=self._uow.db.now(),
            expire_time=expire_time,
            revoke_time=None,
            revoke_reason=None,
        )
        self._state.sessions[session.id] = session
        self._state.chains[session.id] = StoredChain(0, None, None, token_hash)
        return session

    def _claimed_elsewhere(self, session_id: uuid.UUID) -> bool:
        return session_id in self._uow.db.claimed_chains and session_id not in self._uow.claims

    def _advance(self, session_id: uuid.UUID, chain: StoredChain) -> RefreshOutcome:
        now = self._uow.db.now()
        self._state.chains[session_id] = chain
        self._uow.claims.add(session_id)
        self._uow.db.claimed_chains.add(session_id)
        session = replace(self._state.sessions[session_id], last_refresh_time=now)
        self._state.sessions[session_id] = session
        assert chain.tag_key is not None
        return RefreshOutcome(
            RefreshStatus.OK, session, RefreshChain(chain.generation, chain.tag_key)
        )

    async def use_refresh_token(
        self, session_id: uuid.UUID, generation: int, token_hash: bytes, successor_hash: bytes
    ) -> RefreshOutcome:
        chain = self._state.chains.get(session_id)
        if chain is None or chain.tag_key is None:
            return RefreshOutcome(RefreshStatus.UNKNOWN)
        session = self._state.sessions[session_id]
        current = RefreshChain(chain.generation, chain.tag_key)
        if self._claimed_elsewhere(session_id):
            # A concurrent unit of work advanced it: after its commit this
            # generation is an older one.
            current = RefreshChain(chain.generation + 1, chain.tag_key)
        elif generation == chain.generation and token_hash == chain.token_hash:
            return self._advance(
                session_id, replace(chain, generation=generation + 1, token_hash=successor_hash)
            )
        if generation < current.generation:
            return RefreshOutcome(RefreshStatus.RETIRED, session, current)
        return RefreshOutcome(RefreshStatus.UNKNOWN)

    async def use_legacy_refresh_token(
        self, token_hash: bytes, successor_hash: bytes, tag_key: bytes
    ) -> RefreshOutcome:
        for session_id, chain in self._state.chains.items():
            if chain.legacy_hash == token_hash:
                if chain.generation != 0 or self._claimed_elsewhere(session_id):
                    return RefreshOutcome(RefreshStatus.RETIRED, self._state.sessions[session_id])
                return self._advance(
                    session_id,
                    replace(chain, generation=1, token_hash=successor_hash, tag_key=tag_key),
                )
        return RefreshOutcome(RefreshStatus.UNKNOWN)

    async def refresh_chain(self, session_id: uuid.UUID) -> RefreshChain | None:
        chain = self._state.chains.get(session_id)
        if chain is None or chain.tag_key is None:
            return None
        return RefreshChain(chain.generation, chain.tag_key)

    async def find_legacy_refresh_token(self, token_hash: bytes) -> uuid.UUID | None:
        for session_id, chain in self._state.chains.items():
            if chain.legacy_hash == token_hash:
                return session_id
        return None

    async def get(self, session_id: uuid.UUID) -> Session | None:
        return self._state.sessions.get(session_id)

    async def revoke(
        self,
        *,
        reason: RevokeReason,
        revocation_expire_time: datetime,
        session_ids: Sequence[uuid.UUID] | None = None,
        user_id: uuid.UUID | None = None,
        except_session_id: uuid.UUID | None = None,
    ) -> list[uuid.UUID]:
        if (session_ids is None) == (user_id is None):
            raise ValueError("revoke takes either session_ids or user_id")
        state = self._state
        live = [
            s
            for s in state.sessions.values()
            if s.revoke_time is None
            and (
                s.id in session_ids
                if session_ids is not None
                else s.user_id == user_id and s.id != except_session_id
            )
        ]
        rowless = [i for i in session_ids or () if i not in state.sessions]
        now = self._uow.db.now()
        for session in live:
            state.sessions[session.id] = replace(session, revoke_time=now, revoke_reason=reason)
        logged = sorted({i for i in [s.id for s in live] + rowless if i not in state.revocations})
        for session_id in logged:
            state.revocations[session_id] = StoredRevocation(now, revocation_expire_time)
        if logged:
            self._uow.pending_notifications.append(logged)
        for owner in sorted({s.user_id for s in live}):
            count = sum(1 for s in live if s.user_id == owner)
            self._uow.events.record(
                owner,
                [
                    EventDraft(
                        EventType.SESSION_REVOKED,
                        attributes={"reason": reason.value, "count": str(count)},
                    )
                ],
            )
        return logged

    async def delete_expired(
        self, *, session_cutoff: datetime, revocation_cutoff: datetime, limit: int
    ) -> CleanupResult:
        state = self._state
        doomed = sorted(
            (s for s in state.sessions.values() if s.expire_time < session_cutoff),
            key=lambda s: s.expire_time,
        )[:limit]
        for session in doomed:
            del state.sessions[session.id]
        state.chains = {i: c for i, c in state.chains.items() if i in state.sessions}
        gone = sorted(
            (i for i, r in state.revocations.items() if r.expire_time < revocation_cutoff),
            key=lambda i: state.revocations[i].expire_time,
        )[:limit]
        for session_id in gone:
            del state.revocations[session_id]
        return CleanupResult(sessions=len(doomed), revocations=len(gone))


class FakeRevocationChecker:
    """RevocationChecker over the fake database's committed revocation log,
    plus what the local hook reported (``locally``)."""

    def __init__(self, db: FakeDatabase) -> None:
        self._db = db
        self.locally: dict[str, datetime] = {}
        self.checks = 0

    async def is_revoked(self, session_id: str) -> bool:
        self.checks += 1
        try:
            key = uuid.UUID(session_id)
        except ValueError:
            return False
        return key in self._db.revocations

    def add(self, session_ids: Sequence[str], expire_time: datetime) -> None:
        """The RevocationHook."""
        for session_id in session_ids:
            self.locally[session_id] = expire_time


class FakePasswordHasher:
    """A fast stand-in for bcrypt: "fake$<cost>$<sha256 of the password>".
    Records how often it hashed and how many units of work were open then
    (hashing must never hold a connection)."""

    def __init__(
        self,
        *,
        rounds: int = 4,
        db: FakeDatabase | None = None,
        yield_while_hashing: bool = False,
        on_hash: Callable[[], None] | None = None,
    ) -> None:
        self.rounds = rounds
        self._db = db
        # Hand control to other tasks mid-hash, as the real thread pool does,
        # so that concurrent calls interleave.
        self._yield = yield_while_hashing
        self.on_hash = on_hash
        self.hashed = 0
        self.verified = 0
        self.units_open_while_hashing: list[int] = []

    @staticmethod
    def hash_at(password: str, rounds: int) -> str:
        return f"fake${rounds}${hashlib.sha256(password.encode('utf-8')).hexdigest()}"

    async def hash(self, password: str) -> str:
        self.hashed += 1
        if self._db is not None:
            self.units_open_while_hashing.append(self._db.open_units)
        if self.on_hash is not None:
            self.on_hash()
        if self._yield:
            await asyncio.sleep(0)
        return self.hash_at(password, self.rounds)

    async def verify(self, password: str, password_hash: str) -> bool:
        self.verified += 1
        _, _, digest = password_hash.rpartition("$")
        return digest == hashlib.sha256(password.encode("utf-8")).hexdigest()

    def needs_rehash(self, password_hash: str) -> bool:
        parts = password_hash.split("$")
        return len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) < self.rounds


# -- principals ---------------------------------------------------------------------


def as_user(user: User | uuid.UUID, *roles: str) -> Principal:
    """The principal of a user account's access token (roles default to the
    user's own)."""
    user_id = user if isinstance(user, uuid.UUID) else user.id
    held = roles or (user.roles if isinstance(user, User) else (ROLE_USER,))
    return Principal(
        kind=PrincipalKind.USER,
        subject=str(user_id),
        roles=frozenset(held),
        session_id="session",
        token_id="token",
    )


def as_admin(user: User | uuid.UUID | None = None) -> Principal:
    return as_user(user or uuid7(), ROLE_USER, ROLE_ADMIN)


def as_service_account(user: User | uuid.UUID | None = None) -> Principal:
    """A service calling with a user account's token."""
    return as_user(user or uuid7(), ROLE_USER, ROLE_SERVICE)


def as_mtls_service(identity: str = "spiffe://example/billing") -> Principal:
    """A service calling with a client certificate (no user row)."""
    return Principal(kind=PrincipalKind.SERVICE, subject=identity, roles=frozenset({ROLE_SERVICE}))


# -- services ------------------------------------------------------------------------


ACCESS_TTL_SECONDS = 600
REFRESH_TTL_SECONDS = 3600


class FakeClock:
    """A settable time.time for services under test."""

    def __init__(self, start: datetime = EPOCH) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def session_revoker(
    revocations: FakeRevocationChecker, clock: FakeClock | None = None
) -> SessionRevoker:
    lifetimes = SessionLifetimes(
        access_ttl_seconds=ACCESS_TTL_SECONDS,
        refresh_ttl_seconds=REFRESH_TTL_SECONDS,
        clock=clock or FakeClock(),
    )
    return SessionRevoker(lifetimes=lifetimes, on_revoked=revocations.add)


@dataclass
class UserServiceHarness:
    db: FakeDatabase
    hasher: FakePasswordHasher
    service: UserService
    revocations: FakeRevocationChecker


def user_service(
    *,
    allow_signup: bool = True,
    yield_while_hashing: bool = False,
    writer: Callable[[FakeDatabase], UserWriter] | None = None,
) -> UserServiceHarness:
    """A UserService on fresh fakes; ``writer`` makes its UserWriter (by
    default the service's own, through the fakes' units of work)."""
    db = FakeDatabase()
    hasher = FakePasswordHasher(db=db, yield_while_hashing=yield_while_hashing)
    revocations = FakeRevocationChecker(db)
    service = UserService(
        uow_factory=db.uow,
        hasher=hasher,
        password_policy=PasswordPolicy(),
        allow_signup=allow_signup,
        sessions=session_revoker(revocations),
        writer=None if writer is None else writer(db),
    )
    return UserServiceHarness(db, hasher, service, revocations)


@dataclass
class AuthServiceHarness:
    db: FakeDatabase
    clock: FakeClock
    tokens: TokenService
    revocations: FakeRevocationChecker
    revoker: SessionRevoker
    service: AuthService


def auth_service(
    hasher: BcryptPasswordHasher,
    *,
    db: FakeDatabase | None = None,
    lockout: LockoutPolicy | None = None,
) -> AuthServiceHarness:
    """An AuthService on fresh fakes, real tokens (Ed25519) and ``hasher``;
    one FakeClock drives the tokens, the sessions and the login locks."""
    db = db or FakeDatabase()
    clock = FakeClock()
    tokens = TokenService(
        KeyRing(SigningKey.ed25519(Ed25519PrivateKey.generate())),
        issuer="usersvc",
        audience="usersvc",
        access_ttl_seconds=ACCESS_TTL_SECONDS,
        clock=clock,
    )
    revocations = FakeRevocationChecker(db)
    revoker = session_revoker(revocations, clock)
    service = AuthService(
        uow_factory=db.uow,
        hasher=hasher,
        tokens=tokens,
        revocations=revocations,
        sessions=revoker,
        lockout=lockout,
        clock=clock,
    )
    return AuthServiceHarness(db, clock, tokens, revocations, revoker, service)
