"""The unit of work: one AsyncSession, one transaction, rolled back unless
committed.

    async with uow_factory() as uow:
        user = await uow.users.get(user_id, for_update=True)
        ...
        await uow.commit()

A unit of work is used by one task and once; each RPC makes its own from the
factory, so sessions and connections are never shared between tasks. The
connection is checked out of the pool at the first statement, not on entry.

After a commit whose transaction ran a statement marked as writing events
(usersvc.adapters.events.WRITES_EVENTS), the unit of work calls
``events_committed`` (usersvc.adapters.event_wakeup): the sequencer is woken
outside the transaction, so the commit itself sends no NOTIFY.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import ORMExecuteState, Session

from usersvc.adapters.accounts import SqlAlchemyAccountRepository
from usersvc.adapters.database_errors import ConstraintErrors, translate_database_errors
from usersvc.adapters.db_monitor import DatabaseAvailability
from usersvc.adapters.events import (
    WRITES_EVENTS_OPTION,
    CallContextProvider,
    SqlAlchemyEventRecorder,
)
from usersvc.adapters.orm import USERS_EMAIL_INDEX
from usersvc.adapters.repository.idempotency import (
    IDEMPOTENCY_KEY_CONSTRAINT,
    SqlAlchemyIdempotencyRepository,
)
from usersvc.adapters.repository.sessions import SqlAlchemySessionRepository
from usersvc.adapters.repository.users import SqlAlchemyUserRepository
from usersvc.domain.errors import DatabaseUnavailable, EmailAlreadyExists
from usersvc.domain.event_ports import EventRecorder
from usersvc.domain.ports import (
    AccountRepository,
    IdempotencyKeyTaken,
    IdempotencyRepository,
    SessionRepository,
    UnitOfWorkFactory,
    UserRepository,
)

logger = logging.getLogger(__name__)

# What a violation surfacing at commit stands for.
_COMMIT_CONSTRAINT_ERRORS: ConstraintErrors = {
    USERS_EMAIL_INDEX: EmailAlreadyExists,
    IDEMPOTENCY_KEY_CONSTRAINT: lambda: IdempotencyKeyTaken("request id already used"),
}


# Set in a session's ``info`` by the first statement of its transaction that
# writes events; taken away by the commit or rollback that ends it.
_EVENTS_WRITTEN = "usersvc_events_written"


class _UnitOfWorkSession(Session):
    """The sessions of units of work: they note statements writing events."""


@event.listens_for(_UnitOfWorkSession, "do_orm_execute")
def _note_events_written(state: ORMExecuteState) -> None:
    if state.execution_options.get(WRITES_EVENTS_OPTION):
        state.session.info[_EVENTS_WRITTEN] = True


class SqlAlchemyUnitOfWork:
    """usersvc.domain.ports.UnitOfWork over an AsyncSession."""

    users: UserRepository
    idempotency: IdempotencyRepository
    sessions: SessionRepository
    accounts: AccountRepository
    events: EventRecorder

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        availability: DatabaseAvailability | None = None,
        call_context: CallContextProvider | None = None,
        events_committed: Callable[[], None] | None = None,
    ):
        self._session_factory = session_factory
        self._availability = availability
        # Who is calling and the request id, for the events written here.
        self._call_context = call_context
        # Told (synchronously, never awaited) after a commit that wrote events.
        self._events_committed = events_committed
        self._session: AsyncSession | None = None
        self._used = False

    async def __aenter__(self) -> Self:
        """Raises RuntimeError when entered a second time,
        DatabaseUnavailable at once while the database monitor knows the
        database is down (nothing waits for a connect timeout then)."""
        if self._used:
            raise RuntimeError("a unit of work is entered once; make a new one")
        self._used = True
        if self._availability is not None:
            self._availability.ensure_available()
        self._session = self._session_factory()
        self.users = SqlAlchemyUserRepository(self._session, self._call_context)
        self.idempotency = SqlAlchemyIdempotencyRepository(self._session, self._call_context)
        self.sessions = SqlAlchemySessionRepository(self._session, self._call_context)
        self.events = SqlAlchemyEventRecorder(self._session, self._call_context)
        self.accounts = SqlAlchemyAccountRepository(self._session, self._call_context)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Roll back whatever was not committed and return the connection.

        Shielded: when the task is cancelled (an RPC deadline, a client that
        went away) the rollback and release still finish, so the pool does not
        leak the connection. Raises DatabaseUnavailable when the rollback fails
        for connection reasons and no other exception is already propagating.
        """
        session = self._session
        if session is None:
            return
        self._session = None
        if isinstance(exc, DatabaseUnavailable) and self._availability is not None:
            self._availability.report_failure()
        try:
            await asyncio.shield(_close(session))
        except Exception:
            # Do not mask the error that ended the block: the pool has already
            # discarded the connection whose rollback failed.
            if exc is None:
                raise
            logger.warning("rollback after a failed unit of work failed too", exc_info=True)

    async def commit(self) -> None:
        """Commit the transaction. Raises EmailAlreadyExists,
        IdempotencyKeyTaken (constraint checks at commit),
        DatabaseUnavailable, RuntimeError outside ``async with``."""
        session = self._require_session()
        with translate_database_errors(_COMMIT_CONSTRAINT_ERRORS):
            await session.commit()
        if session.info.pop(_EVENTS_WRITTEN, False) and self._events_committed is not None:
            self._events_committed()

    async def rollback(self) -> None:
        """Roll back now; the unit of work may go on with a new transaction.
        Raises DatabaseUnavailable, RuntimeError outside ``async with``."""
        session = self._require_session()
        session.info.pop(_EVENTS_WRITTEN, None)
        with translate_database_errors():
            await session.rollback()

    def _require_session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("use the unit of work inside 'async with'")
        return self._session


async def _close(session: AsyncSession) -> None:
    with translate_database_errors():
        try:
            await session.rollback()
        finally:
            await session.close()


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for units of work: objects stay readable after commit, and
    nothing flushes behind the repositories' backs."""
    return async_sessionmaker(
        engine,
        expire_on_commit=False,
        autoflush=False,
        sync_session_class=_UnitOfWorkSession,
    )


def make_uow_factory(
    engine: AsyncEngine,
    availability: DatabaseAvailability | None = None,
    call_context: CallContextProvider | None = None,
    events_committed: Callable[[], None] | None = None,
) -> UnitOfWorkFactory:
    """A factory of fresh units of work on ``engine``, failing fast while
    ``availability`` (the database monitor) says the database is down;
    ``call_context`` tells the actor and request id of the events written
    (None: empty); ``events_committed`` (None: nobody) is called, and must
    return at once and raise nothing, after each commit that wrote events
    (usersvc.adapters.event_wakeup.SequencerWakeup.events_committed).
    Raises nothing."""
    return functools.partial(
        SqlAlchemyUnitOfWork,
        make_session_factory(engine),
        availability,
        call_context,
        events_committed,
    )
