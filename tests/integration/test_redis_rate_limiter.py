"""RedisRateLimiter against real Redis servers: one shared bucket for every
limiter, atomic under concurrency, keys that expire, a bounded cost when
Redis does not answer, and failing open through an outage of a private
redis-server."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio
from redis_servers import private_redis, shared_redis_url

from usersvc.adapters.ratelimit import (
    REDIS_KEY_PREFIX,
    RETRY_AFTER_FAILURE_SECONDS,
    RedisRateLimiter,
)
from usersvc.domain.rate_limits import Rate

TIMEOUT = 0.1
# Slow refill: no token comes back while a test runs.
SLOW = Rate(per_second=0.01, burst=3)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def unique_key() -> str:
    return f"test:{secrets.token_hex(8)}"


@pytest.fixture
def redis_url() -> str:
    return shared_redis_url()


@pytest.fixture
async def limiters(redis_url: str) -> AsyncIterator[list[RedisRateLimiter]]:
    made = [RedisRateLimiter.from_url(redis_url, timeout_seconds=1.0) for _ in range(2)]
    yield made
    for limiter in made:
        await limiter.aclose()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def test_two_limiters_on_one_redis_share_one_bucket(
    limiters: list[RedisRateLimiter],
) -> None:
    key = unique_key()
    first, second = limiters
    waits = [await (first, second)[i % 2].acquire(SLOW, key) for i in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] > 0


async def test_the_wait_is_the_time_until_a_whole_token(
    limiters: list[RedisRateLimiter],
) -> None:
    key = unique_key()
    rate = Rate(per_second=2.0, burst=1)
    assert await limiters[0].acquire(rate, key) == 0.0
    wait = await limiters[0].acquire(rate, key)
    assert 0.4 < wait <= 0.5


async def test_concurrent_checks_on_one_bucket_admit_exactly_the_burst(
    limiters: list[RedisRateLimiter],
) -> None:
    key = unique_key()
    waits = await asyncio.gather(*(limiters[i % 2].acquire(SLOW, key) for i in range(40)))
    assert sum(wait == 0.0 for wait in waits) == SLOW.burst


async def test_a_bucket_key_expires_once_it_would_be_full_again(
    limiters: list[RedisRateLimiter], redis_url: str
) -> None:
    key = unique_key()
    rate = Rate(per_second=10.0, burst=20)
    await limiters[0].acquire(rate, key)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        ttl_ms = await client.pttl(REDIS_KEY_PREFIX + key)
    finally:
        await client.aclose()
    assert 0 < ttl_ms <= rate.refill_seconds * 1000 + 1000


async def test_a_redis_that_never_answers_costs_a_call_a_bounded_time(
    black_hole: int, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisRateLimiter.from_url(
        f"redis://127.0.0.1:{black_hole}/0", timeout_seconds=TIMEOUT
    )
    try:
        with caplog.at_level(logging.WARNING, logger="usersvc.adapters.ratelimit"):
            started = time.monotonic()
            wait = await limiter.acquire(SLOW, unique_key())
            elapsed = time.monotonic() - started
            # Within the retry interval Redis is not even asked.
            started = time.monotonic()
            await limiter.acquire(SLOW, unique_key())
            second = time.monotonic() - started
    finally:
        await limiter.aclose()
    assert wait == 0.0
    assert elapsed < 4 * TIMEOUT + 0.2
    assert second < 0.05
    assert any("Redis unavailable" in r.getMessage() for r in caplog.records)


async def test_an_outage_fails_open_then_limiting_is_shared_again_when_redis_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    key = unique_key()
    with private_redis() as server:
        limiter = RedisRateLimiter.from_url(server.url, timeout_seconds=TIMEOUT, clock=clock)
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            assert await limiter.acquire(SLOW, key) == 0.0
            server.stop()
            with caplog.at_level(logging.WARNING, logger="usersvc.adapters.ratelimit"):
                during = [await limiter.acquire(SLOW, key) for _ in range(SLOW.burst)]
            assert during == [0.0] * SLOW.burst
            assert any("Redis unavailable" in r.getMessage() for r in caplog.records)

            server.start()
            clock.now += RETRY_AFTER_FAILURE_SECONDS
            # Empty after the restart (and without the script): a full bucket.
            after = [await limiter.acquire(SLOW, key) for _ in range(SLOW.burst + 1)]
            assert after[: SLOW.burst] == [0.0] * SLOW.burst
            assert after[SLOW.burst] > 0
            assert await client.exists(REDIS_KEY_PREFIX + key) == 1
        finally:
            await client.aclose()
            await limiter.aclose()
