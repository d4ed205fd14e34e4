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
    ARRAY,
    ColumnElement,
    DateTime,
    Float,
    Integer,
    Text,
    Uuid,
    any_,
    bindparam,
    case,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import Select
from sqlalchemy.sql.dml import Update

from usersvc.adapters.database import constraint_name_of, sqlstate_of, translate_connection_errors
from usersvc.adapters.email_change import email_change_values, void_codes_on_email_change
from usersvc.adapters.filter_sql import filter_clause
from usersvc.adapters.imports import insert_imported_users
from usersvc.adapters.orm import (
    USERS_EMAIL_INDEX,
    idempotency_keys_table,
    refresh_tokens_table,
    sessions_table,
    users_table,
)
from usersvc.adapters.revocation_channel import REVOCATION_CHANNEL, payloads
from usersvc.domain.errors import EmailAlreadyExists, InvalidArgument, UserNotFound
from usersvc.domain.imports import ImportedUser
from usersvc.domain.listing import Cursor, Filter, ListQuery, Page, SortField
from usersvc.domain.lockout import MAX_DOUBLINGS, LockoutPolicy
from usersvc.domain.models import (
    Credentials,
    NewUser,
    RevokeReason,
    Session,
    User,
    UserPatch,
    uuid7,
)
from usersvc.domain.ports import (
    CleanupResult,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    LoginAttempt,
    RefreshOutcome,
    RefreshStatus,
)

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
    _c.email_verified,
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


def _start_login_attempt_statement() -> Update:
    # usersvc.domain.lockout in one statement. Within an UPDATE every column
    # on the right reads the row as it was, and PostgreSQL re-checks the
    # WHERE against the latest version when a concurrent UPDATE of the row
    # committed first: concurrent attempts are counted one after the other,
    # and the ones that arrive after the lock are refused, not counted.
    # Parameter names must differ from column names in an UPDATE.
    now = bindparam("attempt_time", type_=DateTime(timezone=True))
    reached = _c.failed_login_count + 1 >= bindparam("max_failures", type_=Integer)
    lock_seconds = func.least(
        bindparam("lockout_seconds", type_=Float)
        * func.power(2.0, func.least(_c.lock_count, MAX_DOUBLINGS)),
        bindparam("max_lockout_seconds", type_=Float),
    )
    return (
        update(users_table)
        .where(
            func.lower(_c.email) == func.lower(bindparam("login_email", type_=Text)),
            or_(_c.locked_until.is_(None), _c.locked_until <= now),
        )
        .values(
            failed_login_count=case((reached, 0), else_=_c.failed_login_count + 1),
            lock_count=case((reached, _c.lock_count + 1), else_=_c.lock_count),
            locked_until=case(
                (reached, now + func.make_interval(0, 0, 0, 0, 0, 0, lock_seconds)),
                else_=_c.locked_until,
            ),
        )
        .returning(*_CREDENTIAL_COLUMNS, _c.locked_until)
    )


_START_LOGIN_ATTEMPT = _start_login_attempt_statement()
# A counted attempt writes the users row and an unknown email writes
# nothing: waiting for the WAL flush at commit would make a registered
# email's failed login measurably slower than an unknown one's (and a locked
# account's). A crash may lose the last moments of counts, never more.
_ASYNC_COMMIT = text("SET LOCAL synchronous_commit TO off")
_CLEAR_LOGIN_FAILURES = (
    update(users_table)
    .where(_c.id == bindparam("user_id"))
    .values(failed_login_count=0, lock_count=0, locked_until=None)
    .returning(_c.id)
)


def users_by_ids(user_ids: Sequence[uuid.UUID]) -> Select[Any]:
    """The users among ``user_ids``: one statement (an expanding IN, so
    its compiled form is cached whatever the count). Raises nothing."""
    return _select_user.where(_c.id.in_(list(set(user_ids))))


# What the read lane (usersvc.adapters.read_lane) compiles and runs: the very
# statements and row mapping of the repository, so both paths return the
# same users. The batch read takes one array instead of an IN list, so that
# its text (and asyncpg's prepared statement) is the same for any count.
GET_USER_BY_ID = _GET_BY_ID
GET_USER_BY_EMAIL = _GET_BY_EMAIL
GET_USERS_BY_IDS = _select_user.where(_c.id == any_(bindparam("user_ids", type_=ARRAY(Uuid))))


