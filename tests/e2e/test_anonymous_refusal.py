"""Every method the server offers refuses an anonymous call, except the
public ones listed here.

The methods come from the server itself (reflection lists its services, the
descriptors their methods), so a method added later is covered without
touching this test, and it fails closed: a new method that is public by
mistake shows up as a difference from the list below."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2  # noqa: F401 - registers the Health descriptors
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from .conftest import RunningServer
from .helpers import CALL_TIMEOUT_SECONDS, decode_failure

# Anyone may call these: signing in, the key set, refreshing with the refresh
# token as the credential, resetting a password with the code as the
# credential, self sign-up (when enabled), health and reflection.
ALWAYS_PUBLIC = frozenset(
    {
        "/usersvc.v1.AuthService/Login",
        "/usersvc.v1.AuthService/GetJwks",
        "/usersvc.v1.AuthService/RefreshToken",
        "/usersvc.v1.UserService/ResetPassword",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/List",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }
)
SIGNUP = "/usersvc.v1.UserService/CreateUser"


async def offered_methods(channel: grpc.aio.Channel) -> list[MethodDescriptor]:
    """Every method of every service the server lists through reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def one_request() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    async for response in stub.ServerReflectionInfo(one_request()):
        names += [service.name for service in response.list_services_response.service]
    pool = descriptor_pool.Default()
    return [method for name in names for method in pool.FindServiceByName(name).methods]


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def call_with_empty_request(channel: grpc.aio.Channel, method: MethodDescriptor) -> Any:
    """Call ``method`` with an empty request (one, for a request stream) and
    whatever credentials ``channel`` carries (none, in this module); returns
    the AioRpcError it fails with, or None when it answered (for a response
    stream: its first message)."""
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    codec: dict[str, Any] = {
        "request_serializer": request_type.SerializeToString,
        "response_deserializer": response_type.FromString,
    }
    path = path_of(method)
    timeout = CALL_TIMEOUT_SECONDS

    async def requests() -> AsyncIterator[Any]:
        yield request_type()

    call: Any
    if method.client_streaming and method.server_streaming:
        call = channel.stream_stream(path, **codec)(requests(), timeout=timeout)
    elif method.client_streaming:
        call = channel.stream_unary(path, **codec)(requests(), timeout=timeout)
    elif method.server_streaming:
        call = channel.unary_stream(path, **codec)(request_type(), timeout=timeout)
    else:
        call = channel.unary_unary(path, **codec)(request_type(), timeout=timeout)
    try:
        if method.server_streaming:
            await call.read()
            call.cancel()  # Watch never ends by itself
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


def refused_as_anonymous(error: grpc.aio.AioRpcError | None) -> bool:
    if error is None or error.code() != grpc.StatusCode.UNAUTHENTICATED:
        return False
    return [info.reason for info in decode_failure(error).error_infos] == ["TOKEN_INVALID"]


async def methods_open_to_anonymous(server: RunningServer) -> tuple[set[str], set[str]]:
    """(methods that answered an anonymous call, every method walked)."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        methods = await offered_methods(channel)
        open_methods = set()
        for method in methods:
            error = await call_with_empty_request(channel, method)
            if not refused_as_anonymous(error):
                assert error is None or error.code() != grpc.StatusCode.INTERNAL, path_of(method)
                open_methods.add(path_of(method))
    return open_methods, {path_of(method) for method in methods}


async def test_the_walk_covers_every_method_of_both_usersvc_services(
    primary: RunningServer,
) -> None:
    from usersvc_protos.v1 import auth_service_pb2, user_service_pb2

    _, walked = await methods_open_to_anonymous(primary)
    for module, name in ((user_service_pb2, "UserService"), (auth_service_pb2, "AuthService")):
        service = module.DESCRIPTOR.services_by_name[name]
        assert {path_of(m) for m in service.methods} <= walked


async def test_only_the_public_methods_answer_an_anonymous_call(primary: RunningServer) -> None:
    open_methods, walked = await methods_open_to_anonymous(primary)
    expected = (ALWAYS_PUBLIC | {SIGNUP}) & walked
    assert open_methods == expected


async def test_with_sign_up_closed_creating_a_user_needs_credentials_too(
    signup_closed: RunningServer,
) -> None:
    open_methods, walked = await methods_open_to_anonymous(signup_closed)
    assert SIGNUP in walked
    assert open_methods == ALWAYS_PUBLIC & walked


@pytest.mark.parametrize("path", sorted(ALWAYS_PUBLIC - {SIGNUP}))
def test_every_listed_public_method_exists(path: str) -> None:
    service, _, method = path.strip("/").partition("/")
    found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    assert found is not None
