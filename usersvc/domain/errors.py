"""Every error the service reports on purpose.

Each class carries a stable ``reason`` (the ErrorInfo reason callers program
against); ``usersvc.api.errors`` maps classes to gRPC status codes in one table.
Messages are for people and never contain SQL, hashes, tokens or passwords.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str  # dotted path in the request, e.g. "user.email", "requests[3].password"
    description: str


class DomainError(Exception):
    reason: str = "INTERNAL"
    default_message: str = "internal error"

    def __init__(self, message: str | None = None, *, metadata: Mapping[str, str] | None = None):
        self.message = message or self.default_message
        self.metadata: dict[str, str] = dict(metadata or {})
        super().__init__(self.message)


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"
    default_message = "invalid argument"

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
    ):
        self.violations = tuple(violations)
        if message is None:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or self.default_message, metadata=metadata)

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class WeakPassword(InvalidArgument):
    reason = "WEAK_PASSWORD"
    default_message = "password rejected"


class CodeInvalid(InvalidArgument):
    """A verification or reset code that is wrong, used, voided or
    expired, a code of another user or kind, and an unknown email in
    ResetPassword: one answer for all, so that it tells nothing."""

    reason = "CODE_INVALID"
    default_message = "the code is wrong, used, expired or void"

    def __init__(
        self,
        violations: Sequence[FieldViolation] | None = None,
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(
            violations or [FieldViolation("code", self.default_message)],
            message or self.default_message,
            metadata=metadata,
        )


class UserNotFound(DomainError):
    reason = "USER_NOT_FOUND"
    default_message = "user not found"


class EmailAlreadyExists(DomainError):
    reason = "EMAIL_ALREADY_EXISTS"
    default_message = "email already registered"


class EtagMismatch(DomainError):
    reason = "ETAG_MISMATCH"
    default_message = "etag does not match the current version; read the user again"


class InvalidState(DomainError):
    """The user's state forbids the operation. ``already_exists`` selects
    ALREADY_EXISTS (e.g. undeleting a live user) over FAILED_PRECONDITION."""

    reason = "INVALID_STATE"
    default_message = "the user's state does not allow this operation"

    def __init__(
        self,
        message: str | None = None,
        *,
        already_exists: bool = False,
        metadata: Mapping[str, str] | None = None,
    ):
        self.already_exists = already_exists
        super().__init__(message, metadata=metadata)


class Unauthenticated(DomainError):
    """Base of the UNAUTHENTICATED family."""


class TokenInvalid(Unauthenticated):
    reason = "TOKEN_INVALID"
    default_message = "missing or invalid access token"


class TokenExpired(Unauthenticated):
    reason = "TOKEN_EXPIRED"
    default_message = "access token expired"


class TokenRevoked(Unauthenticated):
    reason = "TOKEN_REVOKED"
    default_message = "access token revoked"


class InvalidCredentials(Unauthenticated):
    reason = "INVALID_CREDENTIALS"
    default_message = "invalid email or password"


class RefreshTokenInvalid(Unauthenticated):
    reason = "REFRESH_TOKEN_INVALID"
    default_message = "refresh token invalid"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"
    default_message = "permission denied"


class RateLimited(DomainError):
    reason = "RATE_LIMITED"
    default_message = "too many requests"

    def __init__(self, retry_after_seconds: float, message: str | None = None):
        self.retry_after_seconds = retry_after_seconds
        super().__init__(message)


class Overloaded(RateLimited):
    """Too many calls of this kind in progress on this server: not the
    caller's rate, the server's capacity (retry later, or elsewhere)."""

    reason = "OVERLOADED"
    default_message = "server busy; retry later"


class DatabaseUnavailable(DomainError):
    reason = "DATABASE_UNAVAILABLE"
    default_message = "database unavailable; retry later"


class DeadlineExceeded(DomainError):
    """The caller's deadline passed before the call completed; its database
    work was cancelled (a write may still have committed just before)."""

    reason = "DEADLINE_EXCEEDED"
    default_message = "deadline exceeded before the call completed"
