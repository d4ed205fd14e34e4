"""The admission interceptor (usersvc.api.interceptors.admission) driven
directly with fake contexts: lanes by method kind, caps, the deadline per
request message and the rate-limited refusal log. The same behaviour through
real sockets is in tests/e2e/test_connection_limits.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from usersvc.api.interceptors.admission import AdmissionInterceptor, MessageDeadlines, RefusalLog
from usersvc.config import Settings
from usersvc.server import server_options


class Aborted(Exception):
    pass


class FakeContext:
    """What grpc.aio gives a request-streaming handler: the request stream,
    read through ``requests`` (the iterator) or ``read()`` (the reader)."""

    def __init__(self, *messages: Any, stall: bool = False) -> None:
        self.aborted: tuple[Any, str] | None = None
        self.requests = requests(*messages, stall=stall)

    async def read(self) -> Any:
        try:
            return await anext(self.requests)
        except StopAsyncIteration:
            return grpc.aio.EOF  # type: ignore[attr-defined]

    async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


async def requests(*messages: Any, stall: bool = False) -> AsyncIterator[Any]:
    for message in messages:
        yield message
    if stall:
        await asyncio.Event().wait()


async def call(wrapped: Any, context: FakeContext) -> Any:
    """The wrapped handler called as grpc calls it."""
    return await wrapped.stream_unary(context.requests, context)


def admission(**overrides: Any) -> AdmissionInterceptor:
    options: dict[str, Any] = {
        "max_calls": 1,
        "max_streams": 1,
        "max_reflection_streams": 1,
        "message_timeout_seconds": 0.05,
    }
    options.update(overrides)
    return AdmissionInterceptor(**options)


async def test_a_unary_method_is_served_as_a_request_stream_with_its_one_message() -> None:
    async def handler(request: Any, context: Any) -> Any:
        return ("handled", request)

    wrapped = admission().wrap(
        grpc.unary_unary_rpc_method_handler(handler), "/usersvc.v1.UserService/GetUser"
    )

    assert wrapped.request_streaming
    assert not wrapped.response_streaming
    assert await call(wrapped, FakeContext(b"body")) == ("handled", b"body")


async def test_a_body_that_does_not_arrive_in_time_ends_the_call() -> None:
    refusals: list[str] = []
    gate = admission(on_refused=refusals.append)

    async def handler(request: Any, context: Any) -> Any:
        raise AssertionError("must not run")

    wrapped = gate.wrap(grpc.unary_unary_rpc_method_handler(handler), "/x.Y/Z")
    context = FakeContext(stall=True)

    with pytest.raises(Aborted):
        await call(wrapped, context)

    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert refusals == ["request_timeout"]
    assert gate.waiting == 0
    assert gate.lanes["calls"].in_use == 0


async def test_a_call_beyond_its_lane_cap_is_refused_and_the_slot_returns_after() -> None:
    refusals: list[str] = []
    gate = admission(on_refused=refusals.append)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def handler(request: Any, context: Any) -> Any:
        entered.set()
        await release.wait()
        return "done"

    wrapped = gate.wrap(grpc.unary_unary_rpc_method_handler(handler), "/x.Y/Z")
    first = asyncio.create_task(call(wrapped, FakeContext(b"")))
    await entered.wait()
    context = FakeContext(b"")

    with pytest.raises(Aborted):
        await call(wrapped, context)
    release.set()
    assert await first == "done"

    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusals == ["calls"]
    assert gate.lanes["calls"].in_use == 0


async def test_health_check_has_its_own_lane_so_a_full_call_lane_does_not_refuse_it() -> None:
    gate = admission(max_calls=1)
    gate.lanes["calls"].in_use = 1

    async def check(request: Any, context: Any) -> Any:
        return "SERVING"

    wrapped = gate.wrap(grpc.unary_unary_rpc_method_handler(check), "/grpc.health.v1.Health/Check")

    assert await call(wrapped, FakeContext(b"")) == "SERVING"


def test_methods_are_sorted_into_lanes_by_name_and_kind() -> None:
    gate = admission()

    async def unary(request: Any, context: Any) -> Any:
        return None

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        yield None

    unary_handler = grpc.unary_unary_rpc_method_handler(unary)
    stream_handler = grpc.unary_stream_rpc_method_handler(stream)
    bidi = grpc.stream_stream_rpc_method_handler(stream)
    lanes = {
        name: gate.lane_for(method, handler).name
        for name, method, handler in [
            ("get", "/usersvc.v1.UserService/GetUser", unary_handler),
            ("check", "/grpc.health.v1.Health/Check", unary_handler),
            ("watch", "/grpc.health.v1.Health/Watch", stream_handler),
            (
                "reflection",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                bidi,
            ),
        ]
    }

    assert lanes == {
        "get": "calls",
        "check": "health",
        "watch": "streams",
        "reflection": "reflection",
    }


async def test_a_request_stream_that_goes_silent_is_ended_mid_stream() -> None:
    received: list[Any] = []

    async def importer(messages: AsyncIterator[Any], context: Any) -> Any:
        async for message in messages:
            received.append(message)
        return "imported"

    wrapped = admission().wrap(grpc.stream_unary_rpc_method_handler(importer), "/x.Y/Import")
    context = FakeContext(1, 2, stall=True)

    with pytest.raises(Aborted):
        await call(wrapped, context)

    assert received == [1, 2]
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_an_empty_request_stream_is_admitted_and_served() -> None:
    async def importer(messages: AsyncIterator[Any], context: Any) -> Any:
        return [message async for message in messages]

    wrapped = admission().wrap(grpc.stream_unary_rpc_method_handler(importer), "/x.Y/Import")

    assert await call(wrapped, FakeContext()) == []


async def test_a_unary_call_without_any_message_is_invalid_argument() -> None:
    async def handler(request: Any, context: Any) -> Any:
        raise AssertionError("must not run")

    wrapped = admission().wrap(grpc.unary_unary_rpc_method_handler(handler), "/x.Y/Z")
    context = FakeContext()

    with pytest.raises(Aborted):
        await call(wrapped, context)

    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_refusal_log_writes_one_line_then_one_count_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RefusalLog(logging.getLogger("test.refusals"), interval_seconds=60)
    caplog.set_level(logging.WARNING, "test.refusals")
    for _ in range(500):
        log.refused("streams")
    log.refused("calls")
    log._end()  # the interval ends: what it counted is written
    log._end()  # a quiet interval: nothing more
    log.refused("calls")
    log.close()

    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "calls refused: 1 streams",
        "calls refused: 1 calls, 499 streams",
        "calls refused: 1 calls",
    ]


def test_server_options_carry_the_connection_settings() -> None:
    settings = dataclasses.replace(
        Settings(),
        max_connection_idle_seconds=0,
        max_connection_age_seconds=60,
        max_connection_age_grace_seconds=0,
    )

    options = dict(server_options(settings))

    assert options["grpc.max_metadata_size"] == 8192
    assert options["grpc.absolute_max_metadata_size"] == 8192
    assert options["grpc.max_concurrent_streams"] == 1000
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.max_connection_idle_ms"] == 2**31 - 1
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_age_grace_ms"] == 0


def test_the_metrics_know_every_refusal_reason_and_start_them_at_zero() -> None:
    from prometheus_client import CollectorRegistry

    from usersvc.api.interceptors import admission as admission_module
    from usersvc.observability.metrics import REFUSAL_REASONS, Metrics

    metrics = Metrics(CollectorRegistry(), multiprocess=False)

    assert REFUSAL_REASONS == admission_module.REFUSAL_REASONS
    assert all(
        metrics.registry.get_sample_value("usersvc_calls_refused_total", {"reason": reason}) == 0
        for reason in REFUSAL_REASONS
    )


# -- the shared deadline timer ----------------------------------------------------------------


async def test_a_message_that_arrives_in_time_is_returned_and_nothing_stays_waiting() -> None:
    deadlines = MessageDeadlines(10.0)

    assert await deadlines.wait(asyncio.sleep(0, result="message")) == "message"
    assert len(deadlines) == 0
    deadlines.close()


async def test_waits_end_in_the_order_they_began_each_after_its_own_timeout() -> None:
    loop = asyncio.get_running_loop()
    deadlines = MessageDeadlines(0.05)
    ended: dict[str, float] = {}

    async def wait(name: str) -> None:
        started = loop.time()
        with pytest.raises(TimeoutError):
            await deadlines.wait(asyncio.Event().wait())
        ended[name] = loop.time() - started

    first = asyncio.create_task(wait("first"))
    await asyncio.sleep(0.02)  # the second wait begins later than the first
    second = asyncio.create_task(wait("second"))
    await asyncio.gather(first, second)

    assert list(ended) == ["first", "second"]
    # Neither ended before its own timeout (a millisecond of clock resolution).
    assert min(ended.values()) >= 0.05 - 0.002
    assert len(deadlines) == 0


async def test_an_expired_wait_leaves_the_task_free_to_answer() -> None:
    deadlines = MessageDeadlines(0.01)

    with pytest.raises(TimeoutError):
        await deadlines.wait(asyncio.Event().wait())

    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    # The task goes on awaiting (as the admission interceptor does to abort).
    assert await asyncio.sleep(0, result="answered") == "answered"


async def test_a_cancelled_caller_stays_cancelled_not_timed_out() -> None:
    deadlines = MessageDeadlines(10.0)
    started = asyncio.Event()

    async def waiter() -> None:
        started.set()
        await deadlines.wait(asyncio.Event().wait())

    task = asyncio.create_task(waiter())
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0
    deadlines.close()


async def test_a_caller_cancelled_as_its_wait_expires_stays_cancelled() -> None:
    deadlines = MessageDeadlines(0.01)
    outcome: list[str] = []

    async def waiter() -> None:
        try:
            await deadlines.wait(asyncio.Event().wait())
        except TimeoutError:
            outcome.append("timeout")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    # Fire the timer's work by hand, then cancel as the client would, both
    # before the task runs again.
    deadlines.expire_due(asyncio.get_running_loop().time() + 1)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == ["cancelled"]


async def test_each_message_of_a_stream_gets_a_fresh_deadline() -> None:
    deadlines = MessageDeadlines(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()

    # Three messages 30 ms apart: 90 ms in all, each wait well within 50 ms.
    for _ in range(3):
        await deadlines.wait(asyncio.sleep(0.03))

    assert loop.time() - started >= 0.09 - 0.003
    assert len(deadlines) == 0
    deadlines.close()
