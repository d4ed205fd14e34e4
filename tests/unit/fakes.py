"""In-memory fakes of the ports in usersvc.domain.ports, for unit tests.

They keep the contract the SQL adapters keep: a unit of work sees a private
copy of the data and publishes it only on commit (rolled back otherwise);
emails are unique case-insensitively (checked when written and again at
commit, like a unique index); an idempotency key taken by another unit of
work since this one began fails the commit with IdempotencyKeyTaken;
repositories raise only domain errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import operator
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from usersvc.domain.errors import EmailAlreadyExists, UserNotFound
from usersvc.domain.listing import (
    Comparison,
    Cursor,
    Filter,
    FilterField,
    ListQuery,
    Op,
    Page,
    SortField,
)
from usersvc.domain.models import (
    ROLE_ADMIN,
    ROLE_SERVICE,
    ROLE_USER,
    Credentials,
    NewUser,
    Principal,
    PrincipalKind,
    User,
    UserPatch,
    UserState,
    uuid7,
)
from usersvc.domain.passwords import PasswordPolicy
from usersvc.domain.ports import IdempotencyKeyTaken, IdempotencyRecord
from usersvc.services.users import UserService

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class _Row:
    user: User
    password_hash: str


class FakeDatabase:
    """Committed state shared by the units of work made by ``uow``."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, _Row] = {}
        self.idempotency: dict[tuple[str, str], IdempotencyRecord] = {}
        self.commits = 0
        self.open_units = 0
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


class FakeUnitOfWork:
    users: FakeUserRepository
    idempotency: FakeIdempotencyRepository

    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self._begin()

    def _begin(self) -> None:
        self.rows: dict[uuid.UUID, _Row] = dict(self.db.rows)
        self.keys: dict[tuple[str, str], IdempotencyRecord] = dict(self.db.idempotency)
        self.written: set[uuid.UUID] = set()
        self.purged: set[uuid.UUID] = set()
        self.new_keys: set[tuple[str, str]] = set()
        self.users = FakeUserRepository(self)
        self.idempotency = FakeIdempotencyRepository(self)

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
        self.db.commits += 1
        self._begin()

    async def rollback(self) -> None:
        self._begin()


class FakeUserRepository:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    @property
    def _rows(self) -> dict[uuid.UUID, _Row]:
        return self._uow.rows

    def _owner_of(self, email: str) -> uuid.UUID | None:
        for user_id, row in self._rows.items():
            if row.user.email.lower() == email.lower():
                return user_id
        return None

    def _write(self, user: User, password_hash: str) -> User:
        self._rows[user.id] = _Row(user, password_hash)
        self._uow.written.add(user.id)
        return user

    def _bump(self, user_id: uuid.UUID, **changes: Any) -> User:
        row = self._rows.get(user_id)
        if row is None:
            raise UserNotFound(metadata={"id": str(user_id)})
        password_hash = changes.pop("password_hash", row.password_hash)
        user = replace(
            row.user, version=row.user.version + 1, update_time=self._uow.db.now(), **changes
        )
        return self._write(user, password_hash)

    async def add(self, new: NewUser) -> User:
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
        return self._write(user, new.password_hash)

    async def add_many(self, news: Sequence[NewUser]) -> list[User]:
        return [await self.add(new) for new in news]

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

    async def update(self, user_id: uuid.UUID, patch: UserPatch) -> User:
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
        return self._bump(user_id, **changes)

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> User:
        return self._bump(user_id, password_hash=password_hash)

    async def set_disabled(self, user_id: uuid.UUID, disabled: bool) -> User:
        return self._bump(user_id, disable_time=self._uow.db.now() if disabled else None)

    async def set_deleted(self, user_id: uuid.UUID, deleted: bool) -> User:
        return self._bump(user_id, delete_time=self._uow.db.now() if deleted else None)

    async def purge(self, user_id: uuid.UUID) -> bool:
        if self._rows.pop(user_id, None) is None:
            return False
        self._uow.purged.add(user_id)
        self._uow.written.discard(user_id)
        return True

    async def list(self, query: ListQuery) -> Page:
        rows = self._matching(query.filter, query.show_deleted)
        rows.sort(
            key=lambda u: _sort_key(u, query.ordering.field), reverse=query.ordering.descending
        )
        if query.after is not None:
            cursor = (query.after.sort_value, query.after.id)
            before = operator.lt if query.ordering.descending else operator.gt
            rows = [u for u in rows if before(_sort_key(u, query.ordering.field), cursor)]
        page = rows[: query.page_size]
        more = len(rows) > query.page_size
        last = page[-1] if page else None
        next_cursor = (
            Cursor(_sort_key(last, query.ordering.field)[0], last.id)
            if more and last is not None
            else None
        )
        return Page(users=tuple(page), next_cursor=next_cursor)

    async def count(self, filter: Filter, *, show_deleted: bool) -> int:
        return len(self._matching(filter, show_deleted))

    def _matching(self, filter: Filter, show_deleted: bool) -> list[User]:
        return [
            row.user
            for row in self._rows.values()
            if (show_deleted or row.user.state is not UserState.DELETED)
            and all(matches(row.user, term) for term in filter.terms)
        ]


def _sort_key(user: User, field: SortField) -> tuple[Any, uuid.UUID]:
    value: Any = {
        SortField.CREATE_TIME: user.create_time,
        SortField.EMAIL: user.email,
        SortField.DISPLAY_NAME: user.display_name,
    }[field]
    return value, user.id


_COMPARE: dict[Op, Callable[[Any, Any], bool]] = {
    Op.EQ: operator.eq,
    Op.NE: operator.ne,
    Op.LT: operator.lt,
    Op.LE: operator.le,
    Op.GT: operator.gt,
    Op.GE: operator.ge,
}


def matches(user: User, term: Comparison) -> bool:
    """The semantics documented in usersvc.domain.filtering, in Python."""
    value = term.value
    if term.field is FilterField.LABELS:
        if term.label_key is None:
            return value in user.labels
        if value is None:
            return term.label_key in user.labels
        actual = user.labels.get(term.label_key)
        if term.op is Op.NE:
            return actual != value
        return actual is not None and _COMPARE[term.op](actual, value)
    if term.field is FilterField.ROLES:
        return value in user.roles
    if term.field is FilterField.STATE:
        return _COMPARE[term.op](user.state, value)
    actual_value: Any = {
        FilterField.EMAIL: user.email,
        FilterField.DISPLAY_NAME: user.display_name,
        FilterField.CREATE_TIME: user.create_time,
    }[term.field]
    if term.op is Op.HAS:
        return str(value) in actual_value
    return _COMPARE[term.op](actual_value, value)


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


@dataclass
class UserServiceHarness:
    db: FakeDatabase
    hasher: FakePasswordHasher
    service: UserService


def user_service(
    *, allow_signup: bool = True, yield_while_hashing: bool = False
) -> UserServiceHarness:
    """A UserService on fresh fakes."""
    db = FakeDatabase()
    hasher = FakePasswordHasher(db=db, yield_while_hashing=yield_while_hashing)
    service = UserService(
        uow_factory=db.uow,
        hasher=hasher,
        password_policy=PasswordPolicy(),
        allow_signup=allow_signup,
    )
    return UserServiceHarness(db, hasher, service)
