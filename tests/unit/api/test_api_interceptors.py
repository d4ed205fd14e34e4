"""The interceptor chain, against a real grpc.aio server on 127.0.0.1:0
running the real servicers with fake services behind them."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.api.interceptors import AccessLogInterceptor, WrappingInterceptor
from usersvc.api.interceptors.request_id import new_request_id
from usersvc.domain import errors
from usersvc.domain.models import ANONYMOUS

from .support import (
    CALLER_ID,
    EXPIRED_TOKEN,
    AsyncFakeAuthService,
    FakeAuthService,
    RunningServer,
    bearer,
    only_error_info,
    start_server,
    unpack_details,
)

GET_USER = "/usersvc.v1.UserService/GetUser"
HEX32 = re.compile(r"[0-9a-f]{32}")


def _request_id_of(metadata: Any) -> str | None:
    return next((value for key, value in metadata or () if key == "x-request-id"), None)


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status in the trailers"
    return only_error_info(status).reason


async def _access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The access lines, once there is one. The server (same event loop)
    writes its line after the status went out, so a client can see the
    response a few loop iterations before the line exists (more on a busy
    machine, where grpc's threads get the CPU late: bounded by time, not by
    a count of iterations)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while loop.time() < deadline:
        lines = [r for r in caplog.records if r.name == "usersvc.access"]
        if lines:
            return lines
        await asyncio.sleep(0)
    return []


# request ids


async def test_the_callers_request_id_is_echoed(served: RunningServer) -> None:
    call = served.user_stub.GetUser(
        user_service_pb2.GetUserRequest(id="me"),
        metadata=(*bearer(), ("x-request-id", "req-42.a:b_c")),
    )
    await call
    assert _request_id_of(await call.trailing_metadata()) == "req-42.a:b_c"


async def test_a_request_id_is_generated_when_the_caller_sends_none(served: RunningServer) -> None:
    call = served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer())
    await call
    assert HEX32.fullmatch(_request_id_of(await call.trailing_metadata()) or "")


def test_generated_request_ids_are_random_version_4_uuids_in_hex() -> None:
    ids = [new_request_id() for _ in range(200)]

    assert len(set(ids)) == len(ids)
    for request_id in ids:
        parsed = uuid.UUID(hex=request_id)
        assert parsed.hex == request_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize(
    "bad_id", ["has space", "x" * 129, "semi;colon", "slash/ed", '{"json": 1}']
)
async def test_an_unsafe_request_id_is_replaced(served: RunningServer, bad_id: str) -> None:
    call = served.user_stub.GetUser(
        user_service_pb2.GetUserRequest(id="me"), metadata=(*bearer(), ("x-request-id", bad_id))
    )
    await call
    assert HEX32.fullmatch(_request_id_of(await call.trailing_metadata()) or "")


async def test_the_request_id_is_sent_in_the_trailers_only(served: RunningServer) -> None:
    # No response headers of its own: grpc.aio would send them as a write of
    # their own, and they would keep gRPC from retrying a refused call.
    call = served.user_stub.GetUser(
        user_service_pb2.GetUserRequest(id="me"), metadata=(*bearer(), ("x-request-id", "t-1"))
    )
    await call
    assert _request_id_of(await call.initial_metadata()) is None
    assert _request_id_of(await call.trailing_metadata()) == "t-1"


async def test_the_request_id_is_echoed_on_failed_calls_too(served: RunningServer) -> None:
    error = await _failure(
        served.user_stub.GetUser(
            user_service_pb2.GetUserRequest(id="me"), metadata=(("x-request-id", "failing-1"),)
        )
    )
    assert _request_id_of(error.trailing_metadata()) == "failing-1"
    # Beside the rich status, not instead of it.
    assert _reason(error) == "TOKEN_INVALID"


async def test_the_request_id_is_echoed_on_unexpected_errors_too(
    served: RunningServer,
) -> None:
    served.users.error = RuntimeError("boom")
    error = await _failure(
        served.user_stub.GetUser(
            user_service_pb2.GetUserRequest(id="me"),
            metadata=(*bearer(), ("x-request-id", "failing-2")),
        )
    )
    assert error.code() is grpc.StatusCode.INTERNAL
    assert _request_id_of(error.trailing_metadata()) == "failing-2"
    assert _reason(error) == "INTERNAL"


# access log


async def test_each_call_writes_one_access_line_with_its_facts(
    served: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usersvc.access")
    await served.user_stub.GetUser(
        user_service_pb2.GetUserRequest(id="me"), metadata=(*bearer(), ("x-request-id", "log-1"))
    )
    [line] = await _access_lines(caplog)
    facts = {k: getattr(line, k) for k in ("method", "code", "principal", "request_id")}
    assert facts == {
        "method": GET_USER,
        "code": "OK",
        "principal": CALLER_ID,
        "request_id": "log-1",
    }


async def test_the_access_line_carries_a_duration_and_the_peer(
    served: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usersvc.access")
    await served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer())
    [line] = await _access_lines(caplog)
    assert (line.levelno, line.duration_ms >= 0, line.peer.startswith("ipv4:127.0.0.1:")) == (  # type: ignore[attr-defined]
        logging.INFO,
        True,
        True,
    )


async def test_a_rejected_call_is_logged_with_its_code(
    served: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usersvc.access")
    await _failure(served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="me")))
    [line] = await _access_lines(caplog)
    assert (line.code, line.principal) == ("UNAUTHENTICATED", "anonymous")  # type: ignore[attr-defined]


async def test_a_domain_error_is_logged_with_its_mapped_code(
    served: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usersvc.access")
    served.users.error = errors.UserNotFound()
    await _failure(
        served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="x"), metadata=bearer())
    )
    [line] = await _access_lines(caplog)
    assert line.code == "NOT_FOUND"  # type: ignore[attr-defined]


async def test_the_access_line_never_contains_the_request(
    served: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await served.auth_stub.Login(
        auth_service_pb2.LoginRequest(email="ada@example.com", password="hunter2-secret")
    )
    assert "hunter2-secret" not in caplog.text


async def test_an_unknown_method_is_logged_as_unimplemented(
    served: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="usersvc.access")
    await _failure(served.channel.unary_unary("/usersvc.v1.UserService/Nope")(b""))
    [line] = await _access_lines(caplog)
    assert line.code == "UNIMPLEMENTED"  # type: ignore[attr-defined]


class _Waiter(logging.Handler):
    """Signals when the access line of a call has been written."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.written = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.written.set()


