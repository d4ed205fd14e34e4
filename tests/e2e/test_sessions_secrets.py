"""Refresh tokens leave the server in exactly one place: the refresh_token
field of the Login or RefreshToken response that issued them. No other
response (errors included) carries a refresh token or its stored hash, and
no log line carries either."""

from __future__ import annotations

import base64
import hashlib
import logging

import grpc
import pytest
from google.protobuf.message import DecodeError

from .helpers import (
    RecordedResponse,
    World,
    auth_service_pb2,
    new_password,
    user_service_pb2,
)

LOGIN = "/usersvc.v1.AuthService/Login"
REFRESH = "/usersvc.v1.AuthService/RefreshToken"


def needles(token: str) -> dict[bytes, str]:
    """The forms in which a refresh token or its stored hash could leak."""
    digest = hashlib.sha256(base64.urlsafe_b64decode(token[3:] + "=")).digest()
    return {
        token.encode(): "refresh token",
        token[3:].encode(): "refresh token secret",
        digest: "hash",
        digest.hex().encode(): "hash (hex)",
        base64.b64encode(digest).rstrip(b"="): "hash (base64)",
        base64.urlsafe_b64encode(digest).rstrip(b"="): "hash (base64url)",
    }


def issued_here(recorded: RecordedResponse) -> str:
    """The refresh token a successful Login/RefreshToken response issued;
    "" for anything else (errors do not parse as the response)."""
    response_type = {
        LOGIN: auth_service_pb2.LoginResponse,
        REFRESH: auth_service_pb2.RefreshTokenResponse,
    }.get(recorded.method)
    if response_type is None:
        return ""
    try:
        return response_type.FromString(recorded.payload).refresh_token
    except DecodeError:
        return ""


def found_in(data: bytes, token: str) -> list[str]:
    """The leak forms of ``token`` present in ``data`` (the bare secret is
    not reported again when the whole token is there)."""
    found = [what for needle, what in needles(token).items() if needle in data]
    if "refresh token" in found:
        found.remove("refresh token secret")
    return found


def leaks(responses: list[RecordedResponse], tokens: list[str]) -> list[str]:
    found = []
    for recorded in responses:
        payload = recorded.payload
        allowed = issued_here(recorded)
        if allowed:
            # Its one legitimate occurrence; a second one still counts.
            payload = payload.replace(allowed.encode(), b"", 1)
        for token in tokens:
            found += [f"{recorded.method}: {what}" for what in found_in(payload, token)]
    return found


async def drive_every_session_rpc(world: World) -> list[str]:
    """Calls every RPC that takes or returns a refresh token, successes and
    failures; returns the refresh tokens the server issued."""
    anonymous = world.anonymous.auth
    tokens = [world.alice.login.refresh_token, world.bob.login.refresh_token]
    rotated = await anonymous.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=tokens[0])
    )
    tokens.append(rotated.refresh_token)
    second = await world.login(world.alice.email, world.alice.password)
    tokens.append(second.refresh_token)
    failures = [
        # Reuse (revokes the first session), unknown, and a foreign Logout.
        anonymous.RefreshToken(auth_service_pb2.RefreshTokenRequest(refresh_token=tokens[0])),
        anonymous.RefreshToken(
            auth_service_pb2.RefreshTokenRequest(refresh_token="rt_" + "A" * 43)
        ),
        world.bob.auth.Logout(auth_service_pb2.LogoutRequest(refresh_token=tokens[3])),
    ]
    for call in failures:
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    await world.admin.auth.IntrospectToken(auth_service_pb2.IntrospectTokenRequest(token=tokens[3]))
    await world.bob.auth.Logout(
        auth_service_pb2.LogoutRequest(refresh_token=world.bob.login.refresh_token)
    )
    await world.admin.auth.RevokeAllSessions(
        auth_service_pb2.RevokeAllSessionsRequest(user_id=world.alice.id)
    )
    await world.admin.users.ChangePassword(
        user_service_pb2.ChangePasswordRequest(
            id=world.alice.id, new_password=new_password(world.recorder)
        )
    )
    await anonymous.GetJwks(auth_service_pb2.GetJwksRequest())
    return tokens


async def test_no_response_carries_a_refresh_token_it_did_not_issue_nor_any_hash(
    world: World,
) -> None:
    mark = len(world.recorder.responses)
    tokens = await drive_every_session_rpc(world)
    responses = world.recorder.responses[mark:]
    assert len(responses) >= 10
    assert leaks(responses, tokens) == []


async def test_no_log_line_carries_a_refresh_token_or_its_hash(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = await drive_every_session_rpc(world) + [
        world.admin.login.refresh_token,
        world.service.login.refresh_token,
    ]
    text = "\n".join(
        f"{record.getMessage()} {record.__dict__}" for record in caplog.records
    ).encode()
    assert caplog.records, "the server logged nothing: the check would prove nothing"
    assert [found_in(text, token) for token in tokens] == [[] for _ in tokens]


def test_the_detector_finds_a_refresh_token_outside_its_own_response() -> None:
    token = "rt_" + base64.urlsafe_b64encode(b"\x01" * 32).rstrip(b"=").decode()
    recorded = RecordedResponse("/usersvc.v1.UserService/GetUser", b"x" + token.encode())
    assert leaks([recorded], [token]) == ["/usersvc.v1.UserService/GetUser: refresh token"]


def test_the_detector_allows_the_token_in_the_response_that_issued_it() -> None:
    token = "rt_" + base64.urlsafe_b64encode(b"\x02" * 32).rstrip(b"=").decode()
    payload = auth_service_pb2.LoginResponse(refresh_token=token).SerializeToString()
    assert leaks([RecordedResponse(LOGIN, payload)], [token]) == []


def test_the_detector_finds_a_hash_even_in_the_issuing_response() -> None:
    token = "rt_" + base64.urlsafe_b64encode(b"\x03" * 32).rstrip(b"=").decode()
    digest = hashlib.sha256(b"\x03" * 32).hexdigest()
    payload = auth_service_pb2.LoginResponse(
        refresh_token=token, token_type=digest
    ).SerializeToString()
    assert leaks([RecordedResponse(LOGIN, payload)], [token]) == [f"{LOGIN}: hash (hex)"]