def user_from_row(row: RowMapping) -> User:
    """The domain User of a row of the user columns. Raises KeyError for a
    row without them."""
    return _user_from_row(row)


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
        email_verified=row["email_verified"],
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

    async def import_batch(self, users: Sequence[ImportedUser]) -> list[bool]:
        """Insert the users whose email is free in one INSERT ... SELECT
        FROM unnest(...) ON CONFLICT DO NOTHING (usersvc.adapters.imports),
        skipping the others; per input, whether it was inserted. Raises
        DatabaseUnavailable."""
        return await insert_imported_users(self._session, users)

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
        return [_user_from_row(row) for row in await self._all(users_by_ids(user_ids))]

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

    async def start_login_attempt(
        self, email: str, *, now: datetime, policy: LockoutPolicy
    ) -> LoginAttempt | None:
        """Count one login attempt unless the account is locked at ``now``,
        in one atomic UPDATE ... RETURNING (see the port,
        usersvc.domain.ports.UserRepository). None for an unknown email or a
        locked account, which leave nothing written. The transaction's
        commit then does not wait for the WAL flush. Raises
        DatabaseUnavailable."""
        with translate_connection_errors():
            await self._session.execute(_ASYNC_COMMIT)
        row = await self._one_or_none(
            _START_LOGIN_ATTEMPT,
            {
                "login_email": email,
                "attempt_time": now,
                "max_failures": policy.max_failures,
                "lockout_seconds": float(policy.lockout_seconds),
                "max_lockout_seconds": float(policy.max_lockout_seconds),
            },
        )
        if row is None:
            return None
        locked_until = row["locked_until"]
        return LoginAttempt(
            credentials=_credentials_from_row(row),
            locked_until=locked_until if locked_until is not None and locked_until > now else None,
        )

    async def clear_login_failures(self, user_id: uuid.UUID) -> bool:
        """Reset the failure count, lock and lock count; locks the row until
        the transaction ends. False when there is no such user. Raises
        DatabaseUnavailable."""
        return await self._one_or_none(_CLEAR_LOGIN_FAILURES, {"user_id": user_id}) is not None

    async def update(self, user_id: uuid.UUID, patch: UserPatch) -> User:
        """Apply the patch, bump version and update_time. Raises
        EmailAlreadyExists (metadata {"email"}; the transaction is then
        aborted and must be rolled back), UserNotFound, DatabaseUnavailable."""
        values: dict[str, Any] = {}
        if patch.email is not None:
            values["email"] = patch.email
            # A new email is unverified, and codes sent to the old one are void.
            values.update(email_change_values(patch.email))
            await void_codes_on_email_change(self._session, user_id, patch.email)
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
        "email_verified": user.email_verified,
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
        email_verified=bool(data.get("email_verified", False)),
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


# --- sessions ----------------------------------------------------------------

_s = sessions_table.c
_t = refresh_tokens_table.c
_SESSION_COLUMNS = (
    _s.id,
    _s.user_id,
    _s.create_time,
    _s.expire_time,
    _s.revoke_time,
    _s.revoke_reason,
    _s.last_refresh_time,
)
_SESSION_USER_FK = "fk_sessions_user_id_users"

_GET_SESSION = select(*_SESSION_COLUMNS).where(_s.id == bindparam("session_id"))
_FIND_REFRESH_TOKEN = select(_t.session_id).where(_t.token_hash == bindparam("presented_hash"))
_RETIRED_TOKEN_SESSION = (
    select(*_SESSION_COLUMNS)
    .select_from(refresh_tokens_table.join(sessions_table, _s.id == _t.session_id))
    .where(_t.token_hash == bindparam("presented_hash"))
)


def _use_refresh_token_statement() -> Any:
    # One statement: the conditional UPDATE is the single-use guarantee.
    # Concurrent callers queue on the token's row lock; once the winner
    # commits, PostgreSQL re-checks "use_time IS NULL" for each waiter
    # (READ COMMITTED), which then updates nothing.
    used = (
        update(refresh_tokens_table)
        .where(_t.token_hash == bindparam("presented_hash"), _t.use_time.is_(None))
        .values(use_time=func.now())
        .returning(_t.session_id)
        .cte("used")
    )
    return (
        update(sessions_table)
        .where(_s.id == used.c.session_id)
        .values(last_refresh_time=func.now())
        .returning(*_SESSION_COLUMNS)
    )


