"""Rate limiting without the network: token bucket arithmetic, the
in-process limiter (a fake clock), who counts as the caller (peer address,
x-forwarded-for from trusted proxies, principals), and how the Redis limiter
fails open (a fake Redis client)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest

from usersvc.adapters.ratelimit import (
    RETRY_AFTER_FAILURE_SECONDS,
    WARNING_INTERVAL_SECONDS,
    InProcessRateLimiter,
    RedisRateLimiter,
)
from usersvc.api.interceptors.rate_limit import caller_key, client_ip, forwarded_for, peer_ip
from usersvc.domain.models import ANONYMOUS, Principal, PrincipalKind
from usersvc.domain.rate_limits import Rate, rate_or_none, take_token

RATE = Rate(per_second=2.0, burst=3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def net(*texts: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in texts]


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --- bucket arithmetic ---------------------------------------------------------


def test_a_bucket_with_a_token_gives_it_without_a_wait() -> None:
    assert take_token(RATE, 3.0, 0.0) == (2.0, 0.0)


def test_an_empty_bucket_says_how_long_until_a_whole_token() -> None:
    tokens, wait = take_token(RATE, 0.5, 0.0)
    assert (tokens, wait) == (0.5, pytest.approx(0.25))


def test_a_bucket_refills_at_the_rate_but_never_beyond_the_burst() -> None:
    assert take_token(RATE, 0.0, 1.0) == (1.0, 0.0)
    assert take_token(RATE, 0.0, 3600.0) == (2.0, 0.0)


def test_a_clock_that_steps_back_adds_no_tokens() -> None:
    assert take_token(RATE, 0.0, -5.0) == (0.0, 0.5)


def test_a_rate_of_zero_turns_the_limit_off() -> None:
    assert rate_or_none(0, 10) is None
    assert rate_or_none(5, 10) == Rate(5, 10)


@pytest.mark.parametrize(("per_second", "burst"), [(-1.0, 10), (1.0, 0)])
def test_a_rate_that_cannot_work_is_refused(per_second: float, burst: int) -> None:
    with pytest.raises(ValueError, match="per_second"):
        Rate(per_second, burst)


# --- the in-process limiter ------------------------------------------------------


async def test_a_burst_is_allowed_and_the_next_call_refused_with_the_wait() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(clock=clock)
    waits = [await limiter.acquire(RATE, "a") for _ in range(4)]
    assert waits == [0.0, 0.0, 0.0, pytest.approx(0.5)]


async def test_a_refused_bucket_admits_again_after_the_wait() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(clock=clock)
    for _ in range(3):
        await limiter.acquire(RATE, "a")
    wait = await limiter.acquire(RATE, "a")
    clock.advance(wait)
    assert await limiter.acquire(RATE, "a") == 0.0


async def test_each_key_has_its_own_bucket() -> None:
    limiter = InProcessRateLimiter(clock=Clock())
    for _ in range(3):
        await limiter.acquire(RATE, "a")
    assert await limiter.acquire(RATE, "a") > 0
    assert await limiter.acquire(RATE, "b") == 0.0


async def test_buckets_idle_long_enough_to_be_full_are_forgotten() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(clock=clock)
    for key in ("a", "b", "c"):
        await limiter.acquire(RATE, key)
    clock.advance(RATE.refill_seconds)
    await limiter.acquire(RATE, "d")
    assert len(limiter) < 4


async def test_the_number_of_tracked_keys_is_capped_by_forgetting_the_least_recent() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(clock=clock, max_keys=2)
    for _ in range(3):
        await limiter.acquire(RATE, "busy")
    await limiter.acquire(RATE, "x")
    await limiter.acquire(RATE, "busy")  # refused, and now the most recent
    await limiter.acquire(RATE, "y")
    assert len(limiter) == 2
    assert await limiter.acquire(RATE, "busy") > 0


# --- who the caller is -------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:10.1.2.3:5000", "10.1.2.3"),
        ("ipv6:[2001:db8::1]:5000", "2001:db8::1"),
        ("ipv6:%5B2001:db8::1%5D:5000", "2001:db8::1"),
        ("ipv6:[::ffff:10.1.2.3]:5000", "10.1.2.3"),
    ],
)
def test_the_peer_address_is_read_from_grpcs_peer_string(peer: str, expected: str) -> None:
    assert peer_ip(peer) == ip(expected)


@pytest.mark.parametrize("peer", ["unix:/tmp/usersvc.sock", "", "ipv4:garbage"])
def test_a_peer_without_an_ip_address_has_none(peer: str) -> None:
    assert peer_ip(peer) is None


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert client_ip(ip("198.51.100.9"), ["203.0.113.5"], net("10.0.0.0/8")) == ip("198.51.100.9")


def test_a_trusted_proxy_names_the_client_in_x_forwarded_for() -> None:
    assert client_ip(ip("10.0.0.2"), ["203.0.113.5"], net("10.0.0.0/8")) == ip("203.0.113.5")


def test_the_right_most_untrusted_hop_is_the_client_and_what_it_wrote_is_ignored() -> None:
    hops = ["1.1.1.1", "203.0.113.5", "10.0.0.7"]
    assert client_ip(ip("10.0.0.2"), hops, net("10.0.0.0/8")) == ip("203.0.113.5")


def test_when_every_hop_is_trusted_the_left_most_is_the_client() -> None:
    assert client_ip(ip("10.0.0.2"), ["10.0.0.8", "10.0.0.7"], net("10.0.0.0/8")) == ip("10.0.0.8")


def test_a_hop_that_is_not_an_address_stops_the_walk_at_the_last_trusted_one() -> None:
    hops = ["203.0.113.5", "unknown", "10.0.0.7"]
    assert client_ip(ip("10.0.0.2"), hops, net("10.0.0.0/8")) == ip("10.0.0.7")


def test_hops_may_carry_ports_and_brackets() -> None:
    assert client_ip(ip("10.0.0.2"), [" 203.0.113.5:4711"], net("10.0.0.2/32")) == ip("203.0.113.5")
    assert client_ip(ip("10.0.0.2"), ["[2001:db8::5]:80"], net("10.0.0.2/32")) == ip("2001:db8::5")


def test_every_x_forwarded_for_header_counts_in_order() -> None:
    metadata = [
        ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
        ("other", "x"),
        ("x-forwarded-for", "3.3.3.3"),
    ]
    assert [hop.strip() for hop in forwarded_for(metadata)] == ["1.1.1.1", "2.2.2.2", "3.3.3.3"]


def test_an_authenticated_caller_is_keyed_by_its_principal_wherever_it_calls_from() -> None:
    user = Principal(kind=PrincipalKind.USER, subject="0190-user")
    service = Principal(kind=PrincipalKind.SERVICE, subject="spiffe://example/billing")
    assert caller_key(user, ip("1.2.3.4"), "ipv4:1.2.3.4:1") == "user:0190-user"
    assert caller_key(service, None, "") == "service:spiffe://example/billing"


def test_an_anonymous_caller_is_keyed_by_its_address() -> None:
    assert caller_key(ANONYMOUS, ip("1.2.3.4"), "ipv4:1.2.3.4:1") == "ip:1.2.3.4"


def test_an_anonymous_ipv6_caller_is_keyed_by_its_slash_64() -> None:
    first = caller_key(ANONYMOUS, ip("2001:db8:1:2::1"), "")
    second = caller_key(ANONYMOUS, ip("2001:db8:1:2:ffff::9"), "")
    assert first == second == "ip:2001:db8:1:2::/64"


# --- the Redis limiter failing open ------------------------------------------------


class FakeRedis:
    """register_script() of redis.asyncio.Redis, answering or failing on demand."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: Exception | None = None
        self.wait_us = 0

    def register_script(self, source: str) -> Any:
        async def run(*, keys: list[str], args: list[Any]) -> int:
            self.calls += 1
            if self.error is not None:
                raise self.error
            return self.wait_us

        return run

    async def aclose(self) -> None:
        return None


