"""The request id of the running call: set once per RPC by the API layer
(usersvc/api/interceptors/request_id.py), read by every log line
(usersvc/logging_setup.py) and span. It lives here, below both, so logging
needs nothing of the API layer.

grpc.aio runs every RPC in its own asyncio task, and a task starts with a copy
of the context it was created in, so a value set during one call is never
seen by another.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

_request_id: ContextVar[str] = ContextVar("usersvc_request_id", default="")


def current_request_id() -> str:
    """The request id of the running call; "" outside a call. Never raises."""
    return _request_id.get()


def set_request_id(request_id: str) -> Token[str]:
    """Make ``request_id`` the id of the running call. Never raises."""
    return _request_id.set(request_id)
