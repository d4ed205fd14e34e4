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
  handlers inside still see one message, exactly as before. A unary request
  is read with ``context.read()``, not through grpc's request iterator (an
  async generator per call, with the event loop's generator hooks).
- admits a call only once its (first) request message has arrived, into a
  lane with a cap of its own: ordinary calls, health Check, long-lived
  response streams (Health/Watch and any other response-streaming method) and
  reflection streams. A flood of one kind cannot starve another: a thousand
  Watch streams cannot stop a health Check or a GetUser.
- counts each refusal (``on_refused`` with the reason, for the metrics) and
  logs refusals at most once per ``log_interval_seconds``, with counts, so a
  flood does not become a flood of log lines.

Every call pays for this, so it is kept cheap (docs/performance.md): the
deadlines of all waits share one timer (``MessageDeadlines``) instead of an
``asyncio.timeout`` each, and the stream conversion reads a unary request
directly. Measured on a bare grpc.aio server answering a constant GetUser
(docs/performance.md, "Third pass"): 18 us of CPU a call with a timer per
wait and the iterator, 2 to 3 us like this.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
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

# grpc.aio's end-of-stream marker (context.read() at the end of the
# requests); the type stubs do not name it.
_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]
# uvloop's timers fire on a millisecond clock: a wait this close to its
# deadline when the timer fires counts as due, or the timer would be armed
# again and again within the same millisecond.
_CLOCK_RESOLUTION: Final = 0.001

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


class MessageDeadlines:
    """Bounds each wait for a request message to ``timeout_seconds``.

    Every wait gets the same timeout, so deadlines grow in the order the
    waits begin: one insertion-ordered dict of waiting tasks is also a queue
    by deadline, and one loop timer, armed for the oldest wait, serves them
    all. A wait costs a dict insertion and removal; a timer each
    (``asyncio.timeout``: an object, a loop timer armed and cancelled) cost
    a call about 14 us of CPU on the server. Expiry works as in
    ``asyncio.timeout``: the waiting task is cancelled, and the wait turns
    that cancellation, and only that one, into TimeoutError. Runs on the
    event loop.
    """

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        # The tasks waiting now, with their deadlines (loop time), oldest first.
        self._waiting: dict[asyncio.Task[Any], float] = {}
        # Tasks the timer cancelled, until their wait sees it.
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        """How many waits are in progress."""
        return len(self._waiting)

    async def wait(self, message: Awaitable[Any]) -> Any:
        """What ``message`` gives, if it comes within the timeout. Raises
        TimeoutError when it does not, and whatever ``message`` raises."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("MessageDeadlines.wait runs inside a task")
        loop = asyncio.get_running_loop()
        cancelling = task.cancelling()
        # Popped in `finally` before any later wait of the task: a key added
        # again goes to the end, where its deadline belongs.
        self._waiting[task] = loop.time() + self.timeout_seconds
        if self._timer is None or self._timer_loop is not loop:
            self._arm(loop)
        try:
            return await message
        except asyncio.CancelledError:
            if self._claim(task, cancelling):
                raise TimeoutError from None
            raise
        finally:
            self._waiting.pop(task, None)
            if task in self._expired:
                # Expired as the message arrived: the cancellation is ours
                # to take back all the same.
                self._claim(task, cancelling)

    def _claim(self, task: asyncio.Task[Any], cancelling: int) -> bool:
        # Whether the timer ended this wait and nothing else has cancelled
        # the task since (then the caller's cancellation wins).
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() <= cancelling

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer_loop = loop
        deadline = next(iter(self._waiting.values()))
        self._timer = loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        self.expire_due(loop.time())
        if self._waiting:
            self._arm(loop)

    def expire_due(self, now: float) -> None:
        """End every wait whose deadline is ``now`` (loop time) or earlier:
        its task is cancelled, which its wait turns into TimeoutError. The
        timer calls this; so may a test. Raises nothing."""
        due = now + _CLOCK_RESOLUTION
        ended: list[asyncio.Task[Any]] = []
        for task, deadline in self._waiting.items():
            if deadline > due:
                break
            ended.append(task)
        for task in ended:
            del self._waiting[task]
            self._expired.add(task)
            task.cancel()

    def close(self) -> None:
        """Stop the timer (at server stop). Raises nothing."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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
        self._deadlines = MessageDeadlines(message_timeout_seconds)
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

    async def _next(self, message: Awaitable[Any], context: Context) -> Any:
        """What ``message`` (the next request message) gives; raises what
        it raises (StopAsyncIteration at the end of a stream), AbortError
        when it does not arrive in time."""
        try:
            return await self._deadlines.wait(message)
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
                message = await self._next(anext(requests), context)
            except StopAsyncIteration:
                return
            yield decode(message)

    async def _admit(self, lane: Lane, context: Context) -> None:
        if not lane.try_enter():
            await self._refuse(context, lane.name, self._full[lane.name])

    def wrap(self, handler: Handler, method: str) -> Handler:
        lane = self.lane_for(method, handler)
        nxt, rest, admit = self._next, self._rest, self._admit
        wait, refuse, late = self._deadlines.wait, self._refuse, self._late
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
            self.waiting += 1
            if not streaming_request:
                try:
                    first = await wait(context.read())
                except TimeoutError:
                    await refuse(context, REQUEST_TIMEOUT, late)
                finally:
                    self.waiting -= 1
                if first is _EOF:
                    await context.abort(missing.code, missing.details, missing.trailing_metadata)
                await admit(lane, context)
                return decode(first)
            iterator = aiter(requests)
            try:
                first = await nxt(anext(iterator), context)
            except StopAsyncIteration:
                await admit(lane, context)
                return _empty()
            finally:
                self.waiting -= 1
            await admit(lane, context)
            return rest(first, iterator, context, decode)

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
        """Stop the pending log flush and the deadline timer (at server
        stop). Raises nothing."""
        self._log.close()
        self._deadlines.close()


def _same(message: Any) -> Any:
    return message


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator
