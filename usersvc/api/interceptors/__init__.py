"""The server's interceptors, one concern each, and their order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import grpc

from usersvc.api.interceptors.access_log import AccessLogInterceptor
from usersvc.api.interceptors.admission import AdmissionInterceptor
from usersvc.api.interceptors.auth import Authenticator, AuthInterceptor, bearer_token
from usersvc.api.interceptors.database_gate import DatabaseGateInterceptor
from usersvc.api.interceptors.deadline import DEFAULT_MARGIN_SECONDS, DeadlineInterceptor
from usersvc.api.interceptors.encoded_responses import EncodedResponseInterceptor
from usersvc.api.interceptors.error_mapping import ErrorMappingInterceptor
from usersvc.api.interceptors.pipeline import Pipeline
from usersvc.api.interceptors.rate_limit import IPNetwork, RateLimiter, RateLimitInterceptor
from usersvc.api.interceptors.request_id import RequestIdInterceptor, request_id_from
from usersvc.api.interceptors.wrapping import WrappingInterceptor, wrap_handler
from usersvc.api.public import PublicMethods
from usersvc.api.user_servicer import ROLE_CHECKED_IN_STATEMENT
from usersvc.domain.ports import CallObserver, RateLimitedHook
from usersvc.domain.rate_limits import Rate

__all__ = [
    "AccessLogInterceptor",
    "AdmissionInterceptor",
    "AuthInterceptor",
    "Authenticator",
    "DatabaseGateInterceptor",
    "DeadlineInterceptor",
    "EncodedResponseInterceptor",
    "ErrorMappingInterceptor",
    "Pipeline",
    "RateLimitInterceptor",
    "RateLimiter",
    "RequestIdInterceptor",
    "WrappingInterceptor",
    "bearer_token",
    "build_interceptors",
    "request_id_from",
    "wrap_handler",
]


def build_interceptors(
    *,
    auth_service: Authenticator,
    public_methods: PublicMethods,
    service_identities: Mapping[str, frozenset[str]] | None = None,
    deadline_margin_seconds: float = DEFAULT_MARGIN_SECONDS,
    ensure_database: Callable[[], None] | None = None,
    rate_limiter: RateLimiter | None = None,
    general_rate: Rate | None = None,
    auth_rate: Rate | None = None,
    trusted_proxies: Sequence[IPNetwork] = (),
    call_metrics: CallObserver | None = None,
    on_rate_limited: RateLimitedHook | None = None,
    tracing: WrappingInterceptor | None = None,
    admission: AdmissionInterceptor | None = None,
) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """The interceptors for ``grpc.aio.server(interceptors=...)``: one
    Pipeline running the interceptors below, outermost first (see
    pipeline.py for why one); without ``rate_limiter`` nothing is rate
    limited. ``call_metrics`` and ``on_rate_limited`` feed the metrics
    (None: metrics off). ``tracing`` is the span-per-RPC interceptor when
    tracing is on (usersvc.observability.tracing), else nothing is added.
    ``admission`` (None: no caps, no request deadline) goes outermost.
    Never raises."""
    # The order is the design; each one relies on those outside it:
    # 0. Admission outermost: it takes the request messages from grpc itself
    #    (with a deadline each) and admits a call only once its request has
    #    arrived, before any other work; it changes the handler kind grpc
    #    sees, which only the outermost may do. Its refusals are counted and
    #    logged by itself, not per call: a flood must stay cheap.
    # 1. RequestId first, so every later line of the call (the access line, a
    #    traceback) carries the id, and the caller gets it back even when the
    #    call fails.
    # 1b. Tracing (when on) right inside RequestId: the span carries the
    #    request id from its start, and everything that takes time (access
    #    log, error mapping, auth, the handler and its SQL) runs inside it.
    #    Outside ErrorMapping, like AccessLog, so it records the final code.
    # 2. AccessLog outside ErrorMapping, so it sees the final status code of
    #    every call (mapped errors included) and times the whole call.
    # 3. ErrorMapping outside Auth, so a rejected token becomes a rich
    #    UNAUTHENTICATED status like any other domain error; it also decodes
    #    the request, so interceptors inside it see messages, outside it bytes.
    #    DatabaseGate (with ``ensure_database``, the database monitor's
    #    breaker) right inside it: while the database is down, calls that
    #    need it get a rich UNAVAILABLE before any other work.
    # 4. Deadline inside ErrorMapping, which answers its DeadlineExceeded,
    #    and outside everything that may wait (auth's revocation check, the
    #    handler), so the caller's deadline bounds all of it.
    # 5. Auth, after which the principal is known. The re-check of a
    #    privileged token's roles is left to the handler's own statement on
    #    the plain reads, UpdateUser and CreateUser
    #    (ROLE_CHECKED_IN_STATEMENT) and done here, before the answer, when
    #    the handler did not do it.
    # 6. RateLimit last: its buckets are per principal, so it needs Auth
    #    outside it; inside ErrorMapping, so a refusal is a rich
    #    RESOURCE_EXHAUSTED (RATE_LIMITED + RetryInfo). Health and
    #    reflection are exempt (see rate_limit.py).
    # 7. EncodedResponses innermost: it only lets handlers answer bytes they
    #    encoded themselves (the largest responses, a user at a time); every
    #    handler built around it keeps its serializer.
    interceptors: list[WrappingInterceptor] = [
        RequestIdInterceptor(),
        # Also the metrics hook: it sees every call's final code and duration.
        AccessLogInterceptor(metrics=call_metrics),
        ErrorMappingInterceptor(),
    ]
    if tracing is not None:
        interceptors.insert(1, tracing)
    if ensure_database is not None:
        interceptors.append(DatabaseGateInterceptor(ensure_database))
    interceptors += [
        DeadlineInterceptor(margin_seconds=deadline_margin_seconds),
        AuthInterceptor(
            auth_service=auth_service,
            public_methods=public_methods,
            service_identities=service_identities,
            role_checked_in_statement=ROLE_CHECKED_IN_STATEMENT,
        ),
    ]
    if rate_limiter is not None:
        interceptors.append(
            RateLimitInterceptor(
                limiter=rate_limiter,
                general=general_rate,
                auth=auth_rate,
                trusted_proxies=trusted_proxies,
                on_rejected=on_rate_limited,
            )
        )
    interceptors.append(EncodedResponseInterceptor())
    if admission is not None:
        interceptors.insert(0, admission)
    return [Pipeline(interceptors)]
