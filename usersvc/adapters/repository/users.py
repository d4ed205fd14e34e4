"""The users aggregate: usersvc.domain.ports.UserRepository on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    Integer,
    Uuid,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.sql.dml import Update

from usersvc.adapters.database_errors import NO_CONSTRAINT_ERRORS, ConstraintErrors
from usersvc.adapters.email_change import (
    void_codes_after_email_change,
)
from usersvc.adapters.events import with_events
from usersvc.adapters.orm import users_table
from usersvc.adapters.repository.base import SqlAlchemyRepository
from usersvc.adapters.repository.bulk_import import insert_imported_users
from usersvc.adapters.repository.listing import (
    MATCH_STATISTICS,
    capped_count_statement,
    count_statement,
    page_of,
    page_statement,
    planned_rows,
    planned_rows_statement,
    settled_by_statistics,
    table_estimate,
)
from usersvc.adapters.repository.user_rows import (
    CREDENTIAL_COLUMNS,
    GET_USER_BY_EMAIL,
    GET_USER_BY_ID,
    USER_COLUMNS,
    credentials_from_row,
    user_from_row,
    users,
    users_by_ids,
)
from usersvc.adapters.repository.user_update import (
    constraint_errors,
    outcome_from_row,
    parameters,
    shape_of,
    statement_for,
)
from usersvc.domain.bulk_import import ImportedUser
from usersvc.domain.errors import EmailAlreadyExists, UserNotFound
from usersvc.domain.events import EventDraft
from usersvc.domain.listing import Filter, ListQuery, Page
from usersvc.domain.lockout import MAX_DOUBLINGS, LockoutPolicy
from usersvc.domain.models import Credentials, NewUser, User, uuid7
from usersvc.domain.ports import LoginAttempt, UpdateOutcome, UserUpdate

# PostgreSQL accepts at most 65535 bind parameters per statement; 1000 rows of
# six values stay far below that and match the API's batch limit.
MAX_ROWS_PER_INSERT = 1000

_GET_USER_BY_ID_FOR_UPDATE = GET_USER_BY_ID.with_for_update()
_GET_CREDENTIALS_BY_EMAIL = select(*CREDENTIAL_COLUMNS).where(
    func.lower(users.email) == func.lower(bindparam("email"))
)
_GET_CREDENTIALS = select(*CREDENTIAL_COLUMNS).where(users.id == bindparam("user_id"))
_PURGE = delete(users_table).where(users.id == bindparam("user_id")).returning(users.id)


_GET_LOGIN_BY_EMAIL = select(*CREDENTIAL_COLUMNS, users.locked_until).where(
    func.lower(users.email) == func.lower(bindparam("email"))
)


def _count_login_failure_statement() -> Update:
    # usersvc.domain.lockout in one statement. Within an UPDATE every column
    # on the right reads the row as it was, and PostgreSQL re-checks the
    # WHERE against the latest version when a concurrent UPDATE of the row
    # committed first: concurrent failures are counted one after the other,
    # and the ones that arrive after the lock are not counted.
    # Parameter names must differ from column names in an UPDATE.
    now = bindparam("attempt_time", type_=DateTime(timezone=True))
    reached = users.failed_login_count + 1 >= bindparam("max_failures", type_=Integer)
    lock_seconds = func.least(
        bindparam("lockout_seconds", type_=Float)
        * func.power(2.0, func.least(users.lock_count, MAX_DOUBLINGS)),
        bindparam("max_lockout_seconds", type_=Float),
    )
    return (
        update(users_table)
        .where(
            users.id == bindparam("failed_user_id", type_=Uuid()),
            or_(users.locked_until.is_(None), users.locked_until <= now),
        )
        .values(
            failed_login_count=case((reached, 0), else_=users.failed_login_count + 1),
            lock_count=case((reached, users.lock_count + 1), else_=users.lock_count),
            locked_until=case(
                (reached, now + func.make_interval(0, 0, 0, 0, 0, 0, lock_seconds)),
                else_=users.locked_until,
            ),
        )
        .returning(users.locked_until)
    )


_COUNT_LOGIN_FAILURE = _count_login_failure_statement()
# A counted failure writes the users row and an uncounted one (unknown
# email, locked account) writes nothing: waiting for the WAL flush at commit
# would make a registered email's failed login measurably slower than an
# unknown one's (and a locked account's). A crash may lose the last moments
# of counts, never more.
_ASYNC_COMMIT = text("SET LOCAL synchronous_commit TO off")
_CLEAR_LOGIN_FAILURES = (
    update(users_table)
    .where(users.id == bindparam("user_id"))
    .values(failed_login_count=0, lock_count=0, locked_until=None)
    .returning(*USER_COLUMNS)
)
_CLEAR_LOGIN_FAILURES_UNLESS_LOCKED = _CLEAR_LOGIN_FAILURES.where(
    or_(
        users.locked_until.is_(None),
        users.locked_until <= bindparam("attempt_time", type_=DateTime(timezone=True)),
    )
)
NO_EVENTS: tuple[EventDraft, ...] = ()


class SqlAlchemyUserRepository(SqlAlchemyRepository):
    """usersvc.domain.ports.UserRepository on PostgreSQL. Every method
    raises DatabaseUnavailable when the database cannot be reached."""

    async def add(self, new: NewUser, *, events: Sequence[EventDraft] = NO_EVENTS) -> User:
        """Insert one user, with ``events`` about it in the same statement.
        Raises EmailAlreadyExists (metadata {"email"})."""
        created = await self.add_many([new], events=events)
        return created[0]

    async def add_many(
        self, news: Sequence[NewUser], *, events: Sequence[EventDraft] = NO_EVENTS
    ) -> list[User]:
        """Insert users in input order with one INSERT ... RETURNING per
        1000 rows. Raises EmailAlreadyExists with metadata {"email": ...} of
        the first input whose email clashes with a stored user or an earlier
        input. After a clash the rows inserted before it are still in the
        transaction: the caller rolls back. ``events`` are written for each
        inserted user, in the same statement."""
        created: list[User] = []
        for start in range(0, len(news), MAX_ROWS_PER_INSERT):
            chunk = news[start : start + MAX_ROWS_PER_INSERT]
            created.extend(await self._insert_chunk(chunk, events))
        return created

    async def _insert_chunk(
        self, news: Sequence[NewUser], events: Sequence[EventDraft]
    ) -> list[User]:
        ids = [uuid7() for _ in news]
        values = [
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
        statement = (
            # One row as a plain VALUES: SQLAlchemy caches its compiled form
            # (a multi-row VALUES is compiled anew every time, with the
            # events' CTE when there is one).
            pg_insert(users_table)
            .values(values[0] if len(values) == 1 else values)
            .on_conflict_do_nothing(index_elements=[func.lower(users.email)])
            .returning(*USER_COLUMNS)
        )
        statement = with_events(statement, events, self._call())
        rows = (await self._execute(statement)).mappings().all()
        # RETURNING order is not guaranteed; the ids were chosen here, so
        # they put the rows back in input order and reveal skipped inputs.
        by_id = {row["id"]: row for row in rows}
        created: list[User] = []
        for user_id, new in zip(ids, news, strict=True):
            row = by_id.get(user_id)
            if row is None:
                raise EmailAlreadyExists(metadata={"email": new.email})
            created.append(user_from_row(row))
        return created

    async def import_batch(
        self, imported: Sequence[ImportedUser], *, events: Sequence[EventDraft] = NO_EVENTS
    ) -> list[bool]:
        """Insert the users whose email is free in one INSERT ... SELECT
        FROM unnest(...) ON CONFLICT DO NOTHING (usersvc.adapters.repository
        .bulk_import), skipping the others; per input, whether it was
        inserted. ``events`` are written for each inserted user, in the
        same statement."""
        return await insert_imported_users(
            self._session, imported, events=events, context=self._call()
        )

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        """The user, deleted or not; ``for_update`` locks the row until the
        transaction ends."""
        statement = _GET_USER_BY_ID_FOR_UPDATE if for_update else GET_USER_BY_ID
        row = await self._one_or_none(statement, {"user_id": user_id})
        return None if row is None else user_from_row(row)

    async def get_many(self, user_ids: Sequence[uuid.UUID]) -> list[User]:
        """The stored users among ``user_ids`` (deleted included), in no
        particular order."""
        if not user_ids:
            return []
        result = await self._execute(users_by_ids(user_ids))
        return [user_from_row(row) for row in result.mappings().all()]

    async def get_by_email(self, email: str) -> User | None:
        """Case-insensitive match, deleted included."""
        row = await self._one_or_none(GET_USER_BY_EMAIL, {"email": email})
        return None if row is None else user_from_row(row)

    async def get_credentials_by_email(self, email: str) -> Credentials | None:
        """Case-insensitive match, deleted included."""
        row = await self._one_or_none(_GET_CREDENTIALS_BY_EMAIL, {"email": email})
        return None if row is None else credentials_from_row(row)

    async def get_credentials(self, user_id: uuid.UUID) -> Credentials | None:
        row = await self._one_or_none(_GET_CREDENTIALS, {"user_id": user_id})
        return None if row is None else credentials_from_row(row)

    async def find_login(self, email: str) -> LoginAttempt | None:
        """The credentials and lock of the user with this email
        (case-insensitive, deleted included); writes nothing."""
        row = await self._one_or_none(_GET_LOGIN_BY_EMAIL, {"email": email})
        if row is None:
            return None
        return LoginAttempt(credentials=credentials_from_row(row), locked_until=row["locked_until"])

    async def count_login_failure(
        self, user_id: uuid.UUID, *, now: datetime, policy: LockoutPolicy
    ) -> datetime | None:
        """Count one failed login unless the account is locked at ``now``,
        in one atomic UPDATE (see the port, usersvc.domain.ports
        .UserRepository). Returns the end of the lock this failure started,
        None otherwise; an unknown id or a locked account leave nothing
        written. The transaction's commit then does not wait for the WAL
        flush."""
        await self._execute(_ASYNC_COMMIT)
        row = await self._one_or_none(
            _COUNT_LOGIN_FAILURE,
            {
                "failed_user_id": user_id,
                "attempt_time": now,
                "max_failures": policy.max_failures,
                "lockout_seconds": float(policy.lockout_seconds),
                "max_lockout_seconds": float(policy.max_lockout_seconds),
            },
        )
        if row is None:
            return None
        locked_until: datetime | None = row["locked_until"]
        return locked_until if locked_until is not None and locked_until > now else None

    async def clear_login_failures(
        self,
        user_id: uuid.UUID,
        *,
        unless_locked_at: datetime | None = None,
        events: Sequence[EventDraft] = NO_EVENTS,
    ) -> bool:
        """Reset the failure count, lock and lock count (unless the account
        is locked at ``unless_locked_at``, when given); locks the row until
        the transaction ends; ``events`` about the user go with it. False
        when there is no such user, or it is locked then."""
        if unless_locked_at is None:
            statement = with_events(_CLEAR_LOGIN_FAILURES, events, self._call())
            return await self._one_or_none(statement, {"user_id": user_id}) is not None
        statement = with_events(_CLEAR_LOGIN_FAILURES_UNLESS_LOCKED, events, self._call())
        params = {"user_id": user_id, "attempt_time": unless_locked_at}
        return await self._one_or_none(statement, params) is not None

    async def update_checked(
        self, change: UserUpdate, *, events: Sequence[EventDraft] = NO_EVENTS
    ) -> UpdateOutcome:
        """Apply ``change`` in one statement when its rules pass
        (usersvc.adapters.repository.user_update), with ``events`` about the
        user, each carrying the fields the write changed; a changed email
        also voids the user's open codes. The row stays locked until the
        transaction ends. ``change.role_check`` is settled by the statement
        too. Raises TokenRevoked when it fails (nothing written),
        EmailAlreadyExists (metadata {"email"}; the transaction is then
        aborted and must be rolled back)."""
        statement = statement_for(shape_of(change, events))
        result = await self._execute(
            statement, parameters(change, self._call()), constraints=constraint_errors(change)
        )
        outcome = outcome_from_row(change, result.mappings().one())
        after = outcome.after
        if after is not None and outcome.before is not None and after.email != outcome.before.email:
            await void_codes_after_email_change(self._session, after.id)
        return outcome

    async def set_password_hash(
        self, user_id: uuid.UUID, password_hash: str, *, events: Sequence[EventDraft] = NO_EVENTS
    ) -> User:
        """Bumps version. Raises UserNotFound."""
        return await self._write(user_id, {"password_hash": password_hash}, events=events)

    async def set_disabled(
        self, user_id: uuid.UUID, disabled: bool, *, events: Sequence[EventDraft] = NO_EVENTS
    ) -> User:
        """Set (keeping an earlier time if already set) or clear
        disable_time; bumps version. Raises UserNotFound."""
        value = func.coalesce(users.disable_time, func.now()) if disabled else None
        return await self._write(user_id, {"disable_time": value}, events=events)

    async def set_deleted(
        self, user_id: uuid.UUID, deleted: bool, *, events: Sequence[EventDraft] = NO_EVENTS
    ) -> User:
        """Set (keeping an earlier time if already set) or clear
        delete_time; bumps version. Raises UserNotFound."""
        value = func.coalesce(users.delete_time, func.now()) if deleted else None
        return await self._write(user_id, {"delete_time": value}, events=events)

    async def purge(self, user_id: uuid.UUID, *, events: Sequence[EventDraft] = NO_EVENTS) -> bool:
        """Delete the row for good, with ``events`` (holding the id only, no
        user) in the same statement; False when there was none."""
        statement = with_events(_PURGE, events, self._call(), snapshot=False)
        return await self._one_or_none(statement, {"user_id": user_id}) is not None

    async def list(self, query: ListQuery) -> Page:
        """One keyset page (usersvc.adapters.repository.listing): at most
        ``page_size`` rows after ``query.after``, and no more than fit in
        ``query.max_bytes``. Raises ValueError for a page size below 1 or a
        cursor that does not fit the ordering (a programming error: the
        service checks both), InvalidArgument (field "filter") for an
        unsupported filter."""
        rows = (await self._execute(page_statement(query))).mappings().all()
        return page_of(rows, query)

    async def count(self, filter: Filter, *, show_deleted: bool) -> int:
        """Exact number of users matching the filter. Raises InvalidArgument
        (field "filter") for an unsupported filter."""
        result = await self._execute(count_statement(filter, show_deleted=show_deleted))
        return int(result.scalar_one())

    async def count_matches(self, filter: Filter, *, show_deleted: bool, exact_up_to: int) -> int:
        """The number of users matching the filter: exact when at most
        ``exact_up_to`` do, else an estimate, never below ``exact_up_to + 1``.

        How (docs/performance.md, "Cheap first pages"): without a filter,
        the table's live rows from PostgreSQL's cumulative statistics
        (times the share not deleted, from the last ANALYZE); when that is
        more than twice the cap, no row is counted at all. Otherwise the
        matches are counted, stopping at ``exact_up_to + 1``; past the cap,
        a filtered count is the planner's estimate of the filter's share of
        the table times the live rows. Raises InvalidArgument (field
        "filter") for an unsupported filter."""
        estimate: float | None = None
        if not filter.terms:
            estimate = await self._table_estimate(show_deleted=show_deleted)
            settled = settled_by_statistics(estimate, exact_up_to)
            if settled is not None:
                return settled
        capped = capped_count_statement(filter, show_deleted=show_deleted, cap=exact_up_to)
        exact = int((await self._execute(capped)).scalar_one())
        if exact <= exact_up_to:
            return exact
        if estimate is None or estimate <= exact_up_to:
            estimate = await self._planned_estimate(filter, show_deleted=show_deleted)
        return max(round(estimate), exact_up_to + 1)

    async def _table_estimate(self, *, show_deleted: bool) -> float | None:
        statistics = (await self._execute(MATCH_STATISTICS)).mappings().one_or_none()
        return table_estimate(statistics, show_deleted=show_deleted)

    async def _planned_estimate(self, filter: Filter, *, show_deleted: bool) -> float:
        explained = await self._execute(planned_rows_statement(filter, show_deleted=show_deleted))
        rows = planned_rows(explained.scalar_one())
        statistics = (await self._execute(MATCH_STATISTICS)).mappings().one_or_none()
        # The planner sizes the table from pg_class, stale between VACUUMs
        # (dead rows inflate it); its share of that, times the live rows.
        if statistics is not None and statistics["live_rows"] and statistics["planner_rows"]:
            return rows / float(statistics["planner_rows"]) * float(statistics["live_rows"])
        return rows

    async def _write(
        self,
        user_id: uuid.UUID,
        values: Mapping[str, Any],
        constraints: ConstraintErrors = NO_CONSTRAINT_ERRORS,
        events: Sequence[EventDraft] = NO_EVENTS,
    ) -> User:
        # The events go in the UPDATE's own statement (a data-modifying
        # CTE): no extra round trip, and no event without the change.
        statement = with_events(
            update(users_table)
            .where(users.id == user_id)
            .values(**values, version=users.version + 1, update_time=func.now())
            .returning(*USER_COLUMNS),
            events,
            self._call(),
        )
        row = (await self._execute(statement, constraints=constraints)).mappings().one_or_none()
        if row is None:
            raise UserNotFound(metadata={"id": str(user_id)})
        return user_from_row(row)

    async def _one_or_none(self, statement: Any, params: Mapping[str, Any]) -> RowMapping | None:
        return (await self._execute(statement, params)).mappings().one_or_none()
