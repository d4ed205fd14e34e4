"""The caller's deadline bounds the work done for the call.

A call with a deadline and a single response (unary, or client-streaming
like ImportUsers, whose request stream is read inside the timer) runs under
``asyncio.timeout`` set a margin before that deadline. When it fires, the
handler's task is cancelled wherever it waits: a query in flight is
cancelled in PostgreSQL too (asyncpg sends a cancel request when the task
awaiting a query is cancelled), the unit of work rolls back and returns its
connection (its exit is shielded), and the caller receives
DEADLINE_EXCEEDED with an ErrorInfo instead of the bare status grpc would
produce a moment later.

Chosen over ``SET LOCAL statement_timeout`` per transaction: that would cost
a round trip on every call, bound only the statements and not the waits for
a pooled connection, a lock or bcrypt, and still need this code to answer
with a rich status. Here the hot path pays one timer. A call without a
deadline is bounded by the server's statement timeout
(USERSVC_DB_STATEMENT_TIMEOUT_MS), which answers UNAVAILABLE /
DATABASE_UNAVAILABLE (usersvc.adapters.database).

Response-streaming methods pass through: grpc itself ends them at the
deadline, and the long-lived ones (health Watch, reflection) must not end
early.
"""

from __future__ import annotations

import asyncio
from typing import Any

from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    StreamBehaviour,
    UnaryBehaviour,
    WrappingInterceptor,
    wrap_handler,
)
from usersvc.domain.errors import DeadlineExceeded

DEFAULT_MARGIN_SECONDS = 0.05


def _unchanged(inner: StreamBehaviour) -> StreamBehaviour:
    return inner


class DeadlineInterceptor(WrappingInterceptor):
    """Raises DeadlineExceeded (for ErrorMappingInterceptor, outside this
    one, to answer) when a unary call is still running ``margin_seconds``
    before its deadline, or already is that close when it arrives."""

    def __init__(self, *, margin_seconds: float = DEFAULT_MARGIN_SECONDS) -> None:
        super().__init__()
        self._margin = margin_seconds

    def wrap(self, handler: Handler, method: str) -> Handler:
        margin = self._margin

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                remaining = context.time_remaining()
                if remaining is None:
                    return await inner(request, context)
                budget = remaining - margin
                if budget <= 0:
                    raise DeadlineExceeded()
                scope = asyncio.timeout(budget)
                try:
                    async with scope:
                        return await inner(request, context)
                except TimeoutError:
                    # Only our own timer means the deadline; a TimeoutError
                    # from inside (a driver's own timeout) is not ours to name.
                    if scope.expired():
                        raise DeadlineExceeded() from None
                    raise

            return behaviour

        return wrap_handler(handler, unary=unary, stream=_unchanged)
