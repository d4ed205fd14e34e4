"""Responses a handler has already encoded go to the client as they are.

grpc encodes a handler's response with the method's serializer (the
generated ``<Response>.SerializeToString``) in one call on the event loop.
For the largest responses (4 MiB of users) the servicer encodes them
itself, a user at a time, letting other calls run in between
(usersvc.api.mappers.encode_users_response), and answers bytes. This
interceptor gives every method with a single response a serializer that
passes bytes through and encodes anything else as before, so the other
interceptors, which never look inside a response, see no difference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from usersvc.api.interceptors.wrapping import Handler, WrappingInterceptor


def passing_bytes(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """``serializer``, except that bytes are returned as they are. Raises
    what ``serializer`` raises."""

    def serialize(response: Any) -> bytes:
        if type(response) is bytes:
            return response
        return serializer(response)

    return serialize


class EncodedResponseInterceptor(WrappingInterceptor):
    """Lets single-response handlers answer encoded bytes. It changes only
    the handler's serializer, never its behaviour, and the handlers built
    around it keep that serializer: its place in the chain does not matter,
    and a call costs nothing more than the serializer's type check."""

    def wrap(self, handler: Handler, method: str) -> Handler:
        serializer = handler.response_serializer
        if handler.response_streaming or serializer is None:
            return handler
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                handler.stream_unary,  # type: ignore[arg-type]
                request_deserializer=handler.request_deserializer,
                response_serializer=passing_bytes(serializer),
            )
        return grpc.unary_unary_rpc_method_handler(
            handler.unary_unary,  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=passing_bytes(serializer),
        )