_USE_REFRESH_TOKEN = _use_refresh_token_statement()

# Revoking is one statement per target kind: end the live sessions and log
# them for the replicas, atomically. The log also takes given ids that have
# no session row (access tokens minted before sessions were stored), but not
# sessions that were already revoked (they are logged already, or were long
# enough ago that their tokens have expired).
_REVOKE_SESSIONS = text(
    """
    WITH ended AS (
        UPDATE sessions SET revoke_time = now(), revoke_reason = :reason
        WHERE id = ANY(CAST(:session_ids AS uuid[])) AND revoke_time IS NULL
        RETURNING id
    ), rowless AS (
        SELECT given.id FROM unnest(CAST(:session_ids AS uuid[])) AS given(id)
        WHERE NOT EXISTS (SELECT 1 FROM sessions WHERE sessions.id = given.id)
    ), logged AS (
        INSERT INTO session_revocations (session_id, expire_time)
        SELECT id, :expire_time FROM ended
        UNION
        SELECT id, :expire_time FROM rowless
        ON CONFLICT (session_id) DO NOTHING
        RETURNING session_id
    )
    SELECT session_id FROM logged
    """
).bindparams(
    bindparam("reason", type_=Text()),
    bindparam("expire_time", type_=DateTime(timezone=True)),
)
_REVOKE_USER_SESSIONS = text(
    """
    WITH ended AS (
        UPDATE sessions SET revoke_time = now(), revoke_reason = :reason
        WHERE user_id = :user_id AND revoke_time IS NULL
          AND id IS DISTINCT FROM CAST(:except_session_id AS uuid)
        RETURNING id
    ), logged AS (
        INSERT INTO session_revocations (session_id, expire_time)
        SELECT id, :expire_time FROM ended
        ON CONFLICT (session_id) DO NOTHING
        RETURNING session_id
    )
    SELECT session_id FROM logged
    """
).bindparams(
    bindparam("reason", type_=Text()),
    bindparam("user_id", type_=Uuid()),
    bindparam("expire_time", type_=DateTime(timezone=True)),
)
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")
_DELETE_EXPIRED_SESSIONS = text(
    """
    DELETE FROM sessions WHERE id IN (
        SELECT id FROM sessions WHERE expire_time < :cutoff
        ORDER BY expire_time LIMIT :limit FOR UPDATE SKIP LOCKED
    )
    """
).bindparams(bindparam("cutoff", type_=DateTime(timezone=True)))
_DELETE_EXPIRED_REVOCATIONS = text(
    """
    DELETE FROM session_revocations WHERE session_id IN (
        SELECT session_id FROM session_revocations WHERE expire_time < :cutoff
        ORDER BY expire_time LIMIT :limit FOR UPDATE SKIP LOCKED
    )
    """
).bindparams(bindparam("cutoff", type_=DateTime(timezone=True)))


def _session_from_row(row: RowMapping) -> Session:
    reason = row["revoke_reason"]
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        revoke_time=row["revoke_time"],
        revoke_reason=None if reason is None else RevokeReason(reason),
        last_refresh_time=row["last_refresh_time"],
    )


