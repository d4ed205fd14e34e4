"""The read lane: plain user reads on a pooled connection's driver, without a
unit of work (usersvc.domain.ports.UserReader).

GetUser, LookupUser, BatchGetUsers and ListUsers without a filter read one
statement's worth and write nothing, so they need no transaction of their own: one statement in
autocommit is its own snapshot, exactly what the same statement between
BEGIN and ROLLBACK would see, for a third of the round trips. And they are
the hottest calls, so they skip the ORM session and SQLAlchemy's execution
layer too (each statement through it costs a greenlet switch and its result
processing; measured here: 646 us of CPU per read through a unit of work,
313 us through Core in autocommit, 140 us on the pooled driver connection).

What stays the same as the repository's path:

- the connection is checked out of the engine's pool and back in (its size,
  timeouts, TLS, statement timeout and application name apply);
- the SQL is the repository's own statements (usersvc.adapters.repository.user_rows),
  compiled once by the engine's dialect, and rows become domain Users with
  the repository's mapping;
- failures become DatabaseUnavailable by the same rules, and the database
  monitor's breaker is asked first and told about failures.

Connections, pings and retries are usersvc.adapters.pooled_driver's: a
read's statement is its own ping, and a read whose connection turns out dead
runs once more on a fresh one.

Writes, and reads that decide a write (login, update, delete, ...), never use
this lane: they read inside their unit of work, under its locks, or in the
statement that writes (usersvc.adapters.write_lane).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Select

from usersvc.adapters.db_monitor import DatabaseAvailability
from usersvc.adapters.pooled_driver import DriverStatement, PooledDriver, StatementSpan
from usersvc.adapters.repository.listing import (
    AFTER_ID,
    AFTER_VALUE,
    HOLDER_ID,
    MAX_BYTES,
    LaneShape,
    lane_cursor_value,
    lane_page_statement,
    page_of,
    settled_by_statistics,
    table_estimate,
)
from usersvc.adapters.repository.sizes import GET_USERS_BY_IDS_WITHIN
from usersvc.adapters.repository.user_rows import (
    GET_USER_BY_EMAIL,
    GET_USER_BY_EMAIL_WITH_HOLDER,
    GET_USER_BY_ID,
    GET_USER_BY_ID_WITH_HOLDER,
    GET_USERS_BY_IDS,
    GET_USERS_BY_IDS_WITH_HOLDER,
    settle_holder,
    user_from_row,
)
from usersvc.domain.listing import ListedPage, ListQuery
from usersvc.domain.models import User
from usersvc.domain.role_checks import RoleCheck
from usersvc.domain.wire_size import OversizedUsers

# The most ListUsers page statements kept compiled (see list_unfiltered).
_MAX_PAGE_STATEMENTS = 256


def _compiled(engine: AsyncEngine, statement: Select[Any], *parameters: str) -> str:
    compiled = statement.compile(dialect=engine.dialect)
    # These parameters in this order, which the dialect renders as $1, $2
    # (with casts): the lane passes its arguments by position.
    if list(compiled.positiontup or ()) != list(parameters):
        raise ValueError(f"expected the parameters {parameters!r} in {compiled.string!r}")
    return compiled.string


class SqlAlchemyUserReader:
    """usersvc.domain.ports.UserReader on the engine's pooled connections."""

    def __init__(
        self,
        engine: AsyncEngine,
        availability: DatabaseAvailability | None = None,
        *,
        transaction_pooling: bool = False,
        statement_span: StatementSpan | None = None,
    ) -> None:
        """``statement_span`` wraps each statement when tracing is on: these
        reads bypass the engine, so its SQL spans would not see them.
        Raises ValueError if the repository's statements no longer take
        the parameters this lane passes (a programming error)."""
        self._driver = PooledDriver(
            engine,
            availability,
            transaction_pooling=transaction_pooling,
            statement_span=statement_span,
        )
        self._by_id = _compiled(engine, GET_USER_BY_ID, "user_id")
        self._by_email = _compiled(engine, GET_USER_BY_EMAIL, "email")
        self._by_ids = _compiled(engine, GET_USERS_BY_IDS, "user_ids")
        self._by_id_checked = _compiled(engine, GET_USER_BY_ID_WITH_HOLDER, "holder_id", "user_id")
        self._by_email_checked = _compiled(
            engine, GET_USER_BY_EMAIL_WITH_HOLDER, "holder_id", "email"
        )
        self._by_ids_checked = _compiled(
            engine, GET_USERS_BY_IDS_WITH_HOLDER, "holder_id", "user_ids"
        )
        self._by_ids_within = _compiled(engine, GET_USERS_BY_IDS_WITHIN, "max_bytes", "user_ids")
        # ListUsers pages without a filter, compiled on first use: one
        # statement per LaneShape (3 orderings x 2 directions x 2^4 per
        # page size; the default size is nearly every call).
        self._engine = engine
        self._pages: dict[LaneShape, DriverStatement] = {}

    async def get(self, user_id: uuid.UUID, *, role_check: RoleCheck | None = None) -> User | None:
        """The user, deleted or not; with ``role_check``, the caller's
        account is read in the same statement and the check settled first.
        Raises DatabaseUnavailable, TokenRevoked."""
        if role_check is not None:
            users = await self._checked(self._by_id_checked, role_check, user_id)
            return users[0] if users else None
        rows = await self._driver.read(self._by_id, user_id)
        return _user(rows[0]) if rows else None

    async def get_many(
        self, user_ids: Sequence[uuid.UUID], *, role_check: RoleCheck | None = None
    ) -> list[User]:
        """The stored users among ``user_ids`` (deleted included), in no
        particular order; ``role_check`` as in ``get``. Raises
        DatabaseUnavailable, TokenRevoked."""
        distinct = list(set(user_ids))
        if role_check is not None:
            return await self._checked(self._by_ids_checked, role_check, distinct)
        if not distinct:
            return []
        return [_user(row) for row in await self._driver.read(self._by_ids, distinct)]

    async def get_many_within(
        self, user_ids: Sequence[uuid.UUID], *, max_bytes: int
    ) -> list[User] | OversizedUsers:
        """The stored users among ``user_ids`` (deleted included, in no
        particular order) when their sizes add up to at most ``max_bytes``
        (usersvc.adapters.repository.sizes); else their sizes. Raises
        DatabaseUnavailable."""
        if not user_ids:
            return []
        rows = await self._driver.read(self._by_ids_within, max_bytes, list(set(user_ids)))
        if not rows or rows[0]["fits"]:
            return [_user(row) for row in rows]
        # Too many bytes: the rows hold the sizes, not the users.
        return OversizedUsers(
            wire_bytes={row["id"]: row["wire_bytes"] for row in rows},
            deleted=frozenset(row["id"] for row in rows if row["deleted"]),
        )

    async def get_by_email(self, email: str, *, role_check: RoleCheck | None = None) -> User | None:
        """Case-insensitive match, deleted included; ``role_check`` as in
        ``get``. Raises DatabaseUnavailable, TokenRevoked."""
        if role_check is not None:
            users = await self._checked(self._by_email_checked, role_check, email)
            return users[0] if users else None
        rows = await self._driver.read(self._by_email, email)
        return _user(rows[0]) if rows else None

    async def list_unfiltered(
        self,
        query: ListQuery,
        *,
        role_check: RoleCheck | None = None,
        count_up_to: int | None = None,
    ) -> ListedPage:
        """One page of a query without a filter in one statement (usersvc
        .adapters.repository.listing.lane_page_statement): the page, the
        caller's account when ``role_check`` is given (settled first), and
        with ``count_up_to`` the table's statistics, which settle the total
        when they say more than twice that many (else total_size is None:
        the caller counts). Raises ValueError for a query with a filter, a
        page size below 1 or a cursor that does not fit the ordering (the
        service checks all three); DatabaseUnavailable, TokenRevoked."""
        if query.filter.terms:
            raise ValueError("the read lane lists only without a filter")
        if query.page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {query.page_size}")
        shape = LaneShape(
            ordering=query.ordering,
            show_deleted=query.show_deleted,
            after=query.after is not None,
            budgeted=query.max_bytes is not None,
            statistics=count_up_to is not None,
            limit=query.page_size + 1,
        )
        statement = self._pages.get(shape)
        if statement is None:
            statement = DriverStatement.compile(self._engine, lane_page_statement(shape))
            if len(self._pages) >= _MAX_PAGE_STATEMENTS:
                # Page sizes other callers chose: start over rather than grow.
                self._pages.clear()
            self._pages[shape] = statement
        values: dict[str, object] = {
            HOLDER_ID: None if role_check is None else role_check.account_id,
            MAX_BYTES: query.max_bytes,
        }
        if query.after is not None:
            values[AFTER_VALUE] = lane_cursor_value(query.ordering.field, query.after)
            values[AFTER_ID] = query.after.id
        rows = await self._driver.read(statement.sql, *statement.arguments(values))
        # There is always a row: the holder's and the statistics' columns
        # are on each; an empty page is one row without a user.
        first = rows[0]
        if role_check is not None:
            settle_holder(role_check, first)
        if first["id"] is None:
            rows = ()
        total = None
        if count_up_to is not None:
            estimate = table_estimate(first, show_deleted=query.show_deleted)
            total = settled_by_statistics(estimate, count_up_to)
        return ListedPage(page_of(rows, query), total)

    async def _checked(self, query: str, role_check: RoleCheck, argument: object) -> list[User]:
        # Every row carries the account; a row without a user (id NULL) is
        # the one row of a read that found none.
        rows = await self._driver.read(query, role_check.account_id, argument)
        settle_holder(role_check, rows[0])
        return [_user(row) for row in rows if row["id"] is not None]


def _user(row: Any) -> User:
    # asyncpg Records read like the RowMappings of the repository's path,
    # and the values are the same objects: the dialect converts none of
    # these columns (ids are asyncpg's UUID, a uuid.UUID, on both paths).
    return user_from_row(row)