@pytest.fixture
def access_waiter() -> Iterator[_Waiter]:
    waiter = _Waiter()
    logger = logging.getLogger("usersvc.access")
    level = logger.level
    logger.addHandler(waiter)
    logger.setLevel(logging.INFO)
    yield waiter
    logger.removeHandler(waiter)
    logger.setLevel(level)


async def test_a_call_the_client_cancels_is_logged_as_cancelled(
    served: RunningServer, access_waiter: _Waiter
) -> None:
    served.users.hang = True
    call = served.user_stub.LookupUser(
        user_service_pb2.LookupUserRequest(email="a@example.com"), metadata=bearer()
    )
    await served.users.entered.wait()
    call.cancel()
    await asyncio.wait_for(access_waiter.written.wait(), timeout=10)
    assert access_waiter.records[0].code == "CANCELLED"  # type: ignore[attr-defined]


async def test_a_call_past_its_deadline_is_logged_as_deadline_exceeded(
    served: RunningServer, access_waiter: _Waiter
) -> None:
    served.users.hang = True
    call = served.user_stub.LookupUser(
        user_service_pb2.LookupUserRequest(email="a@example.com"), metadata=bearer(), timeout=0.2
    )
    error = await _failure(call)
    await asyncio.wait_for(access_waiter.written.wait(), timeout=10)
    assert (error.code(), access_waiter.records[0].code) == (  # type: ignore[attr-defined]
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
    )


# unknown methods, bad bodies, unexpected errors


async def test_an_unknown_method_is_unimplemented(served: RunningServer) -> None:
    error = await _failure(served.channel.unary_unary("/usersvc.v1.UserService/Nope")(b""))
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_an_undecodable_body_is_invalid_argument(served: RunningServer) -> None:
    call = served.channel.unary_unary(GET_USER)(b"\xff\xff\xff", metadata=bearer())
    error = await _failure(call)
    assert (error.code(), error.details(), _reason(error)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request body is not a valid usersvc.v1.GetUserRequest",
        "INVALID_ARGUMENT",
    )


