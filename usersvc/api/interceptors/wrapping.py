"""What every interceptor here shares: wrap a method's behaviour once, for
any of the four handler kinds, and reuse the wrapped handler on later calls.

grpc.aio asks the interceptor chain for a handler on every call. Building a
wrapped handler is a handful of allocations, so each interceptor keeps the one
it built per method and hands it out again while the handler underneath is
the same object (registered handlers are).
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeAlias, cast

import grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
# A string: the stubs make RpcMethodHandler generic, the runtime class is not.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
UnaryBehaviour: TypeAlias = Callable[[Any, Context], Awaitable[Any]]
StreamBehaviour: TypeAlias = Callable[[Any, Context], AsyncIterator[Any]]
Deserializer: TypeAlias = Callable[[bytes], Any] | None

KEEP: Final = object()
"""``wrap_handler(request_deserializer=KEEP)``: keep the handler's own."""

# Registered methods are few; the cap only matters if a generic handler ever
# answers arbitrary method names, which must not grow memory without bound.
MAX_CACHED_METHODS = 1024


def wrap_handler(
    handler: Handler,
    *,
    unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    stream: Callable[[StreamBehaviour], StreamBehaviour],
    request_deserializer: Deserializer | object = KEEP,
) -> Handler:
    """A handler of the same kind as ``handler`` whose behaviour is
    ``unary(behaviour)`` for a single response or ``stream(behaviour)`` for a
    response stream. The request side passes through untouched (a message, or
    an async iterator of them). Sync behaviours (the generated base class's
    UNIMPLEMENTED stubs) are adapted to async ones first, so wrappers only
    ever see coroutine functions and async generator functions. Never raises.
    """
    deserializer = (
        handler.request_deserializer if request_deserializer is KEEP else request_deserializer
    )
    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        behaviour: Callable[..., Any] = stream(_as_async_stream(cast(Callable[..., Any], inner)))
    else:
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
        factory = (
            grpc.stream_unary_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        behaviour = unary(_as_async_unary(cast(Callable[..., Any], inner)))
    return factory(
        behaviour,
        request_deserializer=deserializer,  # type: ignore[arg-type]
        response_serializer=handler.response_serializer,
    )


def wrap_with_prelude(
    handler: Handler, prelude: Callable[[Context], Awaitable[None]] | Callable[[Context], None]
) -> Handler:
    """``handler`` with ``prelude(context)`` run before its behaviour, for
    every handler kind: the shape of the interceptors that only check or set
    something first (request id, database gate, auth, rate limit). An
    exception from the prelude ends the call before the handler runs.
    ``prelude`` may be a coroutine function or a plain one (decided here,
    once, not per call). Never raises."""
    if inspect.iscoroutinefunction(prelude):
        before = cast(Callable[[Context], Awaitable[None]], prelude)

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                await before(context)
                return await inner(request, context)

            return behaviour

        def stream(inner: StreamBehaviour) -> StreamBehaviour:
            async def behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
                await before(context)
                async for response in inner(request, context):
                    yield response

            return behaviour

    else:
        check = cast(Callable[[Context], None], prelude)

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                check(context)
                return await inner(request, context)

            return behaviour

        def stream(inner: StreamBehaviour) -> StreamBehaviour:
            async def behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
                check(context)
                async for response in inner(request, context):
                    yield response

            return behaviour

    return wrap_handler(handler, unary=unary, stream=stream)


def _as_async_unary(behaviour: Callable[..., Any]) -> UnaryBehaviour:
    if inspect.iscoroutinefunction(behaviour):
        return behaviour

    # Called inline on the event loop: the only sync behaviours this server
    # has are the generated stubs, which return at once.
    async def adapted(request: Any, context: Context) -> Any:
        result = behaviour(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    return adapted


def _as_async_stream(behaviour: Callable[..., Any]) -> StreamBehaviour:
    if inspect.isasyncgenfunction(behaviour):
        return behaviour

    async def adapted(request: Any, context: Context) -> AsyncIterator[Any]:
        result = behaviour(request, context)
        if inspect.isawaitable(result):
            # The reader/writer style: it sends with context.write itself.
            await result
        elif hasattr(result, "__aiter__"):
            async for response in result:
                yield response
        elif result is not None:
            for response in result:
                yield response

    return adapted


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Base of the interceptors here: subclasses say how to wrap one method's
    handler; this class skips unknown methods and caches per method."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """The wrapped handler of the called method. Never raises."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            # Passed on as None, grpc answers UNIMPLEMENTED; anything else
            # would turn into UNKNOWN.
            self.unknown_method(method)
            return None
        entry = self._wrapped.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = self.wrap(handler, method)
        if len(self._wrapped) < MAX_CACHED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    @abstractmethod
    def wrap(self, handler: Handler, method: str) -> Handler:
        """``handler`` with this interceptor's behaviour around it."""

    def unknown_method(self, method: str) -> None:
        """Called for a method no handler serves. Does nothing by default."""
