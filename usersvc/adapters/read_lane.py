"""The read lane: plain user reads on a pooled connection's driver, without a
unit of work (usersvc.domain.ports.UserReader).

GetUser, LookupUser and BatchGetUsers read one statement's worth and write
nothing, so they need no transaction of their own: one statement in
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

A pooled connection is normally pinged before use (usersvc.adapters.database
.install_pre_ping). The lane skips that round trip: its statement is the
ping. When it fails because the connection was dead (a database restart,
``pg_terminate_backend``), that connection is invalidated and the read, having
changed nothing, runs once more on a connection that is pinged (which
replaces every connection pooled before it if that one is dead too).

Behind a transaction pool (USERSVC_DB_TRANSACTION_POOLING) asyncpg prepares
each statement in a round trip of its own, which the proxy may send to
another server than the execution: there each read runs in a read-only
transaction, which keeps both on one server.

Writes, and reads that decide a write (login, update, delete, ...), never use
this lane: they read inside their unit of work, under its locks.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Select
from sqlalchemy.util import await_, greenlet_spawn

from usersvc.adapters.database import skipping_pre_ping
from usersvc.adapters.database_errors import translate_database_errors
from usersvc.adapters.db_monitor import DatabaseAvailability
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
from usersvc.domain.errors import DatabaseUnavailable
from usersvc.domain.models import User
from usersvc.domain.role_checks import RoleCheck


class _DeadConnection(Exception):
    """The statement failed and took its connection with it."""


def _compiled(engine: AsyncEngine, statement: Select[Any], *parameters: str) -> str:
    compiled = statement.compile(dialect=engine.dialect)
    # These parameters in this order, which the dialect renders as $1, $2
    # (with casts): the lane passes its arguments by position.
    if list(compiled.positiontup or ()) != list(parameters):
        raise ValueError(f"expected the parameters {parameters!r} in {compiled.string!r}")
    return compiled.string


# Reused for every read when tracing is off: no allocation on the hot path.
_NO_SPAN: AbstractContextManager[Any] = nullcontext()

# A span around one statement, given its text (usersvc.observability.tracing).
StatementSpan = Callable[[str], AbstractContextManager[Any]]


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
        the one parameter this lane passes (a programming error)."""
        self._statement_span = statement_span
        self._pool = engine.sync_engine.pool
        self._availability = availability
        self._transaction_pooling = transaction_pooling
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

    async def get(self, user_id: uuid.UUID, *, role_check: RoleCheck | None = None) -> User | None:
        """The user, deleted or not; with ``role_check``, the caller's
        account is read in the same statement and the check settled first.
        Raises DatabaseUnavailable, TokenRevoked."""
        if role_check is not None:
            users = await self._checked(self._by_id_checked, role_check, user_id)
            return users[0] if users else None
        rows = await self._fetch(self._by_id, user_id)
        return _user(rows[0]) if rows else None

    async def get_many(
        self, user_ids: Sequence[uuid.UUID], *, role_check: RoleCheck | None = None
    ) -> list[User]:
        """The stored users among ``user_ids`` (deleted included), in no
        particular order; ``role_check`` as in ``get``. Raises
        DatabaseUnavailable, TokenRevoked."""
        if not user_ids:
            if role_check is not None:
                await self._checked(self._by_ids_checked, role_check, [])
            return []
        distinct = list(set(user_ids))
        if role_check is not None:
            return await self._checked(self._by_ids_checked, role_check, distinct)
        return [_user(row) for row in await self._fetch(self._by_ids, distinct)]

    async def get_by_email(self, email: str, *, role_check: RoleCheck | None = None) -> User | None:
        """Case-insensitive match, deleted included; ``role_check`` as in
        ``get``. Raises DatabaseUnavailable, TokenRevoked."""
        if role_check is not None:
            users = await self._checked(self._by_email_checked, role_check, email)
            return users[0] if users else None
        rows = await self._fetch(self._by_email, email)
        return _user(rows[0]) if rows else None

    async def _checked(self, query: str, role_check: RoleCheck, argument: object) -> list[User]:
        # Every row carries the account; a row without a user (id NULL) is
        # the one row of a read that found none.
        rows = await self._fetch(query, role_check.account_id, argument)
        settle_holder(role_check, rows[0])
        return [_user(row) for row in rows if row["id"] is not None]

    async def _fetch(self, query: str, *arguments: object) -> Sequence[Any]:
        if self._availability is not None:
            self._availability.ensure_available()
        try:
            with translate_database_errors():
                try:
                    return await self._run(query, arguments, pinged=False)
                except _DeadConnection:
                    pass  # once more (see the module docstring)
                try:
                    return await self._run(query, arguments, pinged=True)
                except _DeadConnection as exc:
                    raise DatabaseUnavailable() from exc.__cause__
        except DatabaseUnavailable:
            if self._availability is not None:
                self._availability.report_failure()
            raise

    async def _run(
        self, query: str, arguments: tuple[object, ...], *, pinged: bool
    ) -> Sequence[Any]:
        # Straight from the pool: an AsyncConnection around it would cost
        # two more greenlet switches per read and do nothing here. Checkout,
        # statement and checkin share one greenlet: each greenlet costs a
        # fresh frame stack (an mmap and an munmap under Python 3.11), and
        # a greenlet each for checkout and checkin was a tenth of a GetUser's
        # CPU (docs/performance.md).
        checked_out: list[Any] = []
        try:
            with nullcontext() if pinged else skipping_pre_ping():
                return await greenlet_spawn(self._read, query, arguments, checked_out)
        except BaseException as exc:
            if not checked_out:
                raise  # the checkout failed: there is no connection to return
            pooled = checked_out[0]
            driver: Any = pooled.driver_connection
            if isinstance(exc, Exception) and driver is not None and not driver.is_closed():
                await greenlet_spawn(pooled.close)
                raise
            # Dead, or cancelled in the middle of a statement (a deadline):
            # closed rather than pooled, so no later caller inherits it;
            # shielded, so a second cancellation cannot leak it.
            await asyncio.shield(greenlet_spawn(pooled.invalidate))
            if isinstance(exc, Exception):
                raise _DeadConnection() from exc
            raise

    def _read(
        self, query: str, arguments: tuple[object, ...], checked_out: list[Any]
    ) -> Sequence[Any]:
        # Runs in SQLAlchemy's greenlet (the pool is sync code). While the
        # statement runs, ``checked_out`` holds the connection, for _run to
        # return or discard when the statement fails; after it, the
        # connection is back in the pool and ``checked_out`` empty.
        pooled = self._pool.connect()
        checked_out.append(pooled)
        driver: Any = pooled.driver_connection
        span = _NO_SPAN if self._statement_span is None else self._statement_span(query)
        with span:
            rows: Sequence[Any] = await_(self._statement(driver, query, arguments))
        checked_out.clear()
        pooled.close()
        return rows

    async def _statement(
        self, driver: Any, query: str, arguments: tuple[object, ...]
    ) -> Sequence[Any]:
        if self._transaction_pooling:
            async with driver.transaction(readonly=True):
                rows: Sequence[Any] = await driver.fetch(query, *arguments)
                return rows
        rows = await driver.fetch(query, *arguments)
        return rows


def _user(row: Any) -> User:
    # asyncpg Records read like the RowMappings of the repository's path,
    # and the values are the same objects: the dialect converts none of
    # these columns (ids are asyncpg's UUID, a uuid.UUID, on both paths).
    return user_from_row(row)