async def test_a_body_with_bad_utf8_is_invalid_argument(served: RunningServer) -> None:
    call = served.channel.unary_unary(GET_USER)(b"\x0a\x02\xff\xfe", metadata=bearer())
    error = await _failure(call)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_an_undecodable_streamed_body_is_invalid_argument(served: RunningServer) -> None:
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    call = served.channel.stream_stream(method)(iter([b"\xff\xff\xff"]))
    error = await _failure(_drain(call))
    assert (error.code(), _reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def _drain(call: Any) -> list[Any]:
    return [response async for response in call]


async def test_an_unexpected_exception_is_internal_with_a_generic_message(
    served: RunningServer,
) -> None:
    served.users.error = RuntimeError("boom: SELECT * FROM users")
    error = await _failure(
        served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer())
    )
    assert (error.code(), error.details(), _reason(error)) == (
        grpc.StatusCode.INTERNAL,
        "internal error",
        "INTERNAL",
    )


async def test_an_unexpected_exception_is_logged_with_its_traceback(
    served: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    served.users.error = RuntimeError("boom: SELECT * FROM users")
    await _failure(
        served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer())
    )
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError


async def test_a_domain_error_becomes_its_rich_status(served: RunningServer) -> None:
    served.users.error = errors.UserNotFound()
    error = await _failure(
        served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="x"), metadata=bearer())
    )
    assert (error.code(), _reason(error)) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


async def test_invalid_argument_from_a_mapper_carries_field_violations(
    served: RunningServer,
) -> None:
    request = user_service_pb2.UpdateUserRequest()  # no user.id
    error = await _failure(served.user_stub.UpdateUser(request, metadata=bearer()))
    status = rpc_status.from_call(error)
    assert status is not None
    [bad_request] = unpack_details(status)["BadRequest"]
    assert [v.field for v in bad_request.field_violations] == ["user.id"]  # type: ignore[attr-defined]


