"""DeadlineInterceptor behind ErrorMappingInterceptor, on a real grpc.aio
server on 127.0.0.1:0 whose LookupUser handler does whatever the test
scripts (the database work it stands for is tested end to end in
tests/e2e/test_deadlines.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_status import rpc_status

from usersvc_protos.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from usersvc.api.interceptors import DeadlineInterceptor, ErrorMappingInterceptor

from .support import only_error_info

REQUEST = user_service_pb2.LookupUserRequest(email="a@example.com")


@dataclass
class ScriptedServicer(user_service_pb2_grpc.UserServiceServicer):
    """LookupUser runs ``work``; records whether it started and how it ended."""

    work: Callable[[], Awaitable[None]] | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def LookupUser(self, request: Any, context: Any) -> user_service_pb2.LookupUserResponse:
        self.started.set()
        try:
            if self.work is not None:
                await self.work()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return user_service_pb2.LookupUserResponse(user=user_pb2.User(id="u1"))


@dataclass
class Served:
    servicer: ScriptedServicer
    stub: user_service_pb2_grpc.UserServiceStub


async def _serve(margin_seconds: float) -> tuple[grpc.aio.Server, int, ScriptedServicer]:
    servicer = ScriptedServicer()
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), DeadlineInterceptor(margin_seconds=margin_seconds)]
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, servicer


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    server, port, servicer = await _serve(margin_seconds=0.1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Served(servicer, user_service_pb2_grpc.UserServiceStub(channel))
    await server.stop(None)


async def _forever() -> None:
    await asyncio.Event().wait()


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_a_call_still_running_near_its_deadline_gets_deadline_exceeded_with_error_info(
    served: Served,
) -> None:
    served.servicer.work = _forever

    error = await _failure(served.stub.LookupUser(REQUEST, timeout=0.5))

    status = rpc_status.from_call(error)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status is not None
    assert only_error_info(status).reason == "DEADLINE_EXCEEDED"


async def test_the_handler_is_cancelled_before_the_answer_goes_out(served: Served) -> None:
    served.servicer.work = _forever

    await _failure(served.stub.LookupUser(REQUEST, timeout=0.5))

    assert served.servicer.cancelled.is_set()


async def test_a_call_without_a_deadline_runs_to_completion(served: Served) -> None:
    async def takes_a_while() -> None:
        await asyncio.sleep(0.3)  # the work itself, not a wait for something

    served.servicer.work = takes_a_while

    response = await served.stub.LookupUser(REQUEST)

    assert response.user.id == "u1"


async def test_a_call_that_finishes_within_its_deadline_is_answered(served: Served) -> None:
    response = await served.stub.LookupUser(REQUEST, timeout=5)

    assert response.user.id == "u1"


async def test_a_call_arriving_with_less_than_the_margin_left_never_runs() -> None:
    server, port, servicer = await _serve(margin_seconds=5.0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            error = await _failure(stub.LookupUser(REQUEST, timeout=2))
    finally:
        await server.stop(None)

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not servicer.started.is_set()


async def test_a_timeout_raised_by_the_handler_itself_is_not_called_a_deadline(
    served: Served,
) -> None:
    async def driver_timeout() -> None:
        raise TimeoutError

    served.servicer.work = driver_timeout

    error = await _failure(served.stub.LookupUser(REQUEST, timeout=5))

    assert error.code() == grpc.StatusCode.INTERNAL
