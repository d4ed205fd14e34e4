"""While the database is known to be down, calls that need it are refused
at the door with UNAVAILABLE / DATABASE_UNAVAILABLE, before any work.

The units of work refuse too (usersvc.adapters.db_monitor), but some work
comes before the first one: CreateUser and BatchCreateUsers hash every
password first, deliberately slowly, so that no connection is held through
bcrypt. Refused here, such a call costs nothing, and a flood of them during
an outage neither queues on the bcrypt threads nor delays the answer.

Every method of the usersvc services needs the database during an outage
(even token checks: the revocation feed is down with it) except GetJwks.
Health and reflection are other services and always pass.
"""

from __future__ import annotations

from collections.abc import Callable

from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    WrappingInterceptor,
    wrap_with_prelude,
)

GATED_PREFIX = "/usersvc.v1."
# Served from memory: the public keys.
UNGATED_METHODS = frozenset({"/usersvc.v1.AuthService/GetJwks"})


def needs_database(method: str) -> bool:
    """Whether ``method`` (a full gRPC method path) is refused while the
    database is down. Never raises."""
    return method.startswith(GATED_PREFIX) and method not in UNGATED_METHODS


class DatabaseGateInterceptor(WrappingInterceptor):
    """Calls ``ensure_available`` (the database monitor's breaker, which
    raises DatabaseUnavailable while the database is down) before every
    method that needs the database; ErrorMappingInterceptor, outside this
    one, answers what it raises."""

    def __init__(self, ensure_available: Callable[[], None]) -> None:
        super().__init__()
        self._ensure_available = ensure_available

    def wrap(self, handler: Handler, method: str) -> Handler:
        if not needs_database(method):
            return handler
        ensure_available = self._ensure_available

        def gate(context: Context) -> None:
            ensure_available()

        return wrap_with_prelude(handler, gate)