@pytest.fixture
def redis_down() -> tuple[FakeRedis, Clock, RedisRateLimiter]:
    client = FakeRedis()
    client.error = ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")
    clock = Clock()
    limiter = RedisRateLimiter(
        client,
        timeout_seconds=0.1,
        fallback=InProcessRateLimiter(clock=clock),
        clock=clock,
    )
    return client, clock, limiter


async def test_the_redis_answer_is_the_wait(
    redis_down: tuple[FakeRedis, Clock, RedisRateLimiter],
) -> None:
    client, _, limiter = redis_down
    client.error = None
    client.wait_us = 250_000
    assert await limiter.acquire(RATE, "a") == 0.25


async def test_without_redis_calls_are_limited_by_this_process_alone(
    redis_down: tuple[FakeRedis, Clock, RedisRateLimiter],
) -> None:
    _, _, limiter = redis_down
    waits = [await limiter.acquire(RATE, "a") for _ in range(4)]
    assert waits == [0.0, 0.0, 0.0, pytest.approx(0.5)]


async def test_an_outage_is_not_asked_about_again_until_the_retry_interval(
    redis_down: tuple[FakeRedis, Clock, RedisRateLimiter],
) -> None:
    client, clock, limiter = redis_down
    for _ in range(5):
        await limiter.acquire(RATE, "a")
    assert client.calls == 1
    clock.advance(RETRY_AFTER_FAILURE_SECONDS)
    await limiter.acquire(RATE, "a")
    assert client.calls == 2


