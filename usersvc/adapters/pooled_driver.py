"""One statement on a pooled connection's driver, outside any unit of work:
what the read lane (usersvc.adapters.read_lane) and the write lane
(usersvc.adapters.write_lane) share.

A statement in autocommit is its own transaction: the same atomicity and
snapshot as between BEGIN and COMMIT, for a third of the round trips. The
driver (asyncpg) is called directly: through SQLAlchemy's execution layer
each statement costs a greenlet switch and its result processing (measured
here: 646 us of CPU per read through a unit of work, 313 us through Core in
autocommit, 140 us on the pooled driver connection).

What stays the same as a unit of work's path:

- the connection is checked out of the engine's pool and back in (its size,
  timeouts, TLS, statement timeout and application name apply);
- statements are SQLAlchemy statements compiled once by the engine's
  dialect (``DriverStatement``), with the dialect's own conversion of each
  value;
- failures become DatabaseUnavailable (and the constraint errors asked for)
  by the same translation, and the database monitor's breaker is asked first
  and told about failures.

A pooled connection is normally pinged before use (usersvc.adapters.database
.install_pre_ping). These lanes skip that round trip:

- a read's statement is its own ping: when it fails because the connection
  was dead (a database restart, ``pg_terminate_backend``), that connection
  is invalidated and the read, having changed nothing, runs once more on a
  connection that is pinged (which replaces every connection pooled before
  it if that one is dead too);
- a write is never sent twice: a connection the driver already knows to be
  closed is replaced (by a pinged one) before anything is sent; a connection
  lost while the statement runs is DatabaseUnavailable, since the write may
  have committed (as when a unit of work loses its connection during
  COMMIT).

Behind a transaction pool (USERSVC_DB_TRANSACTION_POOLING) asyncpg prepares
each statement in a round trip of its own, which the proxy may send to
another server than the execution: there each statement runs in a
transaction of its own (read only for reads), which keeps both on one
server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_, greenlet_spawn

from usersvc.adapters.database import skipping_pre_ping
from usersvc.adapters.database_errors import (
    NO_CONSTRAINT_ERRORS,
    ConstraintErrors,
    translate_database_errors,
)
from usersvc.adapters.db_monitor import DatabaseAvailability
from usersvc.domain.errors import DatabaseUnavailable

# Reused for every statement when tracing is off: no allocation on the hot path.
_NO_SPAN: AbstractContextManager[Any] = nullcontext()

# A span around one statement, given its text (usersvc.observability.tracing).
StatementSpan = Callable[[str], AbstractContextManager[Any]]


class _DeadConnection(Exception):
    """The statement failed and took its connection with it."""


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """A SQLAlchemy statement compiled once by a dialect: the driver's SQL
    text, and how to turn named values into its positional arguments (the
    dialect's conversion of each value, the statement's own constants)."""

    sql: str
    # Per position: (parameter name or None for a constant, the constant,
    # the dialect's conversion or None).
    _slots: tuple[tuple[str | None, Any, Callable[[Any], Any] | None], ...]

    @classmethod
    def compile(cls, engine: AsyncEngine, statement: Any) -> DriverStatement:
        """Compile ``statement`` with ``engine``'s dialect. Bind parameters
        without a value are taken by name at each run; values bound in
        the statement (literals) are converted once here. Raises
        ValueError for a statement the dialect compiles without positional
        parameters."""
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect)
        names = compiled.positiontup
        if names is None:
            raise ValueError("the dialect does not use positional parameters")
        constants = compiled.params
        slots: list[tuple[str | None, Any, Callable[[Any], Any] | None]] = []
        for name in names:
            bind = compiled.binds[name]
            convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                slots.append((name, None, convert))
            else:
                value = constants[name]
                slots.append((None, value if convert is None else convert(value), None))
        return cls(compiled.string, tuple(slots))

    def arguments(self, values: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for ``values`` (by parameter name).
        Raises KeyError for a parameter missing from ``values``."""
        arguments: list[Any] = []
        for name, constant, convert in self._slots:
            if name is None:
                arguments.append(constant)
                continue
            value = values[name]
            arguments.append(value if convert is None or value is None else convert(value))
        return arguments


