"""What changing a user's email does besides setting it: the codes issued
for the old address are void. The single update clears email_verified in
its own statement (usersvc.adapters.repository.user_update) and calls this
after it; the batch update does both in its own set-based statements
(usersvc.adapters.accounts)."""

from __future__ import annotations

import uuid

from sqlalchemy import Uuid, bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from usersvc.adapters.database_errors import translate_database_errors

# After an UPDATE of users that changed the email, in its transaction: the
# row is locked by then, so no code can be issued in between, and a code
# committed while the UPDATE waited for the lock is seen (a statement of its
# own, with a snapshot taken after the lock).
_VOID_OPEN_CODES = text(
    "UPDATE user_codes SET void_time = now() WHERE user_id = :user_id "
    "AND use_time IS NULL AND void_time IS NULL"
).bindparams(bindparam("user_id", type_=Uuid()))


async def void_codes_after_email_change(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Void the user's open codes; run after the UPDATE that changed its
    email, in the same transaction. Raises DatabaseUnavailable."""
    with translate_database_errors():
        await session.execute(_VOID_OPEN_CODES, {"user_id": user_id})
