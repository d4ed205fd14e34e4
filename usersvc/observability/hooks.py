"""The shapes through which the API layer and the services report what
happened, without knowing about Prometheus. Each hook is optional: None means
metrics are off, and the caller then does no work for them at all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# A login attempt's outcome; one of usersvc.observability.metrics.LOGIN_OUTCOMES.
LoginOutcomeHook = Callable[[str], None]
# A call refused by a rate limit, with the bucket kind ("auth" or "api").
RateLimitedHook = Callable[[str], None]
# Sessions revoked in one committed transaction: the reason and how many.
RevokedHook = Callable[[str, int], None]


class MethodObserver(Protocol):
    """Counts and times the calls of one gRPC method."""

    def started(self) -> None:
        """A call began. Raises nothing."""

    def handled(self, code: str, seconds: float) -> None:
        """A call ended with ``code`` (a grpc.StatusCode name such as
        ``NOT_FOUND``) after ``seconds``. Raises nothing."""


class CallObserver(Protocol):
    """Hands out one MethodObserver per method, built once per method."""

    def for_method(
        self, method: str, *, request_streaming: bool, response_streaming: bool
    ) -> MethodObserver:
        """The observer of ``method`` (``/package.Service/Method``). Raises nothing."""
