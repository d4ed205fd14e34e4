"""The log lines of a real server, as operators read them: one JSON access
line per call with method, code, duration, peer, principal id and request
id, and the request id on every other line of the call.

(That no line carries a secret is checked for every test of this tier by
the sweep in conftest.py; tests/unit/test_log_secret_sweep.py shows it
catches planted secrets.)"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from .helpers import World, auth_service_pb2, fails, user_service_pb2


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The service's JSON lines of this test, as `usersvc serve` writes
    them (the production handler's formatter and request-id filter)."""
    from usersvc.logging_setup import JsonFormatter, RequestIdFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines_of(stream: io.StringIO, request_id: str) -> list[dict[str, Any]]:
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in parsed if line.get("request_id") == request_id]


def access_line(lines: list[dict[str, Any]]) -> dict[str, Any]:
    [line] = [line for line in lines if line["logger"] == "usersvc.access"]
    return line


async def call_lines(stream: io.StringIO, request_id: str) -> list[dict[str, Any]]:
    """The lines of one call, once its access line is there. A failed
    call's status goes out before the access line is written; the server
    runs on this event loop, so yielding to it is enough (bounded)."""
    for _ in range(10_000):
        lines = lines_of(stream, request_id)
        if any(line["logger"] == "usersvc.access" for line in lines):
            return lines
        await asyncio.sleep(0)
    pytest.fail(f"no access line for {request_id}")


async def test_an_access_line_names_method_code_duration_peer_principal_and_request_id(
    world: World, json_lines: io.StringIO
) -> None:
    request_id = f"logs-{secrets.token_hex(6)}"
    await world.alice.users.GetUser(
        user_service_pb2.GetUserRequest(id="me"), metadata=(("x-request-id", request_id),)
    )

    line = access_line(await call_lines(json_lines, request_id))
    assert {key: line[key] for key in ("level", "method", "code", "principal")} == {
        "level": "INFO",
        "method": "/usersvc.v1.UserService/GetUser",
        "code": "OK",
        "principal": world.alice.id,
    }
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] > 0
    assert line["peer"].startswith("ipv4:127.0.0.1:")


async def test_an_anonymous_failed_call_is_logged_with_its_code(
    world: World, json_lines: io.StringIO
) -> None:
    request_id = f"logs-{secrets.token_hex(6)}"
    failure = await fails(
        world.anonymous.users.GetUser(
            user_service_pb2.GetUserRequest(id="me"), metadata=(("x-request-id", request_id),)
        )
    )

    line = access_line(await call_lines(json_lines, request_id))
    assert (failure.code, line["code"], line["principal"]) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        "anonymous",
    )


async def test_a_warning_during_a_call_carries_the_request_id_of_that_call(
    world: World, json_lines: io.StringIO
) -> None:
    # Presenting a retired refresh token logs a warning from the service
    # layer, deep inside the call.
    first = world.bob.login.refresh_token
    await world.anonymous.auth.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=first)
    )
    request_id = f"logs-{secrets.token_hex(6)}"
    await fails(
        world.anonymous.auth.RefreshToken(
            auth_service_pb2.RefreshTokenRequest(refresh_token=first),
            metadata=(("x-request-id", request_id),),
        )
    )

    lines = await call_lines(json_lines, request_id)
    warnings = [line for line in lines if line["level"] == "WARNING"]
    assert [w["msg"] for w in warnings] == [
        "a retired refresh token was presented again; session revoked"
    ]
    assert warnings[0]["user_id"] == world.bob.id
    assert access_line(lines)["code"] == "UNAUTHENTICATED"
