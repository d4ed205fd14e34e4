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


class SqlAlchemyRepository:
    """A repository bound to one unit of work's AsyncSession."""

    def __init__(self, session: AsyncSession):
        self._session = session

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
