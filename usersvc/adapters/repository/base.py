"""What every repository shares: the unit of work's session, and statements
run through the one error translation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncSession

from usersvc.adapters.database_errors import (
    NO_CONSTRAINT_ERRORS,
    ConstraintErrors,
    translate_database_errors,
)
from usersvc.adapters.events import CallContextProvider, no_call
from usersvc.domain.events import CallContext


class SqlAlchemyRepository:
    """A repository bound to one unit of work's AsyncSession."""

    def __init__(self, session: AsyncSession, call_context: CallContextProvider | None = None):
        self._session = session
        # The actor and request id of the events the repository writes.
        self._call_context = call_context or no_call

    def _call(self) -> CallContext:
        return self._call_context()

    async def _execute(
        self,
        statement: Any,
        params: Mapping[str, Any] | None = None,
        *,
        constraints: ConstraintErrors = NO_CONSTRAINT_ERRORS,
    ) -> Result[Any]:
        """Run one statement in the transaction. Raises DatabaseUnavailable
        and the errors ``constraints`` names (usersvc.adapters
        .database_errors)."""
        with translate_database_errors(constraints):
            result: Result[Any] = await self._session.execute(statement, params)
        return result