async def test_redis_is_used_again_as_soon_as_it_answers(
    redis_down: tuple[FakeRedis, Clock, RedisRateLimiter],
) -> None:
    client, clock, limiter = redis_down
    await limiter.acquire(RATE, "a")
    client.error = None
    client.wait_us = 1_000_000
    clock.advance(RETRY_AFTER_FAILURE_SECONDS)
    assert await limiter.acquire(RATE, "a") == 1.0
    assert await limiter.acquire(RATE, "a") == 1.0
    assert client.calls == 3


async def test_an_outage_is_logged_at_most_once_per_interval_without_the_url(
    redis_down: tuple[FakeRedis, Clock, RedisRateLimiter], caplog: pytest.LogCaptureFixture
) -> None:
    _, clock, limiter = redis_down
    with caplog.at_level(logging.WARNING, logger="usersvc.adapters.ratelimit"):
        for _ in range(10):
            await limiter.acquire(RATE, "a")
            clock.advance(RETRY_AFTER_FAILURE_SECONDS)
        clock.advance(WARNING_INTERVAL_SECONDS)
        await limiter.acquire(RATE, "a")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "Redis unavailable" in warnings[0].getMessage()
    assert "redis://" not in warnings[0].getMessage()


# -- what a costly call aims at ------------------------------------------------------


def _target(method: str, request: Any, principal: Principal = ANONYMOUS) -> str | None:
    from usersvc.api.interceptors.rate_limit import COSTLY_METHODS

    return COSTLY_METHODS["/usersvc.v1." + method](request, principal)


def test_spellings_of_one_email_aim_at_one_account_and_the_key_does_not_hold_it() -> None:
    from usersvc_protos.v1 import auth_service_pb2

    keys = {
        _target("AuthService/Login", auth_service_pb2.LoginRequest(email=email))
        for email in ("ann@example.com", " ANN@Example.com ")
    }
    (key,) = keys
    assert key is not None
    assert "ann" not in key


def test_an_update_user_is_costly_only_when_it_changes_the_email() -> None:
    from google.protobuf import field_mask_pb2

    from usersvc_protos.v1 import user_pb2, user_service_pb2

    def update(paths: list[str], **fields: str) -> user_service_pb2.UpdateUserRequest:
        return user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id="x", **fields),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )

    assert _target("UserService/UpdateUser", update(["display_name"], email="a@b.c")) is None
    assert _target("UserService/UpdateUser", update([], display_name="A")) is None
    for request in (
        update(["email"], email="a@b.c"),
        update(["*"], email="a@b.c"),
        update([], email="a@b.c"),
    ):
        assert _target("UserService/UpdateUser", request)


def test_a_change_password_of_me_aims_at_the_caller() -> None:
    from usersvc_protos.v1 import user_service_pb2

    caller = Principal(kind=PrincipalKind.USER, subject="0190a4b2-6c1e-7cc3-8a1b-000000000001")
    me = _target(
        "UserService/ChangePassword", user_service_pb2.ChangePasswordRequest(id="me"), caller
    )
    named = _target(
        "UserService/ChangePassword",
        user_service_pb2.ChangePasswordRequest(id=caller.subject.upper()),
        caller,
    )
    assert me == named == f"user:{caller.subject}"
