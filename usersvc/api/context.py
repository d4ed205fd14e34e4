"""Per-call state of an RPC: the calling principal (its request id is in
usersvc/observability/context.py, where logging reads it too).

grpc.aio runs every RPC in its own asyncio task, and a task starts with a copy
of the context it was created in, so values set here during one call are never
seen by another. The interceptors set them; servicers read them.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

from usersvc.domain.events import CallContext, actor_of
from usersvc.domain.models import ANONYMOUS, Principal
from usersvc.domain.role_checks import RoleCheck
from usersvc.observability.context import current_request_id

_principal: ContextVar[Principal] = ContextVar("usersvc_principal", default=ANONYMOUS)
_role_check: ContextVar[RoleCheck | None] = ContextVar("usersvc_role_check", default=None)


def current_principal() -> Principal:
    """Who is calling; ANONYMOUS outside a call or before authentication.
    Never raises."""
    return _principal.get()


def set_principal(principal: Principal) -> Token[Principal]:
    """Make ``principal`` the caller of the running call. Never raises."""
    return _principal.set(principal)


def current_role_check() -> RoleCheck | None:
    """The re-check of the caller's privileged token that the running call
    is to settle in its own read (usersvc/api/interceptors/auth.py); None
    when there is none to settle. Never raises."""
    return _role_check.get()


def set_role_check(role_check: RoleCheck | None) -> Token[RoleCheck | None]:
    """Make ``role_check`` the running call's pending re-check. Never raises."""
    return _role_check.set(role_check)


def current_call() -> CallContext:
    """The actor and request id that events written by the running call
    carry (usersvc.domain.events); empty outside a call. Never raises."""
    return CallContext(actor=actor_of(_principal.get()), request_id=current_request_id())
