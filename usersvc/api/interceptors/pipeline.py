"""The interceptors of usersvc.api.interceptors run as one grpc interceptor.

grpc.aio walks its interceptor chain on every call: for each interceptor a
``functools.partial`` continuation, a coroutine for the chain step and one
for ``intercept_service``, before any handler runs. With seven interceptors
that walk was a measurable share of a GetUser (docs/performance.md). The
interceptors here only ever wrap the method's handler, so the chain can be
folded once per method instead: ``Pipeline`` asks grpc for the handler, wraps
it with each interceptor's ``wrap`` from the innermost out (exactly what the
chain of continuations builds) and reuses the result while the handler
underneath stays the same object.

Each concern stays a separate interceptor, usable and tested on its own; the
order is still the one ``build_interceptors`` writes down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc

from usersvc.api.interceptors.wrapping import MAX_CACHED_METHODS, Handler, WrappingInterceptor


class Pipeline(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """``interceptors`` (outermost first) applied as one interceptor, with
    the same behaviour as passing them to grpc one by one."""

    def __init__(self, interceptors: Sequence[WrappingInterceptor]) -> None:
        self.interceptors: tuple[WrappingInterceptor, ...] = tuple(interceptors)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """The handler of the called method wrapped by every interceptor;
        None for an unknown method (grpc answers UNIMPLEMENTED). Never
        raises."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            # Innermost first, as the chain would have told them.
            for interceptor in reversed(self.interceptors):
                interceptor.unknown_method(method)
            return None
        entry = self._wrapped.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = handler
        for interceptor in reversed(self.interceptors):
            wrapped = interceptor.wrap(wrapped, method)
        if len(self._wrapped) < MAX_CACHED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped
