"""What every gRPC client and operator tool relies on: health, reflection,
request ids, and sane statuses for unknown methods and bad bytes."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from usersvc.server import HEALTH_SERVICES

from .conftest import RunningServer
from .helpers import (
    CALL_TIMEOUT_SECONDS,
    Caller,
    World,
    auth_service_pb2,
    create_request,
    expect_invalid,
    fails,
    user_service_pb2,
)

USER_SERVICE = "usersvc.v1.UserService"
AUTH_SERVICE = "usersvc.v1.AuthService"
EVENT_SERVICE = "usersvc.v1.EventService"


def metadata_value(pairs: object, key: str) -> str | None:
    for name, value in pairs or ():  # type: ignore[attr-defined]
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return None


async def reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT_SECONDS)
    responses = [response async for response in call]
    assert len(responses) == 1
    return responses[0]


async def raw_call_code(channel: grpc.aio.Channel, path: str) -> grpc.StatusCode:
    """The status of a call of ``path`` with an empty body and no credentials."""
    try:
        await channel.unary_unary(path)(b"", timeout=CALL_TIMEOUT_SECONDS)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ----------------------------------------------------------------- health


@pytest.mark.parametrize("service", ["", USER_SERVICE, AUTH_SERVICE, EVENT_SERVICE])
async def test_health_reports_serving_without_credentials(
    primary: RunningServer, service: str
) -> None:
    stub = health_pb2_grpc.HealthStub(primary.channel)

    reply = await stub.Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_SECONDS
    )

    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_reports_exactly_the_services_the_server_registers(
    primary: RunningServer,
) -> None:
    listed = await reflect(
        primary.channel, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    # Without gRPC's own (health, reflection).
    registered = {
        s.name for s in listed.list_services_response.service if not s.name.startswith("grpc.")
    }
    stub = health_pb2_grpc.HealthStub(primary.channel)

    for name in registered:
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT_SECONDS
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        # Listed is not served: a service without handlers answers UNIMPLEMENTED.
        method = descriptor_pool.Default().FindServiceByName(name).methods[0].name
        code = await raw_call_code(primary.channel, f"/{name}/{method}")
        assert code != grpc.StatusCode.UNIMPLEMENTED, name
    assert registered == {USER_SERVICE, AUTH_SERVICE, EVENT_SERVICE}
    assert set(HEALTH_SERVICES) == {"", *registered}


async def test_health_of_an_unknown_service_is_not_found(primary: RunningServer) -> None:
    stub = health_pb2_grpc.HealthStub(primary.channel)

    failure = await fails(
        stub.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nothing"), timeout=5)
    )

    assert failure.code == grpc.StatusCode.NOT_FOUND


# ----------------------------------------------------------------- reflection


async def test_reflection_lists_both_services_without_credentials(primary: RunningServer) -> None:
    response = await reflect(
        primary.channel, reflection_pb2.ServerReflectionRequest(list_services="")
    )

    names = {s.name for s in response.list_services_response.service}
    assert {USER_SERVICE, AUTH_SERVICE} <= names


async def test_reflection_describes_the_user_service_and_its_methods(
    primary: RunningServer,
) -> None:
    response = await reflect(
        primary.channel,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=USER_SERVICE),
    )

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in response.file_descriptor_response.file_descriptor_proto
    ]
    services = {s.name: s for f in files if f.package == "usersvc.v1" for s in f.service}
    methods = {m.name for m in services["UserService"].method}
    assert {"CreateUser", "ListUsers", "BatchGetUsers"} <= methods


# ----------------------------------------------------------------- request ids


async def test_x_request_id_is_echoed_in_the_response_trailers(anonymous: Caller) -> None:
    call = anonymous.auth.GetJwks(
        auth_service_pb2.GetJwksRequest(), metadata=(("x-request-id", "e2e-req-42"),)
    )
    await call

    assert metadata_value(await call.trailing_metadata(), "x-request-id") == "e2e-req-42"
    assert metadata_value(await call.initial_metadata(), "x-request-id") is None


async def test_a_request_id_is_generated_when_absent(anonymous: Caller) -> None:
    first = anonymous.auth.GetJwks(auth_service_pb2.GetJwksRequest())
    second = anonymous.auth.GetJwks(auth_service_pb2.GetJwksRequest())
    await first
    await second

    one = metadata_value(await first.trailing_metadata(), "x-request-id")
    two = metadata_value(await second.trailing_metadata(), "x-request-id")
    assert one
    assert two
    assert one != two


async def test_x_request_id_is_echoed_on_a_failing_call(anonymous: Caller) -> None:
    failure = await fails(
        anonymous.users.GetUser(
            user_service_pb2.GetUserRequest(id="me"), metadata=(("x-request-id", "e2e-fail-7"),)
        )
    )

    assert metadata_value(failure.trailing_metadata, "x-request-id") == "e2e-fail-7"
    assert failure.reason == "TOKEN_INVALID"


# ----------------------------------------------------------------- transport-level errors


@pytest.mark.parametrize(
    "method", ["/usersvc.v1.UserService/NoSuchMethod", "/nope.v1.Nothing/Call"]
)
async def test_unknown_method_is_unimplemented(primary: RunningServer, method: str) -> None:
    call = primary.channel.unary_unary(method)(b"", timeout=CALL_TIMEOUT_SECONDS)

    failure = await fails(call)

    assert failure.code == grpc.StatusCode.UNIMPLEMENTED


async def test_unknown_method_with_credentials_is_unimplemented(world: World) -> None:
    call = world.channel.unary_unary("/usersvc.v1.UserService/NoSuchMethod")(
        b"", metadata=(("authorization", f"Bearer {world.admin.token}"),), timeout=10
    )

    failure = await fails(call)

    assert failure.code == grpc.StatusCode.UNIMPLEMENTED


async def test_request_over_one_mebibyte_is_resource_exhausted(world: World) -> None:
    request = create_request(world.recorder, display_name="x" * (1024 * 1024 + 10))

    failure = await fails(world.anonymous.users.CreateUser(request))

    assert failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_undecodable_bytes_are_invalid_argument_for_a_public_method(
    primary: RunningServer,
) -> None:
    call = primary.channel.unary_unary("/usersvc.v1.AuthService/Login")(
        b"\x0a\xff\xff\xff", timeout=CALL_TIMEOUT_SECONDS
    )

    await expect_invalid(call)


async def test_undecodable_bytes_are_invalid_argument_for_an_authenticated_call(
    world: World,
) -> None:
    call = world.channel.unary_unary("/usersvc.v1.UserService/GetUser")(
        b"\x0a\xff\xff\xff",
        metadata=(("authorization", f"Bearer {world.admin.token}"),),
        timeout=CALL_TIMEOUT_SECONDS,
    )

    await expect_invalid(call)
