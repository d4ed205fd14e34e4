"""Interfaces the services depend on; adapters implement them.

Contract shared by every implementation (the SQL one and the unit-test fakes):
repositories flush but never commit; the unit of work commits. Methods raise
only ``usersvc.domain.errors`` types (EmailAlreadyExists, DatabaseUnavailable,
...), never driver or ORM exceptions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from usersvc.domain.listing import Filter, ListQuery, Page
from usersvc.domain.models import Credentials, NewUser, User, UserPatch


class UserRepository(Protocol):
    async def add(self, new: NewUser) -> User:
        """Insert one user. Raises EmailAlreadyExists."""

    async def add_many(self, news: Sequence[NewUser]) -> list[User]:
        """Insert users in order, in one statement where possible.
        Raises EmailAlreadyExists with metadata {"email": ...} of a clash
        (with another row or within the batch)."""

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

    async def update(self, user_id: uuid.UUID, patch: UserPatch) -> User:
        """Apply the patch, bump version and update_time. Raises
        EmailAlreadyExists, UserNotFound."""

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> User:
        """Bumps version. Raises UserNotFound."""

    async def set_disabled(self, user_id: uuid.UUID, disabled: bool) -> User:
        """Set or clear disable_time; bumps version. Raises UserNotFound."""

    async def set_deleted(self, user_id: uuid.UUID, deleted: bool) -> User:
        """Set or clear delete_time; bumps version. Raises UserNotFound."""

    async def purge(self, user_id: uuid.UUID) -> bool:
        """Delete the row for good; False when there was none."""

    async def list(self, query: ListQuery) -> Page:
        """One keyset page: rows strictly after ``query.after`` in the
        ordering (ties broken by id), at most ``page_size`` rows."""

    async def count(self, filter: Filter, *, show_deleted: bool) -> int: ...


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


class UnitOfWork(Protocol):
    users: UserRepository
    idempotency: IdempotencyRepository

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
        """True when the hash's cost is below the configured cost."""
