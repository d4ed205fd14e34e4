"""An asyncio client for usersvc, for other Python services.

    from usersvc.client import PasswordLogin, UsersvcClient

    async with UsersvcClient.connect(
        "localhost:50051", credentials=PasswordLogin(email, password)
    ) as client:
        me = await client.get_user("me")

Importing it loads grpc, protobuf and the generated stubs only: none of the
server's dependencies (SQLAlchemy, asyncpg, bcrypt), so callers stay light.
"""

from __future__ import annotations

from usersvc.client.client import DEFAULT_TIMEOUT_SECONDS, UsersvcClient
from usersvc.client.credentials import (
    BearerCredentials,
    IssuedTokens,
    PasswordLogin,
    StaticToken,
    TlsConfig,
    TokenEndpoint,
)
from usersvc.client.errors import (
    CodeInvalid,
    DatabaseUnavailable,
    DeadlineExceeded,
    EmailAlreadyExists,
    EtagMismatch,
    FieldViolation,
    Internal,
    InvalidArgument,
    InvalidCredentials,
    InvalidState,
    PermissionDenied,
    RateLimited,
    RefreshTokenInvalid,
    ResourceExhausted,
    TokenExpired,
    TokenInvalid,
    TokenRevoked,
    Unauthenticated,
    Unavailable,
    UserNotFound,
    UsersvcError,
    WeakPassword,
)

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "BearerCredentials",
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
    "IssuedTokens",
    "PasswordLogin",
    "PermissionDenied",
    "RateLimited",
    "RefreshTokenInvalid",
    "ResourceExhausted",
    "StaticToken",
    "TlsConfig",
    "TokenEndpoint",
    "TokenExpired",
    "TokenInvalid",
    "TokenRevoked",
    "Unauthenticated",
    "Unavailable",
    "UserNotFound",
    "UsersvcClient",
    "UsersvcError",
    "WeakPassword",
]
