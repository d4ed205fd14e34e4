"""A server span per RPC (OpenTelemetry; imported only when tracing is on,
see usersvc/observability/tracing.py).

The span is named after the method (``usersvc.v1.UserService/GetUser``),
carries ``rpc.system``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code`` and the request id, and continues the trace of the
caller when its metadata carries one (``traceparent``, through the
configured propagators). Any status but OK marks the span as an error, with
the code name as its description: never the status message, never an
exception text (they are for people and may quote input).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from opentelemetry import propagate
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, use_span

from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    StreamBehaviour,
    UnaryBehaviour,
    WrappingInterceptor,
    wrap_handler,
)
from usersvc.observability.context import current_request_id

REQUEST_ID_ATTRIBUTE = "usersvc.request_id"

# context.code() answers a StatusCode after set_code and may answer the raw
# integer after abort, depending on the grpc version (as in access_log.py,
# kept apart so each interceptor module stands alone).
_CODES: dict[object, grpc.StatusCode] = {code: code for code in grpc.StatusCode}
_CODES.update({code.value[0]: code for code in grpc.StatusCode})


def _final_code(context: Context, error: BaseException | None) -> grpc.StatusCode:
    if error is None or isinstance(error, grpc.aio.AbortError):
        code = context.code()
        return grpc.StatusCode.OK if code is None else _CODES.get(code, grpc.StatusCode.UNKNOWN)
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining < 0.001:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    # Text metadata only: binary (-bin) values carry no trace context.
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _finish(span: Span, context: Context, error: BaseException | None) -> None:
    code = _final_code(context, error)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class TracingInterceptor(WrappingInterceptor):
    """Starts a SERVER span around each call; the span is current while the
    handler runs, so spans made below it (SQL) are its children."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self._tracer = tracer

    def wrap(self, handler: Handler, method: str) -> Handler:
        name = method.lstrip("/")
        service, _, rpc = name.partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        tracer = self._tracer

        def start(context: Context) -> Span:
            parent = propagate.extract(_carrier(context.invocation_metadata()))
            span = tracer.start_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attributes
            )
            span.set_attribute(REQUEST_ID_ATTRIBUTE, current_request_id())
            return span

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                span = start(context)
                # end_on_exit and exception recording off: _finish ends it
                # with the gRPC code, and exception texts stay out of spans.
                with use_span(span, record_exception=False, set_status_on_exception=False):
                    try:
                        response = await inner(request, context)
                    except BaseException as error:
                        _finish(span, context, error)
                        raise
                _finish(span, context, None)
                return response

            return behaviour

        def stream(inner: StreamBehaviour) -> StreamBehaviour:
            # Not made current: a context attached inside an async generator
            # may be detached in another context between two responses. The
            # only streaming methods (health Watch) run no SQL.
            async def behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
                span = start(context)
                try:
                    async for response in inner(request, context):
                        yield response
                except BaseException as error:
                    _finish(span, context, error)
                    raise
                _finish(span, context, None)

            return behaviour

        return wrap_handler(handler, unary=unary, stream=stream)