class SqlAlchemySessionRepository:
    """usersvc.domain.ports.SessionRepository on PostgreSQL. Every method
    raises DatabaseUnavailable when the database cannot be reached."""

    def __init__(self, session: AsyncSession):
        self._session = session

    async def create(self, user_id: uuid.UUID, expire_time: datetime) -> Session:
        """A new active session. Raises UserNotFound when the user row does
        not exist (the transaction is then aborted: roll back)."""
        stmt = (
            sessions_table.insert()
            .values(id=uuid7(), user_id=user_id, expire_time=expire_time)
            .returning(*_SESSION_COLUMNS)
        )
        try:
            rows = await self._execute(stmt)
        except sa_exc.IntegrityError as exc:
            if constraint_name_of(exc) == _SESSION_USER_FK:
                raise UserNotFound(metadata={"id": str(user_id)}) from exc
            raise
        return _session_from_row(rows.mappings().one())

    async def add_refresh_token(self, session_id: uuid.UUID, token_hash: bytes) -> None:
        """Store a new, unused refresh token hash."""
        stmt = refresh_tokens_table.insert().values(token_hash=token_hash, session_id=session_id)
        await self._execute(stmt)

    async def use_refresh_token(self, token_hash: bytes) -> RefreshOutcome:
        """Retire an unused token (OK, with the session as it now is), or
        tell a used one (RETIRED) from one never issued (UNKNOWN)."""
        # Not named after the column: in an UPDATE, a parameter named like
        # a column would also be taken as that column's new value.
        params = {"presented_hash": token_hash}
        row = (await self._execute(_USE_REFRESH_TOKEN, params)).mappings().one_or_none()
        if row is not None:
            return RefreshOutcome(RefreshStatus.OK, _session_from_row(row))
        row = (await self._execute(_RETIRED_TOKEN_SESSION, params)).mappings().one_or_none()
        if row is not None:
            return RefreshOutcome(RefreshStatus.RETIRED, _session_from_row(row))
        return RefreshOutcome(RefreshStatus.UNKNOWN)

    async def find_refresh_token(self, token_hash: bytes) -> uuid.UUID | None:
        """The session of a refresh token, used or not."""
        result = await self._execute(_FIND_REFRESH_TOKEN, {"presented_hash": token_hash})
        session_id: uuid.UUID | None = result.scalar_one_or_none()
        return session_id

    async def get(self, session_id: uuid.UUID) -> Session | None:
        row = (await self._execute(_GET_SESSION, {"session_id": session_id})).mappings().first()
        return None if row is None else _session_from_row(row)

    async def revoke(
        self,
        *,
        reason: RevokeReason,
        revocation_expire_time: datetime,
        session_ids: Sequence[uuid.UUID] | None = None,
        user_id: uuid.UUID | None = None,
        except_session_id: uuid.UUID | None = None,
    ) -> list[uuid.UUID]:
        """End sessions, log them and queue a NOTIFY for each chunk of ids
        (sent by PostgreSQL at commit). Returns the ids newly logged. Raises
        ValueError unless exactly one of ``session_ids`` and ``user_id`` is
        given."""
        if (session_ids is None) == (user_id is None):
            raise ValueError("revoke takes either session_ids or user_id")
        if session_ids is not None:
            if not session_ids:
                return []
            result = await self._execute(
                _REVOKE_SESSIONS,
                {
                    "reason": reason.value,
                    "session_ids": list(dict.fromkeys(session_ids)),
                    "expire_time": revocation_expire_time,
                },
            )
        else:
            result = await self._execute(
                _REVOKE_USER_SESSIONS,
                {
                    "reason": reason.value,
                    "user_id": user_id,
                    "except_session_id": except_session_id,
                    "expire_time": revocation_expire_time,
                },
            )
        revoked: list[uuid.UUID] = sorted(result.scalars().all())
        for payload in payloads(revoked):
            await self._execute(_NOTIFY, {"channel": REVOCATION_CHANNEL, "payload": payload})
        return revoked

    async def delete_expired(
        self, *, session_cutoff: datetime, revocation_cutoff: datetime, limit: int
    ) -> CleanupResult:
        """Delete up to ``limit`` expired sessions (refresh tokens cascade)
        and up to ``limit`` expired revocation log rows, skipping rows that
        are locked (another replica cleaning up at the same moment)."""
        sessions = await self._execute(
            _DELETE_EXPIRED_SESSIONS, {"cutoff": session_cutoff, "limit": limit}
        )
        revocations = await self._execute(
            _DELETE_EXPIRED_REVOCATIONS, {"cutoff": revocation_cutoff, "limit": limit}
        )
        return CleanupResult(sessions=_rowcount(sessions), revocations=_rowcount(revocations))

    async def _execute(self, stmt: Any, params: Mapping[str, Any] | None = None) -> Any:
        with translate_connection_errors():
            return await self._session.execute(stmt, params)


def _rowcount(result: Any) -> int:
    count = getattr(result, "rowcount", -1)
    return count if isinstance(count, int) and count >= 0 else 0


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
    "SqlAlchemySessionRepository",
    "SqlAlchemyUserRepository",
    "raise_integrity_error",
]