@pytest.fixture
async def bare_auth_stub() -> AsyncIterator[auth_service_pb2_grpc.AuthServiceStub]:
    """A server whose AuthService is the generated base class: every method
    inherited, answering UNIMPLEMENTED as a method not built yet would."""
    server, port, _ = await start_server(
        FakeAuthService(), auth_servicer=auth_service_pb2_grpc.AuthServiceServicer()
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield auth_service_pb2_grpc.AuthServiceStub(channel)
    await server.stop(None)


async def test_an_inherited_unimplemented_method_stays_unimplemented(
    bare_auth_stub: auth_service_pb2_grpc.AuthServiceStub,
) -> None:
    error = await _failure(
        bare_auth_stub.RefreshToken(auth_service_pb2.RefreshTokenRequest(refresh_token="r"))
    )
    assert (error.code(), _reason(error)) == (grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED")


async def test_an_inherited_unimplemented_method_logs_no_error(
    bare_auth_stub: auth_service_pb2_grpc.AuthServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    await _failure(
        bare_auth_stub.RefreshToken(auth_service_pb2.RefreshTokenRequest(refresh_token="r"))
    )
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# authentication


async def test_a_missing_token_on_a_private_method_is_token_invalid(served: RunningServer) -> None:
    error = await _failure(served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="me")))
    assert (error.code(), _reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer ", "Bearer  good.access.token", "Bearer a b", "Basic dXNlcjpwdw==", "x"],
)
async def test_a_malformed_authorization_is_token_invalid(
    served: RunningServer, authorization: str
) -> None:
    error = await _failure(
        served.user_stub.GetUser(
            user_service_pb2.GetUserRequest(id="me"), metadata=(("authorization", authorization),)
        )
    )
    assert (error.code(), _reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_two_authorization_headers_are_token_invalid(served: RunningServer) -> None:
    error = await _failure(
        served.user_stub.GetUser(
            user_service_pb2.GetUserRequest(id="me"), metadata=(*bearer(), *bearer())
        )
    )
    assert _reason(error) == "TOKEN_INVALID"


async def test_a_token_the_auth_service_rejects_is_unauthenticated(served: RunningServer) -> None:
    error = await _failure(
        served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer("nope"))
    )
    assert (error.code(), _reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_an_expired_token_keeps_its_own_reason(served: RunningServer) -> None:
    error = await _failure(
        served.user_stub.GetUser(
            user_service_pb2.GetUserRequest(id="me"), metadata=bearer(EXPIRED_TOKEN)
        )
    )
    assert _reason(error) == "TOKEN_EXPIRED"


async def test_the_scheme_is_case_insensitive(served: RunningServer) -> None:
    await served.user_stub.GetUser(
        user_service_pb2.GetUserRequest(id="me"),
        metadata=(("authorization", "bEaReR good.access.token"),),
    )
    assert served.users.calls[0].principal.subject == CALLER_ID


async def test_the_verified_principal_reaches_the_service(served: RunningServer) -> None:
    await served.user_stub.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer())
    assert served.users.calls[0].principal.subject == CALLER_ID


async def test_a_public_method_works_without_a_token(served: RunningServer) -> None:
    response = await served.auth_stub.GetJwks(auth_service_pb2.GetJwksRequest())
    assert response.jwks_json == '{"keys": []}'


async def test_a_public_method_is_called_as_anonymous(served: RunningServer) -> None:
    await served.user_stub.CreateUser(user_service_pb2.CreateUserRequest(email="a@example.com"))
    assert served.users.calls[0].principal is ANONYMOUS


async def test_a_public_method_still_rejects_an_invalid_token(served: RunningServer) -> None:
    error = await _failure(
        served.auth_stub.GetJwks(auth_service_pb2.GetJwksRequest(), metadata=bearer("nope"))
    )
    assert _reason(error) == "TOKEN_INVALID"


async def test_the_principal_of_one_call_does_not_leak_into_the_next(
    served: RunningServer,
) -> None:
    create = user_service_pb2.CreateUserRequest(email="a@example.com")
    await served.user_stub.CreateUser(create, metadata=bearer())
    await served.user_stub.CreateUser(create)
    assert [c.principal.subject for c in served.users.calls] == [CALLER_ID, ""]


async def test_an_async_authenticate_is_awaited() -> None:
    server, port, users = await start_server(AsyncFakeAuthService())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await user_service_pb2_grpc.UserServiceStub(channel).GetUser(
                user_service_pb2.GetUserRequest(id="me"), metadata=bearer()
            )
    finally:
        await server.stop(None)
    assert users.calls[0].principal.subject == CALLER_ID


# the standard services pass through every handler kind


async def test_health_watch_streams_through_the_interceptors(served: RunningServer) -> None:
    call = health_pb2_grpc.HealthStub(served.channel).Watch(health_pb2.HealthCheckRequest())
    first = await call.read()
    call.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_streams_both_ways_through_the_interceptors(
    served: RunningServer,
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    responses = await _drain(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in responses[0].list_services_response.service}
    assert "usersvc.v1.UserService" in names


async def test_a_streaming_call_gets_a_request_id(served: RunningServer) -> None:
    call = reflection_pb2_grpc.ServerReflectionStub(served.channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=(("x-request-id", "stream-1"),),
    )
    assert [response async for response in call]
    assert _request_id_of(await call.trailing_metadata()) == "stream-1"


# the wrapped handler is built once per method


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def test_the_wrapped_handler_is_reused_across_calls() -> None:
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    interceptor = AccessLogInterceptor()

    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        return handler

    first = await interceptor.intercept_service(continuation, _Details("/a.B/C"))
    second = await interceptor.intercept_service(continuation, _Details("/a.B/C"))
    assert first is second


async def test_a_new_handler_for_a_method_is_wrapped_afresh() -> None:
    handlers = iter(
        [grpc.unary_unary_rpc_method_handler(_echo), grpc.unary_unary_rpc_method_handler(_echo)]
    )
    interceptor: WrappingInterceptor = AccessLogInterceptor()

    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        return next(handlers)

    first = await interceptor.intercept_service(continuation, _Details("/a.B/C"))
    second = await interceptor.intercept_service(continuation, _Details("/a.B/C"))
    assert first is not second


async def _echo(request: Any, context: Any) -> Any:
    return request


class _EndingContext:
    """A servicer context whose call can end: asking an ended call for its
    peer fails the test (grpc's core may have released it by then)."""

    def __init__(self) -> None:
        self.ended = False

    def peer(self) -> str:
        assert not self.ended, "peer() read after the call ended"
        return "ipv4:10.1.2.3:4567"

    def code(self) -> None:
        return None


async def test_a_cancelled_response_stream_is_logged_with_the_peer_read_while_it_was_live(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def two_replies(request: Any, context: Any) -> AsyncIterator[str]:
        yield "first"
        yield "second"

    handler = grpc.unary_stream_rpc_method_handler(two_replies)
    wrapped = AccessLogInterceptor().wrap(handler, "/a.B/Stream")
    context = _EndingContext()
    caplog.set_level(logging.INFO, logger="usersvc.access")

    replies = wrapped.unary_stream("request", context)
    assert await replies.__anext__() == "first"
    # The client goes away: the generator is closed only after the call ended.
    context.ended = True
    await replies.aclose()

    lines = [record for record in caplog.records if record.name == "usersvc.access"]
    assert len(lines) == 1
    assert lines[0].peer == "ipv4:10.1.2.3:4567"  # type: ignore[attr-defined]
