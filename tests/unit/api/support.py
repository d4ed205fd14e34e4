"""Fakes and helpers for the API layer's unit tests: a fake user service, a
fake auth service, a real grpc.aio server on 127.0.0.1:0 running the real
servicers behind the real interceptors, and readers of rich statuses."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from usersvc_protos.v1 import auth_service_pb2_grpc, user_service_pb2_grpc
from usersvc.api.auth_servicer import AuthServicer
from usersvc.api.interceptors import build_interceptors
from usersvc.api.public import PublicMethods
from usersvc.api.user_servicer import UserServicer
from usersvc.domain import errors
from usersvc.domain.models import Principal, PrincipalKind, User
from usersvc.domain.role_checks import RoleCheck
from usersvc.services.bulk_import import ImportResult, ImportRow, ImportRowError
from usersvc.services.inputs import (
    CreateUserInput,
    ListUsersInput,
    LoginResult,
    TokenIntrospection,
    UpdateUserInput,
    UserListResult,
)

GOOD_TOKEN = "good.access.token"
EXPIRED_TOKEN = "expired.access.token"
CALLER_ID = "0190b4a4-7d40-7c3e-9a51-6a1b2c3d4e5f"
CALLER = Principal(
    kind=PrincipalKind.USER, subject=CALLER_ID, roles=frozenset({"user"}), session_id="s1"
)
ANONYMOUS_CALLER = Principal(kind=PrincipalKind.ANONYMOUS)
DETAILS_KEY = "grpc-status-details-bin"
fake_logger = logging.getLogger("tests.fake_user_service")


def make_user(**overrides: Any) -> User:
    moment = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    user = User(
        id=uuid.UUID(CALLER_ID),
        email="ada@example.com",
        display_name="Ada",
        roles=("user",),
        labels={"team": "payments"},
        create_time=moment,
        update_time=moment,
        disable_time=None,
        delete_time=None,
        version=3,
    )
    return replace(user, **overrides)


@dataclass
class Call:
    method: str
    principal: Principal
    kwargs: dict[str, Any]


@dataclass
class FakeUserService:
    """Records each call; raises ``error`` when one is set."""

    calls: list[Call] = field(default_factory=list)
    error: BaseException | None = None
    user: User = field(default_factory=make_user)
    # When set, lookup_user signals `entered` and then waits for ever.
    hang: bool = False
    # The rows import_users read, in order.
    imported_rows: list[ImportRow] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    # The role re-check each plain read was handed (None: none pending).
    role_checks: list[RoleCheck | None] = field(default_factory=list)

    def _record(self, method: str, principal: Principal, **kwargs: Any) -> None:
        self.calls.append(Call(method, principal, kwargs))
        if self.error is not None:
            raise self.error

    async def create_user(
        self,
        *,
        principal: Principal,
        request: CreateUserInput,
        role_check: RoleCheck | None = None,
    ) -> User:
        self.role_checks.append(role_check)
        self._record("create_user", principal, request=request)
        return self.user

    async def get_user(
        self, *, principal: Principal, user_id: str, role_check: RoleCheck | None = None
    ) -> User:
        fake_logger.info("fake get_user")
        self.role_checks.append(role_check)
        self._record("get_user", principal, user_id=user_id)
        return self.user

    async def lookup_user(
        self, *, principal: Principal, email: str, role_check: RoleCheck | None = None
    ) -> User:
        self.role_checks.append(role_check)
        self._record("lookup_user", principal, email=email)
        if self.hang:
            self.entered.set()
            await asyncio.Event().wait()
        return self.user

    async def list_users(
        self,
        *,
        principal: Principal,
        request: ListUsersInput,
        role_check: RoleCheck | None = None,
    ) -> UserListResult:
        self.role_checks.append(role_check)
        self._record("list_users", principal, request=request)
        return UserListResult(users=(self.user,), next_page_token="next", total_size=7)

    async def update_user(
        self,
        *,
        principal: Principal,
        request: UpdateUserInput,
        role_check: RoleCheck | None = None,
    ) -> User:
        self.role_checks.append(role_check)
        self._record("update_user", principal, request=request)
        return self.user

    async def delete_user(self, *, principal: Principal, user_id: str, etag: str) -> User:
        self._record("delete_user", principal, user_id=user_id, etag=etag)
        return replace(self.user, delete_time=self.user.update_time)

    async def undelete_user(self, *, principal: Principal, user_id: str) -> User:
        self._record("undelete_user", principal, user_id=user_id)
        return self.user

    async def disable_user(self, *, principal: Principal, user_id: str) -> User:
        self._record("disable_user", principal, user_id=user_id)
        return replace(self.user, disable_time=self.user.update_time)

    async def enable_user(self, *, principal: Principal, user_id: str) -> User:
        self._record("enable_user", principal, user_id=user_id)
        return self.user

    async def purge_user(self, *, principal: Principal, user_id: str) -> None:
        self._record("purge_user", principal, user_id=user_id)

    async def change_password(
        self, *, principal: Principal, user_id: str, current_password: str, new_password: str
    ) -> None:
        self._record(
            "change_password",
            principal,
            user_id=user_id,
            current_password=current_password,
            new_password=new_password,
        )

    async def batch_create_users(
        self, *, principal: Principal, requests: Sequence[CreateUserInput], request_id: str
    ) -> list[User]:
        self._record("batch_create_users", principal, requests=requests, request_id=request_id)
        return [replace(self.user, email=r.email) for r in requests]

    async def batch_get_users(
        self,
        *,
        principal: Principal,
        user_ids: Sequence[str],
        role_check: RoleCheck | None = None,
    ) -> list[User]:
        self.role_checks.append(role_check)
        self._record("batch_get_users", principal, user_ids=user_ids)
        return [replace(self.user, id=uuid.UUID(i)) for i in user_ids]

    async def import_users(
        self, *, principal: Principal, rows: AsyncIterable[ImportRow]
    ) -> ImportResult:
        """Refuses (``error``) before reading a row, like the real service;
        otherwise reads every row into ``imported_rows`` and reports row 1,
        when there is one, as failed."""
        self._record("import_users", principal)
        self.imported_rows = [row async for row in rows]
        failed = tuple(
            ImportRowError(1, "password_hash", "INVALID_PASSWORD_HASH", "not a bcrypt hash")
            for _ in self.imported_rows[1:2]
        )
        return ImportResult(
            imported_count=len(self.imported_rows) - len(failed),
            failed_count=len(failed),
            errors=failed,
        )


class FakeAuthService:
    """Knows one good token; login and refresh always succeed. Records the
    session calls in ``calls``; raises ``error`` from them when one is set."""

    def __init__(self) -> None:
        self.tokens_seen: list[str] = []
        self.calls: list[Call] = []
        self.error: BaseException | None = None
        self.introspection = TokenIntrospection(
            active=True,
            subject=CALLER_ID,
            roles=("admin", "user"),
            session_id="s1",
            expire_time=datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
        )

    def _record(self, method: str, principal: Principal, **kwargs: Any) -> None:
        self.calls.append(Call(method, principal, kwargs))
        if self.error is not None:
            raise self.error

    def authenticate(self, token: str) -> Principal:
        self.tokens_seen.append(token)
        if token == GOOD_TOKEN:
            return CALLER
        if token == EXPIRED_TOKEN:
            raise errors.TokenExpired()
        raise errors.TokenInvalid()

    async def login(self, *, email: str, password: str) -> LoginResult:
        return LoginResult(
            access_token="at",
            refresh_token="rt",
            token_type="Bearer",
            expires_in=900,
            user=make_user(email=email),
        )

    async def refresh_token(self, *, refresh_token: str) -> LoginResult:
        self._record("refresh_token", ANONYMOUS_CALLER, refresh_token=refresh_token)
        return LoginResult(
            access_token="at2",
            refresh_token="rt2",
            token_type="Bearer",
            expires_in=900,
            user=make_user(),
        )

    async def logout(self, *, principal: Principal, refresh_token: str = "") -> None:
        self._record("logout", principal, refresh_token=refresh_token)

    async def revoke_all_sessions(self, *, principal: Principal, user_id: str) -> int:
        self._record("revoke_all_sessions", principal, user_id=user_id)
        return 3

    async def introspect_token(self, *, principal: Principal, token: str) -> TokenIntrospection:
        self._record("introspect_token", principal, token=token)
        return self.introspection

    def jwks_json(self) -> str:
        return '{"keys": []}'


class AsyncFakeAuthService(FakeAuthService):
    async def authenticate(self, token: str) -> Principal:  # type: ignore[override]
        return FakeAuthService.authenticate(self, token)


@dataclass
class RunningServer:
    channel: grpc.aio.Channel
    users: FakeUserService
    auth: FakeAuthService
    user_stub: user_service_pb2_grpc.UserServiceStub
    auth_stub: auth_service_pb2_grpc.AuthServiceStub


async def start_server(
    auth: FakeAuthService, *, auth_servicer: Any = None, users: FakeUserService | None = None
) -> tuple[grpc.aio.Server, int, FakeUserService]:
    """``auth_servicer`` replaces AuthServicer(auth) as the AuthService;
    ``users`` replaces a new FakeUserService."""
    users = users if users is not None else FakeUserService()
    server = grpc.aio.server(
        interceptors=build_interceptors(
            auth_service=auth, public_methods=PublicMethods(allow_signup=True)
        )
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(users), server)
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(
        auth_servicer if auth_servicer is not None else AuthServicer(auth), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        ("usersvc.v1.UserService", health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port, users


def bearer(token: str = GOOD_TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def rich_status_from_metadata(trailing_metadata: Any) -> status_pb2.Status:
    """The google.rpc.Status in ``grpc-status-details-bin``; fails the test
    when there is none."""
    for key, value in trailing_metadata or ():
        if key == DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    pytest.fail("no grpc-status-details-bin in the trailing metadata")


def unpack_details(status: status_pb2.Status) -> dict[str, list[Message]]:
    """Detail messages by type name: ErrorInfo, BadRequest, RetryInfo."""
    types: dict[str, type[Message]] = {
        "ErrorInfo": error_details_pb2.ErrorInfo,
        "BadRequest": error_details_pb2.BadRequest,
        "RetryInfo": error_details_pb2.RetryInfo,
    }
    found: dict[str, list[Message]] = {}
    for packed in status.details:
        name = packed.TypeName().rsplit(".", 1)[-1]
        message = types[name]()
        packed.Unpack(message)
        found.setdefault(name, []).append(message)
    return found


def only_error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    infos = unpack_details(status).get("ErrorInfo", [])
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {len(infos)}"
    info = infos[0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info
