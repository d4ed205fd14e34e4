"""The write lane: UpdateUser's and CreateUser's one statement in
autocommit on a pooled connection's driver, without a unit of work
(usersvc.domain.ports.UserWriter).

The update (usersvc.adapters.repository.user_update) is one statement that
checks its rules, writes the row and its event, and returns the version it
replaced: a statement in autocommit is its own transaction, so it needs no
BEGIN and no COMMIT around it. Through a unit of work the same statement
costs four round trips (the pool's ping, BEGIN, the statement, COMMIT) and
keeps the row locked from the statement until the COMMIT's round trip
returns; here it costs one, and the row is locked only while PostgreSQL
runs the statement and its commit: on a hot row, the calls queue for that
long only.

The statement is the repository's own, built by the same function, compiled
once per shape by the engine's dialect; its rows become outcomes with the
repository's mapping. Connections, pings and failures are
usersvc.adapters.pooled_driver's: a write is never sent twice.

A statement that wrote an event calls ``events_committed`` once it returns
(it has committed by then), as a unit of work does after its commit
(usersvc.adapters.event_wakeup): the sequencer numbers the event at once.

CreateUser's statement (usersvc.adapters.repository.user_create) inserts
the user and its event; without a request id nothing else belongs in its
transaction. Through a unit of work it cost the same four round trips, and
SQLAlchemy built, keyed and bound a new INSERT for every call.

Patches of email or roles are not served here: an email change also voids
the user's codes and a role change ends its sessions, in the same
transaction, so those go through a unit of work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.db_monitor import DatabaseAvailability
from usersvc.adapters.events import CallContextProvider, no_call
from usersvc.adapters.pooled_driver import DriverStatement, PooledDriver, StatementSpan
from usersvc.adapters.repository import user_create
from usersvc.adapters.repository.user_update import (
    UpdateShape,
    constraint_errors,
    outcome_from_row,
    parameters,
    shape_of,
    statement_for,
)
from usersvc.domain.events import EventDraft
from usersvc.domain.models import NewUser, User, uuid7
from usersvc.domain.ports import UpdateOutcome, UserUpdate
from usersvc.domain.role_checks import RoleCheck


class SqlAlchemyUserWriter:
    """usersvc.domain.ports.UserWriter on the engine's pooled connections."""

    def __init__(
        self,
        engine: AsyncEngine,
        availability: DatabaseAvailability | None = None,
        *,
        call_context: CallContextProvider | None = None,
        events_committed: Callable[[], None] | None = None,
        transaction_pooling: bool = False,
        statement_span: StatementSpan | None = None,
    ) -> None:
        """``call_context`` tells the actor and request id of the events
        written (None: empty); ``events_committed`` (None: nobody) is called
        after each statement that wrote events, and must return at once and
        raise nothing. Raises nothing."""
        self._engine = engine
        self._call_context = call_context or no_call
        self._events_committed = events_committed
        self._driver = PooledDriver(
            engine,
            availability,
            transaction_pooling=transaction_pooling,
            statement_span=statement_span,
        )
        # Compiled on first use, once per shape.
        self._compiled: dict[UpdateShape, DriverStatement] = {}
        self._compiled_creates: dict[user_create.CreateShape, DriverStatement] = {}

    async def update(
        self, change: UserUpdate, *, events: Sequence[EventDraft] = ()
    ) -> UpdateOutcome:
        """UserRepository.update_checked in one statement, committed when
        it returns; ``change.role_check`` is settled by the statement.
        Raises TokenRevoked when that check fails (nothing written),
        ValueError for a patch of email or roles,
        DatabaseUnavailable (also when the connection was lost while the
        statement ran: it may have committed)."""
        if change.patch.email is not None or change.patch.roles is not None:
            raise ValueError("email and roles changes need a unit of work")
        shape = shape_of(change, events)
        statement = self._compiled.get(shape)
        if statement is None:
            statement = DriverStatement.compile(self._engine, statement_for(shape))
            self._compiled[shape] = statement
        arguments = statement.arguments(parameters(change, self._call_context()))
        rows = await self._driver.write(
            statement.sql, arguments, constraints=constraint_errors(change)
        )
        # Always one row (usersvc.adapters.repository.user_update).
        outcome = outcome_from_row(change, rows[0])
        # Written (and committed): its events are there to number.
        if events and outcome.after is not None and self._events_committed is not None:
            self._events_committed()
        return outcome

    async def create(
        self,
        new: NewUser,
        *,
        events: Sequence[EventDraft] = (),
        role_check: RoleCheck | None = None,
    ) -> User:
        """UserRepository.add in one statement, committed when it returns;
        ``role_check`` (unless done) is settled by the same statement, which
        writes nothing when it fails. Raises TokenRevoked,
        EmailAlreadyExists (metadata {"email"}), DatabaseUnavailable (also
        when the connection was lost while the statement ran: it may have
        committed)."""
        pending = None if role_check is None or role_check.done else role_check
        shape = user_create.shape_of(events, pending)
        statement = self._compiled_creates.get(shape)
        if statement is None:
            statement = DriverStatement.compile(self._engine, user_create.statement_for(shape))
            self._compiled_creates[shape] = statement
        values = user_create.parameters(uuid7(), new, self._call_context(), pending)
        rows = await self._driver.write(
            statement.sql,
            statement.arguments(values),
            constraints=user_create.constraint_errors(new),
        )
        user = user_create.created_user(rows, new, pending)
        # Written (and committed): its events are there to number.
        if events and self._events_committed is not None:
            self._events_committed()
        return user
