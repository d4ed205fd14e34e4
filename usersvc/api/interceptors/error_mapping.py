"""Exceptions -> statuses, in one place.

Domain errors become the statuses ``usersvc.api.errors`` builds; anything else
is logged with its traceback and answered with a generic INTERNAL. Request
bodies are decoded here too, so a body that is not valid protobuf is
INVALID_ARGUMENT rather than grpc's UNKNOWN "Unexpected DecodeError".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from usersvc.api.errors import (
    internal_status,
    status_code_for,
    status_for_code,
    to_rpc_status,
    undecodable_request_status,
)
from usersvc.api.interceptors.wrapping import (
    Context,
    Deserializer,
    Handler,
    StreamBehaviour,
    UnaryBehaviour,
    WrappingInterceptor,
    wrap_handler,
)
from usersvc.domain.errors import DomainError

logger = logging.getLogger(__name__)


class _UndecodableRequest(Exception):
    def __init__(self, message_name: str) -> None:
        super().__init__(message_name)
        self.message_name = message_name


def _message_name(deserializer: Deserializer) -> str:
    # Generated handlers deserialize with `<Message>.FromString`, bound to the class.
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    full_name = getattr(descriptor, "full_name", None)
    return full_name if isinstance(full_name, str) else "request message"


def _unary_decoder(deserializer: Deserializer, message_name: str) -> Callable[[Any], Any]:
    if deserializer is None:
        return _same
    decode = deserializer

    def decoded(raw: Any) -> Any:
        try:
            return decode(raw)
        except DecodeError:
            raise _UndecodableRequest(message_name) from None

    return decoded


def _same(request: Any) -> Any:
    return request


def _stream_decoder(message_name: str) -> Callable[[Any], Any]:
    # grpc deserializes streamed requests while the handler iterates, so the
    # DecodeError surfaces there; mark it on the way out of the iterator.
    async def decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for request in requests:
                yield request
        except DecodeError:
            raise _UndecodableRequest(message_name) from None

    return decoded


async def _abort(context: Context, status: grpc.Status) -> NoReturn:
    # abort() replaces the trailers set earlier in the call (the x-request-id
    # echo, request_id.py) with its own, so send both: the call's first, then
    # the status's grpc-status-details-bin. abort_with_status spelled out:
    # the type stubs predate it.
    trailers = tuple(context.trailing_metadata() or ()) + tuple(status.trailing_metadata or ())
    await context.abort(status.code, status.details, trailers)


class ErrorMappingInterceptor(WrappingInterceptor):
    """Turns exceptions escaping the handler (and the interceptors inside this
    one) into statuses. grpc's AbortError (a handler that already chose its
    status) and asyncio.CancelledError pass through untouched."""

    def wrap(self, handler: Handler, method: str) -> Handler:
        message_name = _message_name(handler.request_deserializer)
        if handler.request_streaming:
            prepare = _stream_decoder(message_name)
            deserializer: object = handler.request_deserializer
        else:
            # grpc would decode before any interceptor runs; take the bytes
            # instead and decode inside the try below.
            prepare = _unary_decoder(handler.request_deserializer, message_name)
            deserializer = None
        status_for = self._status_for

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                try:
                    return await inner(prepare(request), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await _abort(context, status_for(error, context, method))

            return behaviour

        def stream(inner: StreamBehaviour) -> StreamBehaviour:
            async def behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
                try:
                    async for response in inner(prepare(request), context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await _abort(context, status_for(error, context, method))

            return behaviour

        return wrap_handler(handler, unary=unary, stream=stream, request_deserializer=deserializer)

    @staticmethod
    def _status_for(error: Exception, context: Context, method: str) -> grpc.Status:
        if isinstance(error, DomainError):
            if status_code_for(error) is not grpc.StatusCode.INTERNAL:
                return to_rpc_status(error)
        elif isinstance(error, _UndecodableRequest):
            return undecodable_request_status(error.message_name)
        else:
            chosen = context.code()
            if isinstance(chosen, grpc.StatusCode) and chosen is not grpc.StatusCode.OK:
                # The handler set a status and then raised, as the generated
                # base class does for UNIMPLEMENTED: keep its choice.
                return status_for_code(chosen, context.details() or chosen.name)
        # Called from an `except` block: the traceback is the current one.
        logger.exception("unexpected error in %s", method, extra={"method": method})
        return internal_status()
