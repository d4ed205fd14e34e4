"""Which calls usersvc.client lets gRPC retry, against a small fake server
(a real grpc.aio server on port 0 whose handlers answer UNAVAILABLE a set
number of times and count the attempts). Retrying needs answers the real
server never gives on demand, hence the fake; everything else about the
client is tested against the real server in test_client.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from usersvc_protos.v1 import auth_service_pb2, user_pb2, user_service_pb2
from usersvc.client import DatabaseUnavailable, Unavailable, UsersvcClient, retries

USER = user_pb2.User(id="0190f0e0-0000-7000-8000-000000000001", email="ada@example.com")


class FlakyServer:
    """Answers UNAVAILABLE to the first ``failures`` attempts of every
    method, then succeeds; with ``database_down`` the failure is usersvc's
    rich DATABASE_UNAVAILABLE, trailers-only with the x-request-id echo, as
    usersvc's breaker answers it; with ``headers_first`` it sends response
    headers (the echo) before failing, as servers from before the trailer
    echo did."""

    def __init__(self) -> None:
        self.failures = 1
        self.headers_first = False
        self.database_down = False
        self.attempts: Counter[str] = Counter()
        self.request_ids: list[str] = []
        self.port = 0
        self._server = grpc.aio.server()

    def _handler(self, name: str, response: Callable[[Any], Any]) -> grpc.RpcMethodHandler:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.attempts[name] += 1
            if name == "CreateUser":
                self.request_ids.append(request.request_id)
            if self.attempts[name] <= self.failures:
                if self.headers_first:
                    await context.send_initial_metadata((("x-request-id", "fake"),))
                if self.database_down:
                    status = _database_unavailable()
                    trailers = (("x-request-id", "fake"), *status.trailing_metadata)
                    await context.abort(status.code, status.details, trailers)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return response(request)

        return behaviour

    def _service(
        self, service: str, module: Any, methods: dict[str, Callable[[Any], Any]]
    ) -> grpc.GenericRpcHandler:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._handler(name, response),
                request_deserializer=getattr(module, f"{name}Request").FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )
            for name, response in methods.items()
        }
        return grpc.method_handlers_generic_handler(service, handlers)

    async def start(self) -> None:
        self._server.add_generic_rpc_handlers(
            (
                self._service(
                    "usersvc.v1.UserService",
                    user_service_pb2,
                    {
                        "GetUser": lambda _: user_service_pb2.GetUserResponse(user=USER),
                        "CreateUser": lambda _: user_service_pb2.CreateUserResponse(user=USER),
                        "UpdateUser": lambda _: user_service_pb2.UpdateUserResponse(user=USER),
                    },
                ),
                self._service(
                    "usersvc.v1.AuthService",
                    auth_service_pb2,
                    {
                        "Login": lambda _: auth_service_pb2.LoginResponse(access_token="t"),
                        "RefreshToken": lambda _: auth_service_pb2.RefreshTokenResponse(),
                        "GetJwks": lambda _: auth_service_pb2.GetJwksResponse(jwks_json="{}"),
                    },
                ),
            )
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop(0)


def _database_unavailable() -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="DATABASE_UNAVAILABLE", domain="usersvc.v1"))
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message="database unavailable; retry later",
            details=[detail],
        )
    )


@pytest_asyncio.fixture(loop_scope="session")
async def flaky() -> AsyncIterator[FlakyServer]:
    server = FlakyServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def client(flaky: FlakyServer) -> AsyncIterator[UsersvcClient]:
    async with UsersvcClient.connect(f"127.0.0.1:{flaky.port}", default_timeout=10) as client:
        yield client


async def test_a_read_that_meets_unavailable_is_retried(
    client: UsersvcClient, flaky: FlakyServer
) -> None:
    user = await client.get_user(USER.id)
    assert user.email == USER.email
    assert flaky.attempts["GetUser"] == 2


async def test_get_jwks_is_retried_too(client: UsersvcClient, flaky: FlakyServer) -> None:
    assert await client.get_jwks() == "{}"
    assert flaky.attempts["GetJwks"] == 2


async def test_a_create_is_retried_with_the_same_generated_request_id(
    client: UsersvcClient, flaky: FlakyServer
) -> None:
    await client.create_user("ada@example.com", "a long password")
    assert flaky.attempts["CreateUser"] == 2
    first, second = flaky.request_ids
    assert first, "the client sent no request_id"
    assert first == second


async def test_a_create_keeps_the_request_id_the_caller_gave(
    client: UsersvcClient, flaky: FlakyServer
) -> None:
    await client.create_user("ada@example.com", "a long password", request_id="mine-1")
    assert flaky.request_ids == ["mine-1", "mine-1"]


async def test_an_update_is_not_retried(client: UsersvcClient, flaky: FlakyServer) -> None:
    with pytest.raises(Unavailable):
        await client.update_user(USER.id, display_name="Ada")
    assert flaky.attempts["UpdateUser"] == 1


async def test_login_is_not_retried(client: UsersvcClient, flaky: FlakyServer) -> None:
    with pytest.raises(Unavailable):
        await client.login("ada@example.com", "a long password")
    assert flaky.attempts["Login"] == 1


async def test_a_refresh_is_not_retried(client: UsersvcClient, flaky: FlakyServer) -> None:
    # A second attempt with the same single-use token would end the session.
    with pytest.raises(Unavailable):
        await client.refresh_token("rt_x")
    assert flaky.attempts["RefreshToken"] == 1


async def test_retries_stop_after_max_attempts(client: UsersvcClient, flaky: FlakyServer) -> None:
    flaky.failures = 100
    with pytest.raises(Unavailable):
        await client.get_user(USER.id)
    assert flaky.attempts["GetUser"] == 4


async def test_max_attempts_1_turns_retries_off(flaky: FlakyServer) -> None:
    async with UsersvcClient.connect(f"127.0.0.1:{flaky.port}", max_attempts=1) as client:
        with pytest.raises(Unavailable):
            await client.get_user(USER.id)
    assert flaky.attempts["GetUser"] == 1


async def test_a_failure_after_response_headers_is_not_retried(
    client: UsersvcClient, flaky: FlakyServer
) -> None:
    # gRFC A6: once headers arrive the call is committed (usersvc sends
    # none of its own; servers from before the trailer echo did).
    flaky.headers_first = True
    with pytest.raises(Unavailable) as info:
        await client.get_user(USER.id)
    assert flaky.attempts["GetUser"] == 1
    assert info.value.request_id == "fake"


async def test_a_read_refused_with_database_unavailable_is_retried(
    client: UsersvcClient, flaky: FlakyServer
) -> None:
    # Trailers-only, as usersvc answers: gRPC repeats it, since a read
    # refused by the breaker did nothing.
    flaky.database_down = True
    user = await client.get_user(USER.id)
    assert user.email == USER.email
    assert flaky.attempts["GetUser"] == 2


async def test_database_unavailable_from_a_headers_first_server_is_retried_by_the_client(
    client: UsersvcClient, flaky: FlakyServer
) -> None:
    # gRPC cannot retry it (headers came first); the client does.
    flaky.database_down = True
    flaky.headers_first = True
    user = await client.get_user(USER.id)
    assert user.email == USER.email
    assert flaky.attempts["GetUser"] == 2


async def test_a_create_refused_with_database_unavailable_is_retried_with_its_request_id(
    client: UsersvcClient, flaky: FlakyServer
) -> None:
    flaky.database_down = True
    await client.create_user("ada@example.com", "a long password")
    first, second = flaky.request_ids
    assert first
    assert first == second


async def test_an_update_refused_with_database_unavailable_is_not_retried(
    client: UsersvcClient, flaky: FlakyServer
) -> None:
    flaky.database_down = True
    with pytest.raises(DatabaseUnavailable):
        await client.update_user(USER.id, display_name="Ada")
    assert flaky.attempts["UpdateUser"] == 1


@pytest.mark.parametrize("headers_first", [False, True])
async def test_database_unavailable_retries_stop_after_max_attempts(
    client: UsersvcClient, flaky: FlakyServer, headers_first: bool
) -> None:
    # Either gRPC or the client repeats a refused call, never both (which
    # would make max_attempts squared).
    flaky.database_down = True
    flaky.headers_first = headers_first
    flaky.failures = 100
    with pytest.raises(DatabaseUnavailable) as info:
        await client.get_user(USER.id)
    assert flaky.attempts["GetUser"] == retries.DEFAULT_MAX_ATTEMPTS
    assert info.value.request_id == "fake"


async def test_no_database_retry_when_the_backoff_would_outlast_the_deadline(
    client: UsersvcClient, flaky: FlakyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retries, "database_backoff", lambda attempt: 5.0)
    flaky.database_down = True
    flaky.headers_first = True
    with pytest.raises(DatabaseUnavailable):
        await client.get_user(USER.id, timeout=1.0)
    assert flaky.attempts["GetUser"] == 1


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 10])
def test_database_backoff_doubles_up_to_two_seconds_with_jitter(attempt: int) -> None:
    ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
    pauses = [retries.database_backoff(attempt) for _ in range(200)]
    assert all(0 <= pause < ceiling for pause in pauses)
    assert max(pauses) > ceiling / 2  # jittered over the range, not stuck at 0
