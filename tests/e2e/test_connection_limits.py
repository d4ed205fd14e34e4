"""Connection-level limits of a real server, tried as an attacker would: calls
whose request body never arrives, floods of long-lived streams and of
reflection, oversized headers. Other callers, on other connections, must
keep being served, and every refusal must show in the metrics and the log
(a few lines, not one per call)."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    World,
    auth_service_pb2,
    decode_failure,
    fails,
    user_service_pb2,
)

STALLED_PER_METHOD = 500  # Login and GetJwks: 1,000 stalled calls
WATCH_STREAMS = 1000
OPEN_STREAMS = 100
CALLS_AT_ONCE = 50
PROBES = 50
ADMISSION_LOGGER = "usersvc.admission"


def refused(metrics: Any, reason: str) -> float:
    value = metrics.registry.get_sample_value("usersvc_calls_refused_total", {"reason": reason})
    return 0.0 if value is None else float(value)


def admission_of(running: RunningServer) -> Any:
    # The pipeline is the only grpc interceptor; admission is its outermost.
    (pipeline,) = running.container.serving.interceptors
    return pipeline.interceptors[0]


async def until(condition: Callable[[], bool], within_seconds: float = 30.0) -> None:
    """Wait for a condition on server state that no event announces."""
    deadline = time.monotonic() + within_seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def separate_channel(address: str) -> grpc.aio.Channel:
    # grpc shares one connection among channels to the same target unless
    # told otherwise: the attacker must have a connection of its own.
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


async def never_sends(until_set: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """A request stream that sends nothing, until ``until_set`` is set (a
    finished call's client keeps reading its iterator: it must end)."""
    await (until_set or asyncio.Event()).wait()
    return
    yield b""  # pragma: no cover - makes this an async generator


async def outcome(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def first_status(stream: Any) -> Any:
    """The first message of a Watch stream, or the code it ended with."""
    try:
        async for message in stream:
            return message.status
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return None


@pytest_asyncio.fixture(loop_scope="session")
async def metrics() -> Any:
    from usersvc.observability.metrics import Metrics

    return Metrics.create()


@pytest_asyncio.fixture(loop_scope="session")
async def guarded(
    e2e_settings: Any, recorder: ResponseRecorder, metrics: Any
) -> AsyncIterator[RunningServer]:
    """A server with a small call cap, so that stalled calls taking its
    slots would show at once, and room on one connection for the flood."""
    settings = dataclasses.replace(
        e2e_settings,
        max_concurrent_rpcs=CALLS_AT_ONCE,
        max_open_streams=OPEN_STREAMS,
        max_reflection_streams=2,
        max_streams_per_connection=4 * (2 * STALLED_PER_METHOD + WATCH_STREAMS),
        request_message_timeout_seconds=120.0,
    )
    async with running_server(settings, recorder, metrics=metrics) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def guarded_world(guarded: RunningServer, recorder: ResponseRecorder, clean_db: Any) -> World:
    return await World(
        user_service=guarded.container.user_service, channel=guarded.channel, recorder=recorder
    ).populate()


async def test_a_thousand_stalled_calls_and_watch_streams_on_one_connection_starve_no_one(
    guarded: RunningServer,
    guarded_world: World,
    metrics: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission = admission_of(guarded)
    alice = Caller(guarded.channel, guarded_world.alice.token, "alice")
    health = health_pb2_grpc.HealthStub(guarded.channel)
    watch_refusals_before = refused(metrics, "streams")
    attacker = separate_channel(guarded.address)
    raw = {"request_serializer": bytes, "response_deserializer": bytes}
    stalled: list[Any] = []
    watches: list[Any] = []
    try:
        for method in ("/usersvc.v1.AuthService/Login", "/usersvc.v1.AuthService/GetJwks"):
            open_call = attacker.stream_unary(method, **raw)
            stalled += [open_call(never_sends()) for _ in range(STALLED_PER_METHOD)]
        await until(lambda: admission.waiting == 2 * STALLED_PER_METHOD)
        watch = health_pb2_grpc.HealthStub(attacker).Watch
        watches = [watch(health_pb2.HealthCheckRequest()) for _ in range(WATCH_STREAMS)]
        firsts = Counter(await asyncio.gather(*(first_status(w) for w in watches)))

        check_ms: list[float] = []
        get_ms: list[float] = []
        codes: Counter[str] = Counter()
        for _ in range(PROBES):
            started = time.perf_counter()
            code = await outcome(health.Check(health_pb2.HealthCheckRequest(), timeout=5))
            check_ms.append((time.perf_counter() - started) * 1000)
            codes[f"Check {code.name}"] += 1
            started = time.perf_counter()
            code = await outcome(
                alice.users.GetUser(user_service_pb2.GetUserRequest(id="me"), timeout=5)
            )
            get_ms.append((time.perf_counter() - started) * 1000)
            codes[f"GetUser {code.name}"] += 1
        still_waiting = admission.waiting
    finally:
        for call in stalled + watches:
            call.cancel()
        await attacker.close()

    print(
        f"\nwith {len(stalled)} stalled calls and {WATCH_STREAMS} Watch streams on another"
        f" connection: health Check p50 {statistics.median(check_ms):.1f} ms max"
        f" {max(check_ms):.1f} ms; GetUser p50 {statistics.median(get_ms):.1f} ms max"
        f" {max(get_ms):.1f} ms ({PROBES} each)"
    )
    assert codes == {"Check OK": PROBES, "GetUser OK": PROBES}
    assert still_waiting == 2 * STALLED_PER_METHOD
    assert firsts == {
        health_pb2.HealthCheckResponse.SERVING: OPEN_STREAMS,
        grpc.StatusCode.RESOURCE_EXHAUSTED: WATCH_STREAMS - OPEN_STREAMS,
    }
    assert refused(metrics, "streams") - watch_refusals_before == WATCH_STREAMS - OPEN_STREAMS
    lines = [r for r in caplog.records if r.name == ADMISSION_LOGGER]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]
    assert "streams" in lines[0].getMessage()
    # A generous bound: the point is that they answer at all, not RESOURCE_EXHAUSTED.
    assert max(check_ms) < 1000
    assert max(get_ms) < 1000


async def test_a_refused_stream_carries_the_overloaded_reason_and_a_retry_delay(
    guarded: RunningServer,
) -> None:
    watch = health_pb2_grpc.HealthStub(guarded.channel).Watch
    held = [watch(health_pb2.HealthCheckRequest()) for _ in range(OPEN_STREAMS)]
    try:
        assert {await first_status(w) for w in held} == {health_pb2.HealthCheckResponse.SERVING}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in watch(health_pb2.HealthCheckRequest()):
                pass
    finally:
        for stream in held:
            stream.cancel()
    failure = decode_failure(info.value)

    assert failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure.reason == "OVERLOADED"
    assert len(failure.retry_infos) == 1


async def test_a_third_reflection_stream_is_refused_while_two_are_open(
    guarded: RunningServer, metrics: Any
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    held = [stub.ServerReflectionInfo() for _ in range(2)]
    before = refused(metrics, "reflection")
    try:
        for stream in held:
            await stream.write(ask)
            answer = await stream.read()
            assert answer.list_services_response.service
        third = stub.ServerReflectionInfo()
        await third.write(ask)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await third.read()
    finally:
        for stream in held:
            stream.cancel()

    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused(metrics, "reflection") - before == 1


async def test_reflection_answers_again_once_a_stream_closes(guarded: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    for _ in range(5):
        stream = stub.ServerReflectionInfo()
        await stream.write(ask)
        answer = await stream.read()
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK

        assert answer.list_services_response.service


# -- request message deadline ----------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def impatient(
    e2e_settings: Any, recorder: ResponseRecorder, metrics: Any
) -> AsyncIterator[RunningServer]:
    settings = dataclasses.replace(e2e_settings, request_message_timeout_seconds=0.3)
    async with running_server(settings, recorder, metrics=metrics) as running:
        yield running


async def test_a_call_whose_body_never_arrives_ends_with_deadline_exceeded(
    impatient: RunningServer, metrics: Any
) -> None:
    before = refused(metrics, "request_timeout")
    login = impatient.channel.stream_unary(
        "/usersvc.v1.AuthService/Login", request_serializer=bytes, response_deserializer=bytes
    )

    done = asyncio.Event()
    try:
        failure = await fails(login(never_sends(done), timeout=30))
    finally:
        done.set()

    assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failure.reason == "DEADLINE_EXCEEDED"
    assert "request message not received" in failure.details
    assert refused(metrics, "request_timeout") - before == 1
    assert admission_of(impatient).waiting == 0


async def test_an_import_stream_that_stops_sending_is_ended(
    impatient: RunningServer, recorder: ResponseRecorder, clean_db: Any
) -> None:
    world = await World(
        user_service=impatient.container.user_service, channel=impatient.channel, recorder=recorder
    ).populate()
    admin = Caller(impatient.channel, world.admin.token, "admin")

    done = asyncio.Event()

    async def one_then_silence() -> AsyncIterator[Any]:
        yield user_service_pb2.ImportUsersRequest()
        await done.wait()

    try:
        failure = await fails(admin.users.ImportUsers(one_then_silence(), timeout=30))
    finally:
        done.set()

    assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "request message not received" in failure.details


async def test_calls_whose_body_arrives_are_served_as_before(impatient: RunningServer) -> None:
    anonymous = Caller(impatient.channel, None)

    reply = await anonymous.auth.GetJwks(auth_service_pb2.GetJwksRequest())

    assert reply.jwks_json


# -- headers -------------------------------------------------------------------------------


async def test_headers_over_eight_kibibytes_are_always_refused(guarded: RunningServer) -> None:
    anonymous = Caller(guarded.channel, None)
    padding = (("x-padding", "p" * 9000),)

    codes = Counter(
        [
            await outcome(
                anonymous.auth.GetJwks(auth_service_pb2.GetJwksRequest(), metadata=padding)
            )
            for _ in range(40)
        ]
    )

    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED: 40}


async def test_headers_well_under_the_limit_are_accepted(guarded: RunningServer) -> None:
    anonymous = Caller(guarded.channel, None)
    padding = (("x-padding", "p" * 6000),)

    codes = Counter(
        [
            await outcome(
                anonymous.auth.GetJwks(auth_service_pb2.GetJwksRequest(), metadata=padding)
            )
            for _ in range(10)
        ]
    )

    assert codes == {grpc.StatusCode.OK: 10}


# -- connections ---------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def narrow(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    settings = dataclasses.replace(
        e2e_settings, max_streams_per_connection=10, request_message_timeout_seconds=120.0
    )
    async with running_server(settings, recorder) as running:
        yield running


async def test_one_connection_gets_no_more_than_its_streams_at_once(
    narrow: RunningServer,
) -> None:
    admission = admission_of(narrow)
    attacker = separate_channel(narrow.address)
    stall = attacker.stream_unary(
        "/usersvc.v1.AuthService/GetJwks", request_serializer=bytes, response_deserializer=bytes
    )
    stalled = [stall(never_sends()) for _ in range(10)]
    try:
        await until(lambda: admission.waiting == 10)
        # The eleventh call on that connection waits in the client.
        queued = await outcome(
            Caller(attacker, None).auth.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=0.5)
        )
        waiting_then = admission.waiting
        # Another connection is not affected.
        other = await outcome(
            Caller(narrow.channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=5)
        )
    finally:
        for call in stalled:
            call.cancel()
        await attacker.close()

    assert queued == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waiting_then == 10
    assert other == grpc.StatusCode.OK


@pytest_asyncio.fixture(loop_scope="session")
async def short_idle(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    settings = dataclasses.replace(e2e_settings, max_connection_idle_seconds=0.3)
    async with running_server(settings, recorder) as running:
        yield running


async def test_an_idle_connection_is_closed_by_the_server(short_idle: RunningServer) -> None:
    channel = separate_channel(short_idle.address)
    try:
        await Caller(channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest())
        assert channel.get_state() == grpc.ChannelConnectivity.READY

        await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 10)

        assert channel.get_state() != grpc.ChannelConnectivity.READY
    finally:
        await channel.close()
