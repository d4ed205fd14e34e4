"""What changing a user's email does besides setting it: the new address is
unverified, and the codes issued for the old one are void. Used by the
single updates (usersvc.adapters.repository); the batch update does the same
in its own set-based statements (usersvc.adapters.accounts)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Text, Uuid, bindparam, case, false, text
from sqlalchemy.ext.asyncio import AsyncSession

from usersvc.adapters.database_errors import translate_database_errors
from usersvc.adapters.orm import users_table

# Before an UPDATE of users that may change the email: void the open codes
# when it does (the row is locked by then, so the comparison holds).
_VOID_CODES_ON_EMAIL_CHANGE = text(
    "UPDATE user_codes SET void_time = now() WHERE user_id = :user_id "
    "AND use_time IS NULL AND void_time IS NULL "
    "AND EXISTS (SELECT FROM users WHERE users.id = :user_id AND users.email <> :new_email)"
).bindparams(bindparam("user_id", type_=Uuid()), bindparam("new_email", type_=Text()))


# After an UPDATE of users that changed the email, in its transaction: the
# row is locked by then, so no code can be issued in between, and a code
# committed while the UPDATE waited for the lock is seen (a statement of its
# own, with a snapshot taken after the lock).
_VOID_OPEN_CODES = text(
    "UPDATE user_codes SET void_time = now() WHERE user_id = :user_id "
    "AND use_time IS NULL AND void_time IS NULL"
).bindparams(bindparam("user_id", type_=Uuid()))


def email_change_values(new_email: str) -> Mapping[str, Any]:
    """Extra column values of an UPDATE of users that sets the email to
    ``new_email``: email_verified survives only when the email stays the
    same. Raises nothing."""
    column = users_table.c
    return {
        "email_verified": case((column.email == new_email, column.email_verified), else_=false())
    }


async def void_codes_on_email_change(
    session: AsyncSession, user_id: uuid.UUID, new_email: str
) -> None:
    """Void the user's open codes when ``new_email`` differs from its stored
    email; run before the UPDATE that sets it. Raises DatabaseUnavailable."""
    with translate_database_errors():
        await session.execute(
            _VOID_CODES_ON_EMAIL_CHANGE, {"user_id": user_id, "new_email": new_email}
        )


async def void_codes_after_email_change(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Void the user's open codes; run after the UPDATE that changed its
    email, in the same transaction. Raises DatabaseUnavailable."""
    with translate_database_errors():
        await session.execute(_VOID_OPEN_CODES, {"user_id": user_id})
