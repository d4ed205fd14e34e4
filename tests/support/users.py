"""Writing a user in tests the way the service does, without its rules."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from usersvc.domain.errors import UserNotFound
from usersvc.domain.models import User, UserPatch
from usersvc.domain.ports import UserUpdate


async def patch_user(
    uow: Any, user_id: uuid.UUID, patch: UserPatch, *, events: Sequence[Any] = ()
) -> User:
    """``uow.users.update_checked`` with no etag or admin rule: the user as
    written. Raises UserNotFound when no live user has ``user_id``, what
    update_checked raises (EmailAlreadyExists)."""
    outcome = await uow.users.update_checked(UserUpdate(user_id, patch), events=events)
    if outcome.after is None:
        raise UserNotFound(metadata={"id": str(user_id)})
    return outcome.after
