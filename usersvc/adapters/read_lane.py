"""The read lane: plain user reads on a pooled connection, without a unit of
work (usersvc.domain.ports.UserReader).

GetUser, LookupUser and BatchGetUsers read and write nothing else, so they
need no transaction of their own: one statement in autocommit is its own
snapshot, exactly what the same statement inside BEGIN ... ROLLBACK would
see, for a third of the round trips. The statements and the row mapping are
the repository's (usersvc.adapters.repository), so both paths return the same
domain objects; the connection comes from the engine's pool, with the same
error translation (DatabaseUnavailable) and the same breaker as a unit of
work.

A pooled connection is normally pinged before use (the engine's pre-ping,
usersvc.adapters.database). The lane skips that round trip: its statement is
the ping. When it fails because the connection was dead (a database restart,
``pg_terminate_backend``), SQLAlchemy has already invalidated that connection
and the ones pooled before it, and the read, having changed nothing, runs
once more on a fresh connection. A second failure is the caller's
DatabaseUnavailable.

Writes, and reads that decide a write (login, update, delete, ...), never use
this lane: they read inside their unit of work, under its locks.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database import skipping_pre_ping, translate_connection_errors
from usersvc.adapters.db_monitor import DatabaseAvailability
from usersvc.adapters.repository import (
    GET_USER_BY_EMAIL,
    GET_USER_BY_ID,
    user_from_row,
    users_by_ids,
)
from usersvc.domain.errors import DatabaseUnavailable
from usersvc.domain.models import User


class SqlAlchemyUserReader:
    """usersvc.domain.ports.UserReader on the engine's pool, in autocommit."""

    def __init__(self, engine: AsyncEngine, availability: DatabaseAvailability | None = None):
        # Shares the engine's pool and event listeners; only the isolation
        # level of the connections it checks out differs (reset on return).
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._availability = availability

    async def get(self, user_id: uuid.UUID) -> User | None:
        """The user, deleted or not. Raises DatabaseUnavailable."""
        rows = await self._fetch(GET_USER_BY_ID, {"user_id": user_id})
        return user_from_row(rows[0]) if rows else None

    async def get_many(self, user_ids: Sequence[uuid.UUID]) -> list[User]:
        """The stored users among ``user_ids`` (deleted included), in no
        particular order. Raises DatabaseUnavailable."""
        if not user_ids:
            return []
        return [user_from_row(row) for row in await self._fetch(users_by_ids(user_ids), None)]

    async def get_by_email(self, email: str) -> User | None:
        """Case-insensitive match, deleted included. Raises DatabaseUnavailable."""
        rows = await self._fetch(GET_USER_BY_EMAIL, {"email": email})
        return user_from_row(rows[0]) if rows else None

    async def _fetch(self, stmt: Any, params: Mapping[str, Any] | None) -> Sequence[RowMapping]:
        if self._availability is not None:
            self._availability.ensure_available()
        try:
            with translate_connection_errors():
                try:
                    return await self._run(stmt, params)
                except sa_exc.DBAPIError as exc:
                    if not exc.connection_invalidated:
                        raise
                    # The connection was dead (see the module docstring):
                    # once more, on a fresh one.
                return await self._run(stmt, params)
        except DatabaseUnavailable:
            if self._availability is not None:
                self._availability.report_failure()
            raise

    async def _run(self, stmt: Any, params: Mapping[str, Any] | None) -> Sequence[RowMapping]:
        with skipping_pre_ping():
            async with self._engine.connect() as connection:
                result = await connection.execute(stmt, params)
                return result.mappings().all()
