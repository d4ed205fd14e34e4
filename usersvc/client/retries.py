"""Which calls gRPC may repeat by itself, as a gRPC service config, and how
the channel finds its way back to servers that restart.

Only UNAVAILABLE and CANCELLED are retried, and only on methods where doing
a call twice has the effect of doing it once: reads, and creates that carry a
``request_id`` (the client fills one in when the caller gives none, and the
server answers a repeated request_id with the first response, AIP-155).
Never retried: Login (each one starts a session), RefreshToken (single-use:
a second attempt with the same token looks like theft and ends the
session), and every update, delete and state change.

gRPC retries within the call's deadline, with exponential backoff and
jitter, and stops retrying altogether (retryThrottling) when most recent
calls fail, so a dead server does not get three times the traffic. A call
is only retried until the server sends response headers (gRFC A6). usersvc
sends none of its own (the x-request-id echo travels in the trailers), so
its answers are trailers-only and gRPC retries both a call that never
reached a server (connection refused or reset, server draining) and
usersvc's DATABASE_UNAVAILABLE (its breaker refused the call before doing
anything). A server from before the trailer echo sent headers first; the
client itself repeats those DATABASE_UNAVAILABLE answers on the same
methods (UsersvcClient._call), at most ``max_attempts`` in all, after
``database_backoff`` and only while the deadline allows.

CANCELLED is what grpc core answers to a call it received but dropped
when a server began to stop (grpc/grpc#41785, docs/operations.md): a
call the service never saw. (A caller's own cancellation is not an answer
and is never retried.)

With a balancing policy that watches health (round_robin), the channel
asks each server's ``grpc.health.v1.Health/Watch`` for the overall status
(``healthCheckConfig``) and sends calls only to servers that report
SERVING: a server that begins to drain (USERSVC_SHUTDOWN_DRAIN_SECONDS)
gets no new calls from the moment it reports NOT_SERVING, long before it
stops accepting them. A server reports NOT_SERVING while its database is
down too, so calls go to the replicas that have one; when no server is
SERVING, calls fail at once with UNAVAILABLE. pick_first, the default,
ignores health. A connection
that is lost or closed (GOAWAY) is dialled again after 0.2 s, then after
up to 2 s between attempts (gRPC's defaults: 1 s, growing to 120 s), so a
restarted server gets calls again within about 2 s of listening.

"""

from __future__ import annotations

import json
import random
from typing import Any

USER_SERVICE = "usersvc.v1.UserService"
AUTH_SERVICE = "usersvc.v1.AuthService"

RETRIED_METHODS: tuple[tuple[str, str], ...] = (
    (USER_SERVICE, "GetUser"),
    (USER_SERVICE, "LookupUser"),
    (USER_SERVICE, "ListUsers"),
    (USER_SERVICE, "BatchGetUsers"),
    (USER_SERVICE, "CreateUser"),
    (USER_SERVICE, "BatchCreateUsers"),
    (AUTH_SERVICE, "GetJwks"),
    (AUTH_SERVICE, "IntrospectToken"),
)

DEFAULT_MAX_ATTEMPTS = 4


# Backoff of the client's own retries: like the service config's, doubling
# from 0.1 s up to 2 s, with full jitter so that many clients refused at the
# same moment do not come back together.
_INITIAL_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 2.0


def database_backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based):
    uniform in [0, min(2, 0.1 * 2**(attempt-1))). Never raises for attempt
    >= 1."""
    ceiling = min(_MAX_BACKOFF_SECONDS, _INITIAL_BACKOFF_SECONDS * 2 ** (attempt - 1))
    return random.uniform(0, ceiling)  # noqa: S311 - jitter, not a secret


def service_config(*, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict[str, Any]:
    """The service config (as a dict) with the retry policy above;
    ``max_attempts`` counts the first attempt (gRPC caps it at 5; 1 turns
    retries off). Raises ValueError outside 1..5."""
    if not 1 <= max_attempts <= 5:
        raise ValueError("max_attempts must be 1..5")
    config: dict[str, Any] = {"methodConfig": [], "healthCheckConfig": {"serviceName": ""}}
    if max_attempts > 1:
        config["methodConfig"].append(
            {
                "name": [{"service": s, "method": m} for s, m in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        )
        # Each failure costs a token, each success gives back 0.1; below half
        # of maxTokens no call is retried. So retries stop when more than
        # about one call in eleven fails for a while, but a burst of up to 50
        # failures is retried: a server that stops without a drain drops
        # every call it had received and not yet started (CANCELLED, 36 at
        # once in tests/drills/test_rolling_restart.py at 300 calls/s),
        # which a budget of 5 would mostly leave failed.
        config["retryThrottling"] = {"maxTokens": 100, "tokenRatio": 0.1}
    return config


# Reconnection after a lost connection: first attempt after this long,
# then growing (x1.6, with jitter) up to the maximum.
INITIAL_RECONNECT_BACKOFF_MS = 200
MAX_RECONNECT_BACKOFF_MS = 2000


def channel_options(*, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[tuple[str, Any]]:
    """Channel options that turn the retry policy and health checking on
    and shorten the reconnection backoff."""
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(max_attempts=max_attempts))),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
