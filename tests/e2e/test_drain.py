"""The stop sequence of a real server, step by step: NOT_SERVING for every
service at once, new calls still served during the drain, health Watch
streams finished when the stop begins (not held until the grace period
cancels them), new calls refused after it.

The whole sequence under load, with real processes and clients that
balance over two replicas, is tests/drills/test_rolling_restart.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import RunningServer
from .helpers import auth_service_pb2, auth_service_pb2_grpc

SERVICES = ("", "usersvc.v1.UserService", "usersvc.v1.AuthService")
# Long enough that the tests end it themselves (``hurry``) and never wait it out.
LONG_DRAIN_SECONDS = 120.0
GRACE_SECONDS = 2.0
LIMIT_SECONDS = 30.0


async def statuses(channel: grpc.aio.Channel) -> dict[str, int]:
    health = health_pb2_grpc.HealthStub(channel)
    result = {}
    for service in SERVICES:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        result[service] = reply.status
    return result


async def until_not_serving(channel: grpc.aio.Channel) -> dict[str, int]:
    async with asyncio.timeout(LIMIT_SECONDS):
        while True:
            seen = await statuses(channel)
            if set(seen.values()) == {health_pb2.HealthCheckResponse.NOT_SERVING}:
                return seen
            await asyncio.sleep(0.01)  # polled, bounded by the timeout


@pytest.fixture
async def stopping(
    replica: RunningServer,
) -> AsyncIterator[tuple[asyncio.Task[None], asyncio.Event]]:
    """The replica's stop, begun with a long drain; set the event to end
    the drain."""
    hurry = asyncio.Event()
    stop = asyncio.create_task(
        replica.server.stop(GRACE_SECONDS, drain=LONG_DRAIN_SECONDS, hurry=hurry)
    )
    try:
        yield stop, hurry
    finally:
        hurry.set()
        await stop


async def test_every_service_reports_not_serving_as_soon_as_the_stop_begins(
    replica: RunningServer, stopping: tuple[asyncio.Task[None], asyncio.Event]
) -> None:
    stop, _ = stopping
    await until_not_serving(replica.channel)
    assert not stop.done()


async def test_new_calls_on_new_connections_are_served_during_the_drain(
    replica: RunningServer, stopping: tuple[asyncio.Task[None], asyncio.Event]
) -> None:
    await until_not_serving(replica.channel)
    async with grpc.aio.insecure_channel(replica.address) as fresh:
        reply = await auth_service_pb2_grpc.AuthServiceStub(fresh).GetJwks(
            auth_service_pb2.GetJwksRequest(), timeout=5
        )
    assert reply.jwks_json


async def test_after_the_drain_new_calls_are_refused_with_unavailable(
    replica: RunningServer, stopping: tuple[asyncio.Task[None], asyncio.Event]
) -> None:
    stop, hurry = stopping
    await until_not_serving(replica.channel)
    hurry.set()
    await asyncio.wait_for(stop, LIMIT_SECONDS)
    async with grpc.aio.insecure_channel(replica.address) as fresh:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth_service_pb2_grpc.AuthServiceStub(fresh).GetJwks(
                auth_service_pb2.GetJwksRequest(), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_watch_stream_sees_not_serving_then_ends_ok_when_the_stop_begins(
    replica: RunningServer,
) -> None:
    watch = health_pb2_grpc.HealthStub(replica.channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=LIMIT_SECONDS
    )
    seen = [(await watch.read()).status]
    hurry = asyncio.Event()
    stop = asyncio.create_task(
        replica.server.stop(GRACE_SECONDS, drain=LONG_DRAIN_SECONDS, hurry=hurry)
    )
    try:
        seen.append((await watch.read()).status)
        hurry.set()
        # grpc_health's own servicer never ends a Watch: the stop would wait
        # out the grace period and then cancel it (CANCELLED).
        assert await watch.read() is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
    finally:
        hurry.set()
        await stop
    assert seen == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]


async def test_a_second_signal_during_the_drain_ends_it(
    replica: RunningServer,
) -> None:
    """``hurry`` is what serve's second SIGTERM/SIGINT sets."""
    hurry = asyncio.Event()
    stop = asyncio.create_task(
        replica.server.stop(GRACE_SECONDS, drain=LONG_DRAIN_SECONDS, hurry=hurry)
    )
    await until_not_serving(replica.channel)
    hurry.set()
    await asyncio.wait_for(stop, LIMIT_SECONDS)
