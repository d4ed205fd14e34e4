"""Admission: how many calls are served at once, per kind, and how long a
request message may take to arrive.

grpc's own ``maximum_concurrent_rpcs`` counts a call from its first HTTP/2
frame (the headers): a client that opens calls and never sends their bodies
fills it, and from then on every call, health checks included, gets
RESOURCE_EXHAUSTED from grpc with no log line and no metric. So the server
does not use it. Instead this interceptor, outermost in the pipeline:

- takes every request message itself, with a deadline per message
  (``message_timeout_seconds``): a call whose body does not arrive in time is
  ended with DEADLINE_EXCEEDED. For that, unary-request methods are handed to
  grpc as request-streaming ones: grpc delivers a unary handler only after
  the body, so the wait would happen where no code of ours can bound it. The
  handlers inside still see one message, exactly as before.
- admits a call only once its (first) request message has arrived, into a
  lane with a cap of its own: ordinary calls, health Check, long-lived
  response streams (Health/Watch and any other response-streaming method) and
  reflection streams. A flood of one kind cannot starve another: a thousand
  Watch streams cannot stop a health Check or a GetUser.
- counts each refusal (``on_refused`` with the reason, for the metrics) and
  logs refusals at most once per ``log_interval_seconds``, with counts, so a
  flood does not become a flood of log lines.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import grpc

from usersvc.api.errors import to_rpc_status
from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    WrappingInterceptor,
    _as_async_stream,
    _as_async_unary,
)
from usersvc.domain.errors import DeadlineExceeded, InvalidArgument, Overloaded

logger = logging.getLogger("usersvc.admission")

HEALTH_CHECK_METHOD: Final = "/grpc.health.v1.Health/Check"
REFLECTION_PREFIXES: Final = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# Health Check answers from memory at once, so few are ever in progress; the
# cap only bounds memory under a flood. Not a setting.
MAX_HEALTH_CHECKS: Final = 256
# Refused callers are told to come back after this long (google.rpc.RetryInfo).
RETRY_AFTER_SECONDS: Final = 1.0

# Lane names, also the ``reason`` label of refusals (and "request_timeout").
CALLS: Final = "calls"
HEALTH: Final = "health"
STREAMS: Final = "streams"
REFLECTION: Final = "reflection"
REQUEST_TIMEOUT: Final = "request_timeout"
REFUSAL_REASONS: Final = (CALLS, HEALTH, STREAMS, REFLECTION, REQUEST_TIMEOUT)


class Lane:
    """A count of calls in progress with a cap."""

    __slots__ = ("in_use", "limit", "name")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.in_use = 0

    def try_enter(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def leave(self) -> None:
        self.in_use -= 1


class RefusalLog:
    """At most one WARNING per ``interval_seconds`` about refused calls: the
    first refusal after a quiet interval at once, the rest counted and
    written in one line when the interval ends. Runs on the event loop."""

    def __init__(self, log: logging.Logger, interval_seconds: float) -> None:
        self._log = log
        self._interval = interval_seconds
        self._pending: Counter[str] = Counter()
        self._flush: asyncio.TimerHandle | None = None

    def refused(self, reason: str) -> None:
        if self._flush is None:
            self._write(Counter({reason: 1}))
            self._flush = asyncio.get_running_loop().call_later(self._interval, self._end)
        else:
            self._pending[reason] += 1

    def _end(self) -> None:
        pending, self._pending = self._pending, Counter()
        if pending:
            self._write(pending)
            # Keep the limit while refusals go on.
            self._flush = asyncio.get_running_loop().call_later(self._interval, self._end)
        else:
            self._flush = None

    def _write(self, counts: Counter[str]) -> None:
        self._log.warning(
            "calls refused: %s",
            ", ".join(f"{counts[reason]} {reason}" for reason in sorted(counts)),
            extra={"refused": dict(counts), "interval_seconds": self._interval},
        )

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


class AdmissionInterceptor(WrappingInterceptor):
    """Caps calls in progress per lane and bounds the wait for each request
    message (see the module docstring). Must be the outermost interceptor:
    it changes the handler kind grpc sees."""

    def __init__(
        self,
        *,
        max_calls: int,
        max_streams: int,
        max_reflection_streams: int,
        message_timeout_seconds: float,
        on_refused: Callable[[str], None] | None = None,
        log_interval_seconds: float = 10.0,
    ) -> None:
        super().__init__()
        self.lanes: dict[str, Lane] = {
            CALLS: Lane(CALLS, max_calls),
            HEALTH: Lane(HEALTH, MAX_HEALTH_CHECKS),
            STREAMS: Lane(STREAMS, max_streams),
            REFLECTION: Lane(REFLECTION, max_reflection_streams),
        }
        self._timeout = message_timeout_seconds
        # Calls started whose (first) request message has not arrived yet.
        self.waiting = 0
        self._on_refused = on_refused
        self._log = RefusalLog(logger, log_interval_seconds)
        self._full = {
            name: to_rpc_status(
                Overloaded(RETRY_AFTER_SECONDS, f"server busy: too many {name} in progress")
            )
            for name in self.lanes
        }
        self._late = to_rpc_status(
            DeadlineExceeded(f"request message not received within {message_timeout_seconds:g} s")
        )
        self._missing = to_rpc_status(
            InvalidArgument.single("", "the call carried no request message")
        )

    def lane_for(self, method: str, handler: Handler) -> Lane:
        if method == HEALTH_CHECK_METHOD:
            return self.lanes[HEALTH]
        if method.startswith(REFLECTION_PREFIXES):
            return self.lanes[REFLECTION]
        if handler.response_streaming:
            return self.lanes[STREAMS]
        return self.lanes[CALLS]

    async def _refuse(self, context: Context, reason: str, status: grpc.Status) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)
        self._log.refused(reason)
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def _next(self, requests: AsyncIterator[Any], context: Context) -> Any:
        """The next request message; raises StopAsyncIteration at the end
        of the stream, AbortError when it does not arrive in time."""
        try:
            async with asyncio.timeout(self._timeout):
                return await anext(requests)
        except TimeoutError:
            await self._refuse(context, REQUEST_TIMEOUT, self._late)
            raise  # unreachable: abort raised

    async def _rest(
        self,
        first: Any,
        requests: AsyncIterator[Any],
        context: Context,
        decode: Callable[[Any], Any],
    ) -> AsyncIterator[Any]:
        # Decoded here, as the handler iterates: a body that does not parse
        # fails inside the interceptors that map that failure (error_mapping).
        yield decode(first)
        while True:
            try:
                message = await self._next(requests, context)
            except StopAsyncIteration:
                return
            yield decode(message)

    async def _admit(self, lane: Lane, context: Context) -> None:
        if not lane.try_enter():
            await self._refuse(context, lane.name, self._full[lane.name])

    def wrap(self, handler: Handler, method: str) -> Handler:
        lane = self.lane_for(method, handler)
        nxt, rest, admit = self._next, self._rest, self._admit
        missing = self._missing
        streaming_request = handler.request_streaming
        # grpc hands this wrapper raw bytes; the handler underneath gets
        # them decoded as its own deserializer says (None: bytes, which is
        # what error_mapping's unary handlers take).
        deserializer = handler.request_deserializer
        decode: Callable[[Any], Any] = _same if deserializer is None else deserializer

        async def take(requests: Any, context: Context) -> Any:
            # The request as the handler underneath expects it: its one
            # message, or an iterator whose every message has a deadline.
            iterator = aiter(requests)
            self.waiting += 1
            try:
                first = await nxt(iterator, context)
            except StopAsyncIteration:
                if streaming_request:
                    await admit(lane, context)
                    return _empty()
                await context.abort(missing.code, missing.details, missing.trailing_metadata)
            finally:
                self.waiting -= 1
            await admit(lane, context)
            if streaming_request:
                return rest(first, iterator, context, decode)
            return decode(first)

        if handler.response_streaming:
            inner_stream = _as_async_stream(
                handler.stream_stream if streaming_request else handler.unary_stream  # type: ignore[arg-type]
            )

            async def streamed(requests: Any, context: Context) -> AsyncIterator[Any]:
                request = await take(requests, context)
                try:
                    async for response in inner_stream(request, context):
                        yield response
                finally:
                    lane.leave()

            return grpc.stream_stream_rpc_method_handler(
                streamed,
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )

        inner_unary = _as_async_unary(
            handler.stream_unary if streaming_request else handler.unary_unary  # type: ignore[arg-type]
        )

        async def unary(requests: Any, context: Context) -> Any:
            request = await take(requests, context)
            try:
                return await inner_unary(request, context)
            finally:
                lane.leave()

        return grpc.stream_unary_rpc_method_handler(
            unary,
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    def close(self) -> None:
        """Stop the pending log flush (at server stop). Raises nothing."""
        self._log.close()


def _same(message: Any) -> Any:
    return message


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator
