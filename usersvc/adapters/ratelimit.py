"""Token buckets (usersvc.domain.rate_limits): in this process, or shared by
every replica through Redis.

An absent bucket is a full one, so a bucket idle long enough to have
refilled can be forgotten at no cost: that is what bounds the memory of the
in-process limiter and the lifetime of the Redis keys.

The Redis limiter makes one round trip per check (EVALSHA of a Lua script
that reads, refills, takes and writes the bucket atomically, using Redis's
own clock, so the replicas' clocks do not matter). When Redis cannot be
reached it fails open to the in-process buckets, so every replica still
limits on its own (a caller gets the limit once per replica meanwhile), logs
a warning at most every WARNING_INTERVAL_SECONDS, and tries Redis again after
RETRY_AFTER_FAILURE_SECONDS with a single probing call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from usersvc.domain.rate_limits import Rate, take_token

logger = logging.getLogger(__name__)

# Bounded memory: 100,000 buckets of a few hundred bytes each. Beyond that
# the least recently used bucket is forgotten, which can only make its
# caller's next call more welcome, never refuse a call wrongly.
MAX_TRACKED_KEYS = 100_000
REDIS_KEY_PREFIX = "usersvc:rl:"
REDIS_MAX_CONNECTIONS = 50
WARNING_INTERVAL_SECONDS = 30.0
RETRY_AFTER_FAILURE_SECONDS = 1.0
# Idle buckets checked for eviction per call: amortised constant work.
_EVICTIONS_PER_CALL = 2

Clock = Callable[[], float]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    refill_seconds: float


class InProcessRateLimiter:
    """Buckets in a dict kept in least-recently-used order. Each check is
    synchronous on the event loop, hence atomic."""

    def __init__(self, *, clock: Clock = time.monotonic, max_keys: int = MAX_TRACKED_KEYS):
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, rate: Rate, key: str) -> float:
        """Take a token from bucket ``key``: 0.0 when taken, else seconds
        until one is available. Raises nothing."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            tokens, wait = take_token(rate, float(rate.burst), 0.0)
            self._buckets[key] = _Bucket(tokens, now, rate.refill_seconds)
        else:
            bucket.tokens, wait = take_token(rate, bucket.tokens, now - bucket.stamp)
            bucket.stamp = now
            bucket.refill_seconds = rate.refill_seconds
            self._buckets.move_to_end(key)
        self._evict(now)
        return wait

    async def acquire(self, rate: Rate, key: str) -> float:
        """``take`` for the RateLimiter protocol. Raises nothing."""
        return self.take(rate, key)

    async def aclose(self) -> None:
        """Nothing to release."""

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(_EVICTIONS_PER_CALL):
            oldest = next(iter(buckets.values()))
            if now - oldest.stamp < oldest.refill_seconds:
                break
            buckets.popitem(last=False)  # full again: the same as absent
        while len(buckets) > self._max_keys:
            buckets.popitem(last=False)


# KEYS[1]: the bucket; ARGV: tokens a second, burst. Returns the wait in
# microseconds, 0 when a token was taken. The time is Redis's own; a clock
# that steps back never adds tokens. Numbers cross into Lua as strings and
# back as integers, so the stamp is written with %d (tostring would round
# a microsecond timestamp to 14 digits).
_BUCKET_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
elseif now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate / 1000000)
  stamp = now
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'stamp', string.format('%d', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


class RedisRateLimiter:
    """Buckets in Redis hashes, shared by every replica on the same Redis;
    the in-process limiter stands in while Redis is unreachable."""

    def __init__(
        self,
        client: Any,
        *,
        timeout_seconds: float,
        fallback: InProcessRateLimiter | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """``client`` is a redis.asyncio.Redis; ``timeout_seconds`` bounds
        each socket operation (see ``from_url``). Raises nothing."""
        self._client = client
        self._script = client.register_script(_BUCKET_SCRIPT)
        # The most a broken Redis adds to one call: two attempts, each of
        # which may spend a timeout connecting and another one waiting.
        self._deadline = 4 * timeout_seconds
        self._fallback = fallback if fallback is not None else InProcessRateLimiter()
        self._clock = clock
        self._down_until: float | None = None
        self._probing = False
        self._last_warning: float | None = None

    @classmethod
    def from_url(
        cls, url: str, *, timeout_seconds: float, clock: Clock = time.monotonic
    ) -> RedisRateLimiter:
        """A limiter on the Redis at ``url`` (redis://, rediss:// or
        unix://). Nothing connects until the first check. Connecting and
        every socket operation give up after ``timeout_seconds``, a failed
        command is retried once at once, and at most REDIS_MAX_CONNECTIONS
        connections are open. Raises ValueError for a malformed URL."""
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            # One immediate retry: a pooled connection that Redis closed (a
            # restart, its idle timeout) then costs a reconnect, not a
            # fallback; a real outage fails both within the deadline.
            retry=Retry(NoBackoff(), 1),
        )
        return cls(Redis(connection_pool=pool), timeout_seconds=timeout_seconds, clock=clock)

    async def acquire(self, rate: Rate, key: str) -> float:
        """Take a token from the shared bucket ``key``: 0.0 when taken,
        else seconds until one is available. Never raises: without Redis,
        the answer comes from this process's buckets."""
        if self._down_until is not None and (self._probing or self._clock() < self._down_until):
            return self._fallback.take(rate, key)
        probe = self._down_until is not None
        self._probing = probe
        try:
            async with asyncio.timeout(self._deadline):
                wait_us = await self._script(
                    keys=[REDIS_KEY_PREFIX + key], args=[repr(rate.per_second), rate.burst]
                )
        except Exception as error:  # any failure at all: fail open
            self._failed(error)
            return self._fallback.take(rate, key)
        finally:
            if probe:
                self._probing = False
        if self._down_until is not None:
            self._down_until = None
            logger.info("rate limits are shared through Redis again")
        return max(0, int(wait_us)) / 1_000_000

    def _failed(self, error: Exception) -> None:
        now = self._clock()
        self._down_until = now + RETRY_AFTER_FAILURE_SECONDS
        if self._last_warning is None or now - self._last_warning >= WARNING_INTERVAL_SECONDS:
            self._last_warning = now
            # The class and message only: the URL may hold a password.
            logger.warning(
                "Redis unavailable; rate limits are per replica until it returns: %s: %s",
                type(error).__name__,
                error,
                extra={"error": type(error).__name__},
            )

    async def aclose(self) -> None:
        """Close the connections to Redis. Raises nothing."""
        try:
            await self._client.aclose()
        except Exception:  # closing a broken pool must not fail shutdown
            logger.debug("closing the Redis client failed", exc_info=True)
