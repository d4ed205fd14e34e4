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
from usersvc.observability.context import current_request_id

_principal: ContextVar[Principal] = ContextVar("usersvc_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """Who is calling; ANONYMOUS outside a call or before authentication.
    Never raises."""
    return _principal.get()


def set_principal(principal: Principal) -> Token[Principal]:
    """Make ``principal`` the caller of the running call. Never raises."""
    return _principal.set(principal)


def current_call() -> CallContext:
    """The actor and request id that events written by the running call
    carry (usersvc.domain.events); empty outside a call. Never raises."""
    return CallContext(actor=actor_of(_principal.get()), request_id=current_request_id())
