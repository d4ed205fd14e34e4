"""DatabaseGateInterceptor behind ErrorMappingInterceptor, on a real
grpc.aio server on 127.0.0.1:0, with a switch standing in for the database
monitor's breaker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.api.auth_servicer import AuthServicer
from usersvc.api.interceptors import DatabaseGateInterceptor, ErrorMappingInterceptor
from usersvc.api.interceptors.database_gate import needs_database
from usersvc.api.user_servicer import UserServicer
from usersvc.domain.errors import DatabaseUnavailable
from usersvc.domain.models import ANONYMOUS

from .support import FakeAuthService, FakeUserService, only_error_info


class Breaker:
    def __init__(self) -> None:
        self.down = False

    def ensure_available(self) -> None:
        if self.down:
            raise DatabaseUnavailable()


@dataclass
class Gated:
    breaker: Breaker
    users: FakeUserService
    channel: grpc.aio.Channel


@pytest_asyncio.fixture
async def gated() -> AsyncIterator[Gated]:
    breaker, users = Breaker(), FakeUserService()
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), DatabaseGateInterceptor(breaker.ensure_available)]
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(users), server)
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(FakeAuthService()), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Gated(breaker, users, channel)
    await server.stop(None)


def _create(channel: grpc.aio.Channel) -> object:
    return user_service_pb2_grpc.UserServiceStub(channel).CreateUser(
        user_service_pb2.CreateUserRequest(email="a@example.com", password="x"), timeout=5
    )


async def test_a_call_that_needs_the_database_is_refused_while_it_is_down(gated: Gated) -> None:
    gated.breaker.down = True

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _create(gated.channel)

    status = rpc_status.from_call(raised.value)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert status is not None
    assert only_error_info(status).reason == "DATABASE_UNAVAILABLE"


async def test_a_refused_call_never_reaches_the_service(gated: Gated) -> None:
    gated.breaker.down = True

    with pytest.raises(grpc.aio.AioRpcError):
        await _create(gated.channel)

    assert gated.users.calls == []


async def test_calls_pass_while_the_database_is_up(gated: Gated) -> None:
    await _create(gated.channel)

    assert [call.method for call in gated.users.calls] == ["create_user"]
    assert gated.users.calls[0].principal == ANONYMOUS


async def test_the_public_keys_are_served_while_the_database_is_down(gated: Gated) -> None:
    gated.breaker.down = True

    response = await auth_service_pb2_grpc.AuthServiceStub(gated.channel).GetJwks(
        auth_service_pb2.GetJwksRequest(), timeout=5
    )

    assert response.jwks_json


async def test_health_answers_while_the_database_is_down(gated: Gated) -> None:
    gated.breaker.down = True

    reply = await health_pb2_grpc.HealthStub(gated.channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )

    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("method", "gated_method"),
    [
        ("/usersvc.v1.UserService/CreateUser", True),
        ("/usersvc.v1.UserService/BatchCreateUsers", True),
        ("/usersvc.v1.AuthService/Login", True),
        ("/usersvc.v1.AuthService/IntrospectToken", True),
        ("/usersvc.v1.AuthService/GetJwks", False),
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
    ],
)
def test_which_methods_need_the_database(method: str, gated_method: bool) -> None:
    assert needs_database(method) is gated_method
