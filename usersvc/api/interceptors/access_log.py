"""One INFO line per call, written when the call ends however it ends:
method, status code, duration, peer, principal and request id. Never the
request or response: they carry passwords and tokens."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc

from usersvc.api.context import current_principal
from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    StreamBehaviour,
    UnaryBehaviour,
    WrappingInterceptor,
    wrap_handler,
)
from usersvc.domain.ports import CallObserver, MethodObserver
from usersvc.observability.context import current_request_id

ACCESS_LOGGER = "usersvc.access"
# The pathname of access records (logging's own, without a caller search).
_SOURCE = "(usersvc access log)"
_MAX_UNKNOWN_METHOD_CHARS = 256

# context.code() answers a StatusCode after set_code and may answer the raw
# integer after abort, depending on the grpc version: name both.
_CODE_NAMES: dict[object, str] = {code: code.name for code in grpc.StatusCode}
_CODE_NAMES.update({code.value[0]: code.name for code in grpc.StatusCode})


# The access line's fields, in this order (after ts, level, logger, msg and
# request_id): what _log passes to the generic record and to emit_fields.
_FIELDS = ("method", "code", "duration_ms", "peer", "principal")


class FieldLineHandler(Protocol):
    """A handler that writes a record's line from its fields alone, without
    a LogRecord (usersvc.logging_setup.JsonLinesHandler, found by this
    method's name: the logging setup is not this layer's to import)."""

    def emit_fields(
        self,
        logger_name: str,
        levelno: int,
        message: str,
        request_id: str,
        keys: tuple[str, ...],
        values: Sequence[object],
    ) -> bool:
        """True when handled as ``Handler.handle`` would a record with these
        fields; False when declined (nothing written). Raises nothing."""
        ...


def _only_handler(logger: logging.Logger) -> Any:
    # The one handler a record of ``logger`` reaches (Logger.callHandlers'
    # walk), when the logger has no filters of its own; None when several
    # handlers, or none (logging's last resort), or filters are involved.
    if logger.disabled or logger.filters:
        return None
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None:
                return None
            found = handler
        current = current.parent if current.propagate else None
    return found


def _code_name(context: Context, error: BaseException | None) -> str:
    if error is None or isinstance(error, grpc.aio.AbortError):
        code = context.code()
        return "OK" if code is None else _CODE_NAMES.get(code, "UNKNOWN")
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        # A millisecond of slack: grpc and Python read different clocks.
        if remaining is not None and remaining < 0.001:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"
    # Only when no ErrorMappingInterceptor sits inside: grpc then answers UNKNOWN.
    return "UNKNOWN"


class AccessLogInterceptor(WrappingInterceptor):
    """Logs each call to ``usersvc.access`` (or ``logger``) at INFO, and
    reports it to ``metrics`` (usersvc.observability.metrics) when given:
    this interceptor already knows the method, final code and duration."""

    def __init__(
        self, logger: logging.Logger | None = None, metrics: CallObserver | None = None
    ) -> None:
        super().__init__()
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._metrics = metrics

    def wrap(self, handler: Handler, method: str) -> Handler:
        log = self._log
        peer_of = self._peer
        observer: MethodObserver | None = None
        if self._metrics is not None:
            observer = self._metrics.for_method(
                method,
                request_streaming=handler.request_streaming,
                response_streaming=handler.response_streaming,
            )

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                start = time.perf_counter()
                peer = peer_of(context)
                if observer is not None:
                    observer.started()
                try:
                    response = await inner(request, context)
                except BaseException as error:
                    log(method, context, peer, start, error, observer)
                    raise
                log(method, context, peer, start, None, observer)
                return response

            return behaviour

        def stream(inner: StreamBehaviour) -> StreamBehaviour:
            async def behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
                start = time.perf_counter()
                peer = peer_of(context)
                if observer is not None:
                    observer.started()
                try:
                    async for response in inner(request, context):
                        yield response
                except BaseException as error:
                    log(method, context, peer, start, error, observer)
                    raise
                log(method, context, peer, start, None, observer)

            return behaviour

        return wrap_handler(handler, unary=unary, stream=stream)

    def _peer(self, context: Context) -> str:
        # Read while the call is certainly alive. A response stream that the
        # client cancels is closed later, when the event loop finalizes its
        # generator; grpc's core may have released the call by then, and
        # asking it for the peer then crashed the process (a NULL
        # dereference inside cygrpc, seen under load).
        if not self._logger.isEnabledFor(logging.INFO):
            return ""
        peer: str = context.peer()
        return peer

    def _log(
        self,
        method: str,
        context: Context,
        peer: str,
        start: float,
        error: BaseException | None,
        observer: MethodObserver | None = None,
    ) -> None:
        logging_on = self._logger.isEnabledFor(logging.INFO)
        if not logging_on and observer is None:
            return
        elapsed = time.perf_counter() - start
        code = _code_name(context, error)
        if observer is not None:
            observer.handled(code, elapsed)
            if not logging_on:
                return
        duration_ms = round(elapsed * 1000, 3)
        principal = current_principal()
        subject = principal.subject if principal.is_authenticated else "anonymous"
        request_id = current_request_id()
        logger = self._logger
        # One line a call: this is hot. When the line's one handler can
        # write it from the fields (the service's JSON handler), no
        # LogRecord is built: the same line, for a fraction of the CPU.
        handler = _only_handler(logger)
        emit_fields = getattr(handler, "emit_fields", None)
        if emit_fields is not None and emit_fields(
            logger.name,
            logging.INFO,
            f"{method} {code} {duration_ms:.3f}ms",
            request_id,
            _FIELDS,
            (method, code, duration_ms, peer, subject),
        ):
            return
        # Logger.info without its search of the call stack for the caller's
        # file and line (no formatter here prints them): the record goes to
        # the same handlers and filters.
        logger.handle(
            logger.makeRecord(
                logger.name,
                logging.INFO,
                _SOURCE,
                0,
                "%s %s %.3fms",
                (method, code, duration_ms),
                None,
                extra={
                    "method": method,
                    "code": code,
                    "duration_ms": duration_ms,
                    "peer": peer,
                    "principal": subject,
                    "request_id": request_id,
                },
            )
        )

    def unknown_method(self, method: str) -> None:
        """Log a call to a method nobody serves (grpc answers UNIMPLEMENTED)."""
        if self._logger.isEnabledFor(logging.INFO):
            # The name is whatever the caller sent: keep it short and on one line.
            method = method[:_MAX_UNKNOWN_METHOD_CHARS]
            if not method.isprintable():
                method = ascii(method)
            self._logger.info(
                "%s UNIMPLEMENTED",
                method,
                extra={
                    "method": method,
                    "code": "UNIMPLEMENTED",
                    "duration_ms": 0.0,
                    "principal": "anonymous",
                    "request_id": current_request_id(),
                },
            )