class PooledDriver:
    """Single statements on the engine's pooled connections (see the module
    docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        availability: DatabaseAvailability | None = None,
        *,
        transaction_pooling: bool = False,
        statement_span: StatementSpan | None = None,
    ) -> None:
        """``statement_span`` wraps each statement when tracing is on: these
        statements bypass the engine, so its SQL spans would not see them.
        Raises nothing."""
        self._statement_span = statement_span
        self._pool = engine.sync_engine.pool
        self._availability = availability
        self._transaction_pooling = transaction_pooling

    async def read(self, query: str, *arguments: object) -> Sequence[Any]:
        """The rows of a statement that changes nothing; run once more on a
        fresh connection when its connection turns out dead. Raises
        DatabaseUnavailable."""
        self._ensure_available()
        try:
            with translate_database_errors():
                try:
                    return await self._run(query, arguments, pinged=False, read_only=True)
                except _DeadConnection:
                    pass  # once more (see the module docstring)
                try:
                    return await self._run(query, arguments, pinged=True, read_only=True)
                except _DeadConnection as exc:
                    raise DatabaseUnavailable() from exc.__cause__
        except DatabaseUnavailable:
            self._report_failure()
            raise

    async def write(
        self,
        query: str,
        arguments: Sequence[object],
        *,
        constraints: ConstraintErrors = NO_CONSTRAINT_ERRORS,
    ) -> Sequence[Any]:
        """The rows of a statement that writes, committed when it returns;
        sent at most once. Raises DatabaseUnavailable (also when the
        connection was lost while it ran: it may have committed), the
        errors ``constraints`` names (usersvc.adapters.database_errors)."""
        self._ensure_available()
        try:
            with translate_database_errors(constraints):
                try:
                    return await self._run(query, arguments, pinged=False, read_only=False)
                except _DeadConnection as exc:
                    raise DatabaseUnavailable() from exc.__cause__
        except DatabaseUnavailable:
            self._report_failure()
            raise

    def _ensure_available(self) -> None:
        if self._availability is not None:
            self._availability.ensure_available()

    def _report_failure(self) -> None:
        if self._availability is not None:
            self._availability.report_failure()

    async def _run(
        self, query: str, arguments: Sequence[object], *, pinged: bool, read_only: bool
    ) -> Sequence[Any]:
        # Straight from the pool: an AsyncConnection around it would cost
        # two more greenlet switches per statement and do nothing here.
        # Checkout, statement and checkin share one greenlet: each greenlet
        # costs a fresh frame stack (an mmap and an munmap under Python
        # 3.11), and a greenlet each for checkout and checkin was a tenth of
        # a GetUser's CPU (docs/performance.md).
        checked_out: list[Any] = []
        try:
            with nullcontext() if pinged else skipping_pre_ping():
                rows = await greenlet_spawn(
                    self._in_greenlet, query, arguments, pinged, read_only, checked_out
                )
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
        if rows is _CLOSED:
            # Known dead before anything was sent (the server closed it while
            # it sat in the pool): a pinged one instead, for reads and writes.
            await asyncio.shield(greenlet_spawn(checked_out[0].invalidate))
            return await self._run(query, arguments, pinged=True, read_only=read_only)
        fetched: Sequence[Any] = rows
        return fetched

    def _in_greenlet(
        self,
        query: str,
        arguments: Sequence[object],
        pinged: bool,
        read_only: bool,
        checked_out: list[Any],
    ) -> Any:
        # Runs in SQLAlchemy's greenlet (the pool is sync code). While the
        # statement runs, ``checked_out`` holds the connection, for _run to
        # return or discard when the statement fails; after it, the
        # connection is back in the pool and ``checked_out`` empty.
        pooled = self._pool.connect()
        checked_out.append(pooled)
        driver: Any = pooled.driver_connection
        if not pinged and driver.is_closed():
            return _CLOSED
        span = _NO_SPAN if self._statement_span is None else self._statement_span(query)
        with span:
            rows = await_(self._statement(driver, query, arguments, read_only))
        checked_out.clear()
        pooled.close()
        return rows

    async def _statement(
        self, driver: Any, query: str, arguments: Sequence[object], read_only: bool
    ) -> Sequence[Any]:
        if self._transaction_pooling:
            async with driver.transaction(readonly=read_only):
                rows: Sequence[Any] = await driver.fetch(query, *arguments)
                return rows
        rows = await driver.fetch(query, *arguments)
        return rows


# What _in_greenlet returns for a checked-out connection already closed.
_CLOSED: Any = object()
