"""Typed exceptions for failed calls, decoded from gRPC's rich error model.

The server puts a ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer with one ``ErrorInfo`` (domain ``usersvc.v1``) whose ``reason`` is the
stable, machine-readable part of the error (docs/api.md, "Errors"). The reason picks
the exception class; errors without details (a deadline that ran out in the
client, a connection that could not be made, a proxy's answer) fall back to a
class chosen by the status code alone.

Programs catch by class (``except UserNotFound``) or switch on ``reason``;
``message`` is for people.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "usersvc.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"

__all__ = [
    "CodeInvalid",
    "DatabaseUnavailable",
    "DeadlineExceeded",
    "EmailAlreadyExists",
    "EtagMismatch",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "InvalidCredentials",
    "InvalidState",
    "PermissionDenied",
    "RateLimited",
    "RefreshTokenInvalid",
    "ResourceExhausted",
    "TokenExpired",
    "TokenInvalid",
    "TokenRevoked",
    "Unauthenticated",
    "Unavailable",
    "UserNotFound",
    "UsersvcError",
    "WeakPassword",
    "error_from_rpc",
]


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of an INVALID_ARGUMENT error: its path in the request
    (``email``, ``requests[3].email``) and what is wrong with it."""

    field: str
    description: str


class UsersvcError(Exception):
    """A call that did not succeed.

    ``code`` is the gRPC status code; ``reason`` the ErrorInfo reason (None
    when the status carried no usersvc ErrorInfo); ``metadata`` the
    ErrorInfo's metadata; ``field_violations`` the BadRequest violations
    (INVALID_ARGUMENT only); ``retry_after`` the RetryInfo delay in seconds
    (RESOURCE_EXHAUSTED only); ``request_id`` the ``x-request-id`` the server
    echoed (None when the call never reached it), the key to its log lines.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.field_violations = field_violations
        self.retry_after = retry_after
        self.request_id = request_id

    def __str__(self) -> str:
        reason = f"/{self.reason}" if self.reason else ""
        text = f"{self.code.name}{reason}: {self.message}"
        if self.field_violations:
            fields = ", ".join(f"{v.field}: {v.description}" for v in self.field_violations)
            text += f" ({fields})"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self!s}, request_id={self.request_id!r})"


# Classes chosen by status code, for errors without a usersvc reason. The
# reason classes below derive from them where the code always matches, so
# ``except Unavailable`` also catches DatabaseUnavailable.
class Unauthenticated(UsersvcError):
    """UNAUTHENTICATED: no valid credentials."""


class Unavailable(UsersvcError):
    """UNAVAILABLE: the server (or the path to it) cannot answer now; safe to
    retry idempotent calls later."""


class ResourceExhausted(UsersvcError):
    """RESOURCE_EXHAUSTED: too many calls, or a message over a size limit."""


class DeadlineExceeded(UsersvcError):
    """DEADLINE_EXCEEDED: the call's deadline passed. A write may or may not
    have happened."""


# Classes chosen by reason.
class InvalidArgument(UsersvcError):
    """INVALID_ARGUMENT: see ``field_violations`` for the fields."""


class WeakPassword(InvalidArgument):
    """INVALID_ARGUMENT: the password is too short, too long or too common."""


class CodeInvalid(InvalidArgument):
    """INVALID_ARGUMENT: the verification or reset code is wrong, used,
    expired or void (or the email of a reset is unknown: the same answer)."""


class UserNotFound(UsersvcError):
    """NOT_FOUND: no such user (or deleted, for non-admins)."""


class EmailAlreadyExists(UsersvcError):
    """ALREADY_EXISTS: another user (perhaps soft-deleted) has this email."""


class EtagMismatch(UsersvcError):
    """ABORTED: the etag is stale; nothing changed. Read again and retry."""


class InvalidState(UsersvcError):
    """FAILED_PRECONDITION or ALREADY_EXISTS: the user's state forbids the
    call (e.g. undeleting a live user)."""


class TokenInvalid(Unauthenticated):
    """UNAUTHENTICATED: the access token is missing, malformed or foreign."""


class TokenExpired(Unauthenticated):
    """UNAUTHENTICATED: the access token has expired."""


class TokenRevoked(Unauthenticated):
    """UNAUTHENTICATED: the access token's session has ended."""


class InvalidCredentials(Unauthenticated):
    """UNAUTHENTICATED: wrong email or password, or a disabled account."""


class RefreshTokenInvalid(Unauthenticated):
    """UNAUTHENTICATED: the refresh token is unknown, reused or expired."""


class PermissionDenied(UsersvcError):
    """PERMISSION_DENIED: authenticated, but not allowed."""


class RateLimited(ResourceExhausted):
    """RESOURCE_EXHAUSTED: slow down; ``retry_after`` says for how long."""


class DatabaseUnavailable(Unavailable):
    """UNAVAILABLE: the server cannot reach its database."""


class Internal(UsersvcError):
    """INTERNAL: a bug in the server (its log has the details under
    ``request_id``)."""


_BY_REASON: Mapping[str, type[UsersvcError]] = MappingProxyType(
    {
        "INVALID_ARGUMENT": InvalidArgument,
        "WEAK_PASSWORD": WeakPassword,
        "CODE_INVALID": CodeInvalid,
        "USER_NOT_FOUND": UserNotFound,
        "EMAIL_ALREADY_EXISTS": EmailAlreadyExists,
        "ETAG_MISMATCH": EtagMismatch,
        "INVALID_STATE": InvalidState,
        "TOKEN_INVALID": TokenInvalid,
        "TOKEN_EXPIRED": TokenExpired,
        "TOKEN_REVOKED": TokenRevoked,
        "INVALID_CREDENTIALS": InvalidCredentials,
        "REFRESH_TOKEN_INVALID": RefreshTokenInvalid,
        "PERMISSION_DENIED": PermissionDenied,
        "RATE_LIMITED": RateLimited,
        "DATABASE_UNAVAILABLE": DatabaseUnavailable,
        # The server's own deadline check answers with this reason.
        "DEADLINE_EXCEEDED": DeadlineExceeded,
        "INTERNAL": Internal,
    }
)

_BY_CODE: Mapping[grpc.StatusCode, type[UsersvcError]] = MappingProxyType(
    {
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.INTERNAL: Internal,
    }
)


def error_from_rpc(error: grpc.aio.AioRpcError) -> UsersvcError:
    """The typed exception for a failed call. A reason this client does not
    know (a newer server) gives the code's class, or UsersvcError itself,
    with ``reason`` still set. Never raises: an undecodable details trailer
    is ignored."""
    code = error.code()
    message = error.details() or ""
    status = _status_from(error.trailing_metadata())
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN and reason is None:
                reason = info.reason
                metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    error_class = _BY_REASON.get(reason or "") or _BY_CODE.get(code, UsersvcError)
    return error_class(
        code,
        message,
        reason=reason,
        metadata=metadata,
        field_violations=tuple(violations),
        retry_after=retry_after,
        request_id=_request_id_from(error),
    )


def _status_from(trailing: Any) -> status_pb2.Status | None:
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                # A garbled trailer must not hide the error itself.
                return None
    return None


def _request_id_from(error: grpc.aio.AioRpcError) -> str | None:
    # The server echoes the id in the trailers, beside the status; servers
    # from before that sent it in the response headers, read second.
    metadata: tuple[Any, ...] = (error.trailing_metadata(), error.initial_metadata())
    for pairs in metadata:
        for key, value in pairs or ():
            if key == REQUEST_ID_KEY and isinstance(value, str):
                return value
    return None
