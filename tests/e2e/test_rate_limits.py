"""Rate limits over gRPC: token buckets per caller, a stricter one for
Login and sign-up, x-forwarded-for only from trusted proxies, health and
reflection exempt, and buckets shared by two servers through Redis, which
may go away without taking the service with it.

Each test starts servers of its own with tiny buckets that barely refill,
so the N+1th call of a burst is refused whatever the machine's speed."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import redis.asyncio
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from redis_servers import private_redis

from usersvc.adapters.ratelimit import REDIS_KEY_PREFIX

from .conftest import RunningServer, running_server
from .helpers import (
    CALL_TIMEOUT_SECONDS,
    Caller,
    ResponseRecorder,
    RpcFailure,
    World,
    auth_service_pb2,
    create_request,
    expect_bad_credentials,
    expect_error,
    new_email,
    user_pb2,
    user_service_pb2,
)
from .test_standard_services import reflect

# Practically no refill within a test.
TRICKLE = 0.01
OPEN = 1_000_000
ME = user_service_pb2.GetUserRequest(id="me")
JWKS = auth_service_pb2.GetJwksRequest()


def limited(
    e2e_settings: Any,
    *,
    rps: float = OPEN,
    burst: int = OPEN,
    auth_rps: float = OPEN,
    auth_burst: int = OPEN,
    **changes: Any,
) -> Any:
    return dataclasses.replace(
        e2e_settings,
        rate_limit_rps=rps,
        rate_limit_burst=burst,
        auth_rate_limit_rps=auth_rps,
        auth_rate_limit_burst=auth_burst,
        **changes,
    )


@asynccontextmanager
async def server(settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    async with running_server(settings, recorder) as running:
        yield running


async def expect_rate_limited(call: Awaitable[Any]) -> RpcFailure:
    return await expect_error(call, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


async def wrong_login(
    caller: Caller, *, forwarded_for: str | None = None, email: str | None = None
) -> grpc.StatusCode:
    """A Login with a wrong password (for a fresh email unless ``email`` is
    given: each account has a strict bucket of its own too); the status code
    it got."""
    metadata = () if forwarded_for is None else (("x-forwarded-for", forwarded_for),)
    try:
        await caller.auth.Login(
            auth_service_pb2.LoginRequest(
                email=email or new_email("nobody"), password="wrong-password"
            ),
            metadata=metadata,
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    raise AssertionError("a wrong password logged in")


async def test_the_call_after_a_burst_gets_resource_exhausted_with_retry_info(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    async with server(limited(e2e_settings, rps=TRICKLE, burst=3), recorder) as running:
        anonymous = Caller(running.channel, None)
        for _ in range(3):
            await anonymous.auth.GetJwks(JWKS)
        failure = await expect_rate_limited(anonymous.auth.GetJwks(JWKS))
    assert len(failure.retry_infos) == 1
    delay = failure.retry_infos[0].retry_delay.ToTimedelta().total_seconds()
    assert 0 < delay <= 1 / TRICKLE


async def test_a_refused_call_is_answered_again_once_the_retry_delay_has_passed(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    async with server(limited(e2e_settings, rps=20, burst=1), recorder) as running:
        anonymous = Caller(running.channel, None)
        await anonymous.auth.GetJwks(JWKS)
        failure = await expect_rate_limited(anonymous.auth.GetJwks(JWKS))
        await asyncio.sleep(failure.retry_infos[0].retry_delay.ToTimedelta().total_seconds())
        assert (await anonymous.auth.GetJwks(JWKS)).jwks_json


async def test_each_authenticated_caller_has_a_bucket_of_its_own(
    e2e_settings: Any, recorder: ResponseRecorder, world: World
) -> None:
    async with server(limited(e2e_settings, rps=TRICKLE, burst=3), recorder) as running:
        alice = Caller(running.channel, world.alice.token)
        bob = Caller(running.channel, world.bob.token)
        for _ in range(3):
            await alice.users.GetUser(ME)
        await expect_rate_limited(alice.users.GetUser(ME))
        assert (await bob.users.GetUser(ME)).user.id == world.bob.id
        assert (await Caller(running.channel, None).auth.GetJwks(JWKS)).jwks_json


async def test_login_draws_from_a_stricter_bucket_than_other_calls(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    settings = limited(e2e_settings, auth_rps=TRICKLE, auth_burst=2)
    async with server(settings, recorder) as running:
        anonymous = Caller(running.channel, None)
        codes = [await wrong_login(anonymous) for _ in range(2)]
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2
        await expect_rate_limited(
            anonymous.auth.Login(auth_service_pb2.LoginRequest(email="a@example.com", password="x"))
        )
        assert (await anonymous.auth.GetJwks(JWKS)).jwks_json


async def test_anonymous_sign_up_shares_the_login_bucket(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    settings = limited(e2e_settings, auth_rps=TRICKLE, auth_burst=1)
    async with server(settings, recorder) as running:
        anonymous = Caller(running.channel, None)
        await wrong_login(anonymous)
        await expect_rate_limited(anonymous.users.CreateUser(create_request(recorder)))


async def test_reset_password_shares_the_login_bucket(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    settings = limited(e2e_settings, auth_rps=TRICKLE, auth_burst=1)
    async with server(settings, recorder) as running:
        anonymous = Caller(running.channel, None)
        await wrong_login(anonymous)
        await expect_rate_limited(
            anonymous.users.ResetPassword(
                user_service_pb2.ResetPasswordRequest(
                    email="nobody@example.com", code="ABCDEFGH", new_password="Pw-fine-12345"
                )
            )
        )


async def test_create_user_with_any_credentials_draws_from_the_strict_bucket(
    e2e_settings: Any, recorder: ResponseRecorder, world: World
) -> None:
    # Each CreateUser hashes a password and answers whether an email is
    # taken, whoever asks.
    settings = limited(e2e_settings, auth_rps=TRICKLE, auth_burst=1)
    async with server(settings, recorder) as running:
        for token in (world.admin.token, world.service.token):
            caller = Caller(running.channel, token)
            assert (await caller.users.CreateUser(create_request(recorder))).user.id
            await expect_rate_limited(caller.users.CreateUser(create_request(recorder)))


def email_change(user_id: str, email: str) -> user_service_pb2.UpdateUserRequest:
    return user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=user_id, email=email),
        update_mask=field_mask_pb2.FieldMask(paths=["email"]),
    )


async def test_email_probes_through_update_user_draw_from_the_strict_bucket(
    e2e_settings: Any, recorder: ResponseRecorder, world: World
) -> None:
    settings = limited(e2e_settings, auth_rps=TRICKLE, auth_burst=1)
    async with server(settings, recorder) as running:
        alice = Caller(running.channel, world.alice.token)
        # EMAIL_ALREADY_EXISTS tells alice that bob's email is registered.
        await expect_error(
            alice.users.UpdateUser(email_change(world.alice.id, world.bob.email)),
            grpc.StatusCode.ALREADY_EXISTS,
            "EMAIL_ALREADY_EXISTS",
        )
        await expect_rate_limited(
            alice.users.UpdateUser(email_change(world.alice.id, new_email("probe")))
        )
        # Changes that reveal nothing stay on the general bucket.
        renamed = user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=world.alice.id, display_name="Alice"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
        for _ in range(3):
            await alice.users.UpdateUser(renamed)


async def test_change_password_draws_from_the_strict_bucket(
    e2e_settings: Any, recorder: ResponseRecorder, world: World
) -> None:
    settings = limited(e2e_settings, auth_rps=TRICKLE, auth_burst=1)
    async with server(settings, recorder) as running:
        bob = Caller(running.channel, world.bob.token)
        request = user_service_pb2.ChangePasswordRequest(
            id="me", current_password="Not-the-password-1", new_password="A-new-passphrase-9"
        )
        await expect_bad_credentials(bob.users.ChangePassword(request))
        await expect_rate_limited(bob.users.ChangePassword(request))


async def test_callers_on_many_addresses_share_the_strict_bucket_of_the_account_they_aim_at(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    settings = limited(
        e2e_settings,
        auth_rps=TRICKLE,
        auth_burst=2,
        trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
    )
    victim = new_email("victim")
    async with server(settings, recorder) as running:
        proxy = Caller(running.channel, None)
        codes = [
            await wrong_login(proxy, forwarded_for=f"203.0.113.{n}", email=victim.upper())
            for n in range(1, 4)
        ]
        elsewhere = await wrong_login(proxy, forwarded_for="203.0.113.9")
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert elsewhere == grpc.StatusCode.UNAUTHENTICATED


async def test_x_forwarded_for_from_a_trusted_proxy_names_the_caller(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    settings = limited(
        e2e_settings,
        auth_rps=TRICKLE,
        auth_burst=1,
        trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
    )
    async with server(settings, recorder) as running:
        proxy = Caller(running.channel, None)
        first = await wrong_login(proxy, forwarded_for="203.0.113.7")
        again = await wrong_login(proxy, forwarded_for="198.51.100.1, 203.0.113.7")
        other = await wrong_login(proxy, forwarded_for="203.0.113.8")
    assert (first, again, other) == (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    settings = limited(e2e_settings, auth_rps=TRICKLE, auth_burst=1)
    async with server(settings, recorder) as running:
        client = Caller(running.channel, None)
        first = await wrong_login(client, forwarded_for="203.0.113.7")
        spoofed = await wrong_login(client, forwarded_for="203.0.113.8")
    assert (first, spoofed) == (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


async def test_health_and_reflection_are_never_limited(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    async with server(limited(e2e_settings, rps=TRICKLE, burst=1), recorder) as running:
        await Caller(running.channel, None).auth.GetJwks(JWKS)
        health = health_pb2_grpc.HealthStub(running.channel)
        for _ in range(5):
            reply = await health.Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_SECONDS
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(3):
            listing = await reflect(
                running.channel, reflection_pb2.ServerReflectionRequest(list_services="")
            )
            assert listing.list_services_response.service


async def test_a_limit_of_zero_requests_a_second_turns_limiting_off(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    async with server(limited(e2e_settings, rps=0, burst=1), recorder) as running:
        anonymous = Caller(running.channel, None)
        for _ in range(5):
            assert (await anonymous.auth.GetJwks(JWKS)).jwks_json


# --- through Redis ---------------------------------------------------------------


async def test_two_servers_on_one_redis_share_one_budget(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    with private_redis() as redis_server:
        settings = limited(e2e_settings, auth_rps=TRICKLE, auth_burst=2, redis_url=redis_server.url)
        async with server(settings, recorder) as first, server(settings, recorder) as second:
            codes = [
                await wrong_login(Caller(first.channel, None)),
                await wrong_login(Caller(second.channel, None)),
                await wrong_login(Caller(first.channel, None)),
                await wrong_login(Caller(second.channel, None)),
            ]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def jwks_code(caller: Caller) -> grpc.StatusCode:
    try:
        await caller.auth.GetJwks(JWKS)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def key_exists(url: str, key: str) -> bool:
    # A client of its own each time: a pooled connection would not survive
    # the restart of the server.
    client = redis.asyncio.Redis.from_url(url)
    try:
        return bool(await client.exists(key))
    finally:
        await client.aclose()


async def test_a_redis_outage_leaves_calls_answered_and_limiting_resumes_when_it_returns(
    e2e_settings: Any, recorder: ResponseRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    key = REDIS_KEY_PREFIX + "api:ip:127.0.0.1"
    with private_redis() as redis_server:
        settings = limited(e2e_settings, rps=TRICKLE, burst=3, redis_url=redis_server.url)
        async with server(settings, recorder) as running:
            anonymous = Caller(running.channel, None)
            await anonymous.auth.GetJwks(JWKS)
            assert await key_exists(redis_server.url, key)

            redis_server.stop()
            with caplog.at_level(logging.WARNING, logger="usersvc.adapters.ratelimit"):
                codes = [await jwks_code(anonymous) for _ in range(2)]
            assert codes == [grpc.StatusCode.OK] * 2
            assert any("Redis unavailable" in r.getMessage() for r in caplog.records)

            redis_server.start()

            async def shared_again() -> bool:
                code = await jwks_code(anonymous)
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
                return await key_exists(redis_server.url, key)

            await eventually(shared_again)
            # The restarted Redis's bucket (burst 3) lost one token to the
            # call that found it: a refusal comes within three more calls.
            codes = [await jwks_code(anonymous) for _ in range(3)]
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            await expect_rate_limited(anonymous.auth.GetJwks(JWKS))
