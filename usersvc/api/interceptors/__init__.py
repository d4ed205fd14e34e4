"""The server's interceptors, one concern each, and their order."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from usersvc.api.interceptors.access_log import AccessLogInterceptor
from usersvc.api.interceptors.auth import Authenticator, AuthInterceptor, bearer_token
from usersvc.api.interceptors.error_mapping import ErrorMappingInterceptor
from usersvc.api.interceptors.request_id import RequestIdInterceptor, request_id_from
from usersvc.api.interceptors.wrapping import WrappingInterceptor, wrap_handler
from usersvc.api.public import PublicMethods

__all__ = [
    "AccessLogInterceptor",
    "AuthInterceptor",
    "Authenticator",
    "ErrorMappingInterceptor",
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
) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """The interceptors for ``grpc.aio.server(interceptors=...)``, outermost
    first. Never raises."""
    # The order is the design; each one relies on those outside it:
    # 1. RequestId first, so every later line of the call (the access line, a
    #    traceback) carries the id, and the caller gets it back even when the
    #    call fails.
    # 2. AccessLog outside ErrorMapping, so it sees the final status code of
    #    every call (mapped errors included) and times the whole call.
    # 3. ErrorMapping outside Auth, so a rejected token becomes a rich
    #    UNAUTHENTICATED status like any other domain error; it also decodes
    #    the request, so interceptors inside it see messages, outside it bytes.
    # 4. Auth last, right before the handler, which reads the principal.
    return [
        RequestIdInterceptor(),
        AccessLogInterceptor(),
        ErrorMappingInterceptor(),
        AuthInterceptor(
            auth_service=auth_service,
            public_methods=public_methods,
            service_identities=service_identities,
        ),
    ]
