"""Repositories over SQLAlchemy Core statements on the ORM's tables.

They run inside the unit of work's session and transaction: they flush (each
statement executes at once) but never commit. They return domain dataclasses,
never rows, and raise only domain errors: EmailAlreadyExists for the unique
email index, IdempotencyKeyTaken for a stored request id, DatabaseUnavailable
for connection failures (chained with ``from``).

Inserts use ``ON CONFLICT DO NOTHING`` on the unique index instead of catching
a unique violation: a clash then costs no savepoint and leaves the transaction
usable, and a concurrent insert of the same key waits for the other
transaction and reports the clash only if that one commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from sqlalchemy import (
    ColumnElement,
    Uuid,
    bindparam,
    delete,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Update

from usersvc.adapters.database import constraint_name_of, sqlstate_of, translate_connection_errors
from usersvc.adapters.filter_sql import filter_clause
from usersvc.adapters.orm import USERS_EMAIL_INDEX, idempotency_keys_table, users_table
from usersvc.domain.errors import EmailAlreadyExists, InvalidArgument, UserNotFound
from usersvc.domain.listing import Cursor, Filter, ListQuery, Page, SortField
from usersvc.domain.models import Credentials, NewUser, User, UserPatch, uuid7
from usersvc.domain.ports import IdempotencyKeyTaken, IdempotencyRecord

# PostgreSQL accepts at most 65535 bind parameters per statement; 1000 rows of
# six values stay far below that and match the API's batch limit.
MAX_ROWS_PER_INSERT = 1000

_UNIQUE_VIOLATION = "23505"

_c = users_table.c
# Everything but the password hash: a User never carries it.
_USER_COLUMNS = (
    _c.id,
    _c.email,
    _c.display_name,
    _c.roles,
    _c.labels,
    _c.create_time,
    _c.update_time,
    _c.disable_time,
    _c.delete_time,
    _c.version,
)
_CREDENTIAL_COLUMNS = (*_USER_COLUMNS, _c.password_hash)

# Hot reads, built once: only the parameters change from call to call.
_select_user = select(*_USER_COLUMNS)
_GET_BY_ID = _select_user.where(_c.id == bindparam("user_id"))
_GET_BY_ID_FOR_UPDATE = _GET_BY_ID.with_for_update()
_GET_BY_EMAIL = _select_user.where(func.lower(_c.email) == func.lower(bindparam("email")))
_GET_CREDENTIALS_BY_EMAIL = select(*_CREDENTIAL_COLUMNS).where(
    func.lower(_c.email) == func.lower(bindparam("email"))
)
_GET_CREDENTIALS = select(*_CREDENTIAL_COLUMNS).where(_c.id == bindparam("user_id"))
_PURGE = delete(users_table).where(_c.id == bindparam("user_id")).returning(_c.id)


def _user_from_row(row: RowMapping) -> User:
    return User(
        id=row["id"],
        email=row["email"],
        display_name=row["display_name"],
        roles=tuple(row["roles"]),
        labels=dict(row["labels"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        disable_time=row["disable_time"],
        delete_time=row["delete_time"],
        version=row["version"],
    )


def _credentials_from_row(row: RowMapping) -> Credentials:
    return Credentials(user=_user_from_row(row), password_hash=row["password_hash"])


def _is_email_clash(exc: sa_exc.IntegrityError) -> bool:
    name = constraint_name_of(exc)
    if name is not None:
        return name == USERS_EMAIL_INDEX
    return sqlstate_of(exc) == _UNIQUE_VIOLATION


class SqlAlchemyUserRepository:
    """usersvc.domain.ports.UserRepository on PostgreSQL."""

    def __init__(self, session: AsyncSession):
        self._session = session

    async def add(self, new: NewUser) -> User:
        """Insert one user. Raises EmailAlreadyExists (metadata {"email"}),
        DatabaseUnavailable."""
        users = await self.add_many([new])
        return users[0]

    async def add_many(self, news: Sequence[NewUser]) -> list[User]:
        """Insert users in input order with one INSERT ... RETURNING per
        1000 rows. Raises EmailAlreadyExists with metadata {"email": ...} of
        the first input whose email clashes with a stored user or an earlier
        input; DatabaseUnavailable. After a clash the rows inserted before it
        are still in the transaction: the caller rolls back."""
        created: list[User] = []
        for start in range(0, len(news), MAX_ROWS_PER_INSERT):
            created.extend(await self._insert_chunk(news[start : start + MAX_ROWS_PER_INSERT]))
        return created

    async def _insert_chunk(self, news: Sequence[NewUser]) -> list[User]:
        ids = [uuid7() for _ in news]
        stmt = (
            pg_insert(users_table)
            .values(
                [
                    {
                        "id": user_id,
                        "email": new.email,
                        "password_hash": new.password_hash,
                        "display_name": new.display_name,
                        "roles": list(new.roles),
                        "labels": dict(new.labels),
                    }
                    for user_id, new in zip(ids, news, strict=True)
                ]
            )
            .on_conflict_do_nothing(index_elements=[func.lower(_c.email)])
            .returning(*_USER_COLUMNS)
        )
        rows = await self._all(stmt)
        # RETURNING order is not guaranteed; the ids were chosen here, so
        # they put the rows back in input order and reveal skipped inputs.
        by_id = {row["id"]: row for row in rows}
        created: list[User] = []
        for user_id, new in zip(ids, news, strict=True):
            row = by_id.get(user_id)
            if row is None:
                raise EmailAlreadyExists(metadata={"email": new.email})
            created.append(_user_from_row(row))
        return created

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        """The user, deleted or not; ``for_update`` locks the row until the
        transaction ends. Raises DatabaseUnavailable."""
        stmt = _GET_BY_ID_FOR_UPDATE if for_update else _GET_BY_ID
        row = await self._one_or_none(stmt, {"user_id": user_id})
        return None if row is None else _user_from_row(row)

    async def get_many(self, user_ids: Sequence[uuid.UUID]) -> list[User]:
        """The stored users among ``user_ids`` (deleted included), in no
        particular order. Raises DatabaseUnavailable."""
        if not user_ids:
            return []
        stmt = _select_user.where(_c.id.in_(list(set(user_ids))))
        return [_user_from_row(row) for row in await self._all(stmt)]

    async def get_by_email(self, email: str) -> User | None:
        """Case-insensitive match, deleted included. Raises DatabaseUnavailable."""
        row = await self._one_or_none(_GET_BY_EMAIL, {"email": email})
        return None if row is None else _user_from_row(row)

    async def get_credentials_by_email(self, email: str) -> Credentials | None:
        """Case-insensitive match, deleted included. Raises DatabaseUnavailable."""
        row = await self._one_or_none(_GET_CREDENTIALS_BY_EMAIL, {"email": email})
        return None if row is None else _credentials_from_row(row)

    async def get_credentials(self, user_id: uuid.UUID) -> Credentials | None:
        """Raises DatabaseUnavailable."""
        row = await self._one_or_none(_GET_CREDENTIALS, {"user_id": user_id})
        return None if row is None else _credentials_from_row(row)

    async def update(self, user_id: uuid.UUID, patch: UserPatch) -> User:
        """Apply the patch, bump version and update_time. Raises
        EmailAlreadyExists (metadata {"email"}; the transaction is then
        aborted and must be rolled back), UserNotFound, DatabaseUnavailable."""
        values: dict[str, Any] = {}
        if patch.email is not None:
            values["email"] = patch.email
        if patch.display_name is not None:
            values["display_name"] = patch.display_name
        if patch.roles is not None:
            values["roles"] = list(patch.roles)
        if patch.labels is not None:
            values["labels"] = dict(patch.labels)
        try:
            return await self._write(user_id, values)
        except sa_exc.IntegrityError as exc:
            if patch.email is not None and _is_email_clash(exc):
                raise EmailAlreadyExists(metadata={"email": patch.email}) from exc
            raise

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> User:
        """Bumps version. Raises UserNotFound, DatabaseUnavailable."""
        return await self._write(user_id, {"password_hash": password_hash})

    async def set_disabled(self, user_id: uuid.UUID, disabled: bool) -> User:
        """Set (keeping an earlier time if already set) or clear
        disable_time; bumps version. Raises UserNotFound, DatabaseUnavailable."""
        value = func.coalesce(_c.disable_time, func.now()) if disabled else None
        return await self._write(user_id, {"disable_time": value})

    async def set_deleted(self, user_id: uuid.UUID, deleted: bool) -> User:
        """Set (keeping an earlier time if already set) or clear
        delete_time; bumps version. Raises UserNotFound, DatabaseUnavailable."""
        value = func.coalesce(_c.delete_time, func.now()) if deleted else None
        return await self._write(user_id, {"delete_time": value})

    async def purge(self, user_id: uuid.UUID) -> bool:
        """Delete the row for good; False when there was none. Raises
        DatabaseUnavailable."""
        return await self._one_or_none(_PURGE, {"user_id": user_id}) is not None

    async def list(self, query: ListQuery) -> Page:
        """One keyset page: rows strictly after ``query.after`` in the
        ordering, ties broken by id in the same direction, at most
        ``page_size`` rows; never OFFSET. Raises InvalidArgument (page_size
        below 1, a cursor of the wrong type for the ordering, or an
        unsupported filter), DatabaseUnavailable."""
        if query.page_size < 1:
            raise InvalidArgument.single("page_size", "must be at least 1")
        field = query.ordering.field
        descending = query.ordering.descending
        sort_key = _sort_key(field)
        stmt = _select_user.where(_visible(query.filter, show_deleted=query.show_deleted))
        if query.after is not None:
            row_key = tuple_(sort_key, _c.id)
            bound = tuple_(_cursor_value(field, query.after), literal(query.after.id, Uuid))
            stmt = stmt.where(row_key < bound if descending else row_key > bound)
        if descending:
            stmt = stmt.order_by(sort_key.desc(), _c.id.desc())
        else:
            stmt = stmt.order_by(sort_key.asc(), _c.id.asc())
        # One extra row tells whether another page follows.
        rows = await self._all(stmt.limit(query.page_size + 1))
        users = tuple(_user_from_row(row) for row in rows[: query.page_size])
        next_cursor = None
        if len(rows) > query.page_size:
            last = users[-1]
            next_cursor = Cursor(sort_value=_sort_value(field, last), id=last.id)
        return Page(users=users, next_cursor=next_cursor)

    async def count(self, filter: Filter, *, show_deleted: bool) -> int:
        """Exact number of users matching the filter. Raises InvalidArgument
        (unsupported filter), DatabaseUnavailable."""
        stmt = (
            select(func.count())
            .select_from(users_table)
            .where(_visible(filter, show_deleted=show_deleted))
        )
        with translate_connection_errors():
            result = await self._session.execute(stmt)
        return int(result.scalar_one())

    async def _write(self, user_id: uuid.UUID, values: Mapping[str, Any]) -> User:
        stmt: Update = (
            update(users_table)
            .where(_c.id == user_id)
            .values(**values, version=_c.version + 1, update_time=func.now())
            .returning(*_USER_COLUMNS)
        )
        row = await self._one_or_none(stmt)
        if row is None:
            raise UserNotFound(metadata={"id": str(user_id)})
        return _user_from_row(row)

    async def _one_or_none(
        self, stmt: Any, params: Mapping[str, Any] | None = None
    ) -> RowMapping | None:
        with translate_connection_errors():
            result = await self._session.execute(stmt, params)
        return result.mappings().one_or_none()

    async def _all(self, stmt: Any) -> Sequence[RowMapping]:
        with translate_connection_errors():
            result = await self._session.execute(stmt)
        return result.mappings().all()


def _visible(flt: Filter, *, show_deleted: bool) -> ColumnElement[bool]:
    clause = filter_clause(flt)
    if show_deleted:
        return clause
    return clause & _c.delete_time.is_(None)


def _sort_key(field: SortField) -> ColumnElement[Any]:
    match field:
        case SortField.CREATE_TIME:
            return _c.create_time
        case SortField.EMAIL:
            # lower(email), not email: the unique index is on lower(email).
            return func.lower(_c.email)
        case SortField.DISPLAY_NAME:
            return _c.display_name


def _cursor_value(field: SortField, cursor: Cursor) -> ColumnElement[Any]:
    value = cursor.sort_value
    if field is SortField.CREATE_TIME:
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise InvalidArgument.single("page_token", "does not match the ordering")
        return literal(value, _c.create_time.type)
    if not isinstance(value, str) or "\x00" in value:
        raise InvalidArgument.single("page_token", "does not match the ordering")
    if field is SortField.EMAIL:
        return func.lower(literal(value, _c.email.type))
    return literal(value, _c.display_name.type)


def _sort_value(field: SortField, user: User) -> str | datetime:
    match field:
        case SortField.CREATE_TIME:
            return user.create_time
        case SortField.EMAIL:
            return user.email
        case SortField.DISPLAY_NAME:
            return user.display_name


# --- idempotency ------------------------------------------------------------

_k = idempotency_keys_table.c
_GET_IDEMPOTENCY = select(_k.fingerprint, _k.response).where(
    _k.scope == bindparam("scope"), _k.key == bindparam("key")
)


def _snapshot(user: User) -> dict[str, Any]:
    def iso(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return {
        "id": str(user.id),
        "email": user.email,
        "display_name": user.display_name,
        "roles": list(user.roles),
        "labels": dict(user.labels),
        "create_time": iso(user.create_time),
        "update_time": iso(user.update_time),
        "disable_time": iso(user.disable_time),
        "delete_time": iso(user.delete_time),
        "version": user.version,
    }


def _user_from_snapshot(data: Mapping[str, Any]) -> User:
    def moment(value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    return User(
        id=uuid.UUID(data["id"]),
        email=data["email"],
        display_name=data["display_name"],
        roles=tuple(data["roles"]),
        labels=dict(data["labels"]),
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
        disable_time=moment(data["disable_time"]),
        delete_time=moment(data["delete_time"]),
        version=int(data["version"]),
    )


class SqlAlchemyIdempotencyRepository:
    """usersvc.domain.ports.IdempotencyRepository on PostgreSQL: the first
    response of a request id, as user snapshots (no password hashes)."""

    def __init__(self, session: AsyncSession):
        self._session = session

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        """Raises DatabaseUnavailable."""
        with translate_connection_errors():
            result = await self._session.execute(_GET_IDEMPOTENCY, {"scope": scope, "key": key})
        row = result.mappings().one_or_none()
        if row is None:
            return None
        users = tuple(_user_from_snapshot(item) for item in row["response"])
        return IdempotencyRecord(fingerprint=row["fingerprint"], users=users)

    async def add(self, scope: str, key: str, record: IdempotencyRecord) -> None:
        """Store the first response of a request. Raises IdempotencyKeyTaken
        when another transaction stored the same (scope, key) first (waiting
        for it to commit or roll back if it is still open);
        DatabaseUnavailable."""
        stmt = (
            pg_insert(idempotency_keys_table)
            .values(
                scope=scope,
                key=key,
                fingerprint=record.fingerprint,
                response=[_snapshot(user) for user in record.users],
            )
            .on_conflict_do_nothing(index_elements=[_k.scope, _k.key])
            .returning(_k.key)
        )
        with translate_connection_errors():
            result = await self._session.execute(stmt)
        if result.first() is None:
            raise IdempotencyKeyTaken(f"request id already used in scope {scope!r}")


def raise_integrity_error(exc: sa_exc.IntegrityError) -> NoReturn:
    """Re-raise an IntegrityError surfacing at commit as the domain error it
    stands for: EmailAlreadyExists for the email index, IdempotencyKeyTaken
    for the idempotency key; anything else unchanged."""
    name = constraint_name_of(exc)
    if name == USERS_EMAIL_INDEX:
        raise EmailAlreadyExists() from exc
    if name == idempotency_keys_table.primary_key.name:
        raise IdempotencyKeyTaken("request id already used") from exc
    raise exc


__all__ = [
    "MAX_ROWS_PER_INSERT",
    "SqlAlchemyIdempotencyRepository",
    "SqlAlchemyUserRepository",
    "raise_integrity_error",
]
