"""The re-check of a privileged access token against the stored account.

A token that claims a role beyond "user" counts only while its account is
active and still holds every role the token claims (docs/api.md, "Roles are
re-checked"): a token outlives a demotion by up to its lifetime. That takes
a read of the account on every call with such a token. A ``RoleCheck`` is
that check for one call, done once: in the very statement of the call's own
read when the call is a plain read (GetUser, LookupUser, BatchGetUsers,
ListUsers without a filter: the read lane), in the very statement of its
write for UpdateUser and CreateUser (the write refuses itself when the check
fails: usersvc.adapters.repository.user_update, .user_create; a CreateUser
with a request id settles it first in its unit of work), and otherwise by
the auth interceptor on its own, before the call answers
(usersvc/api/interceptors/auth.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass

from usersvc.domain.errors import TokenRevoked
from usersvc.domain.models import Principal, User, UserState
from usersvc.domain.policies import holds_claimed_roles


@dataclass(eq=False, slots=True)
class RoleCheck:
    """The pending re-check of ``principal``'s claimed roles (a user's
    token: ``account_id`` is its user id). ``passed`` is None until the
    check is done, then whether the account still backs the token."""

    principal: Principal
    account_id: uuid.UUID
    passed: bool | None = None

    @classmethod
    def of(cls, principal: Principal) -> RoleCheck:
        """The check of a user's token. Raises ValueError for a principal
        that is not a user account."""
        account_id = principal.user_id()
        if account_id is None:
            raise ValueError("only a user's token has an account to check")
        return cls(principal, account_id)

    @property
    def done(self) -> bool:
        return self.passed is not None

    def settle(self, *, active: bool, roles: Collection[str]) -> None:
        """Record the verdict on the account as stored now: ``active`` is
        False when it is missing, disabled or deleted; ``roles`` are its
        stored roles. Raises TokenRevoked unless it is active and holds
        every role the token claims."""
        self.passed = active and holds_claimed_roles(self.principal, roles)
        self.ensure_passed()

    def settle_verdict(self, passed: bool) -> None:
        """Record a verdict reached elsewhere by the same rule as
        ``settle`` (an account that is active and holds every claimed
        role), e.g. by the database in the statement that needed it.
        Raises TokenRevoked unless ``passed``."""
        self.passed = passed
        self.ensure_passed()

    def settle_on(self, account: User | None) -> None:
        """``settle`` on the account read whole (None: no such user).
        Raises TokenRevoked as ``settle`` does."""
        if account is None:
            self.settle(active=False, roles=())
        else:
            self.settle(active=account.state is UserState.ACTIVE, roles=account.roles)

    def ensure_passed(self) -> None:
        """Raises TokenRevoked when the check was done and failed."""
        if self.passed is False:
            raise TokenRevoked("the access token's roles are no longer the user's")
