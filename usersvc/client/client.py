"""UsersvcClient: one asyncio client for both usersvc services.

Methods take plain Python arguments and return the generated protobuf
messages (``User``, ``ListUsersResponse``, ...), typed by the ``.pyi`` files
shipped in ``generated/``; a response that only wraps one user is unwrapped
to that ``User``. Messages rather than dataclasses of our own: callers get
every field the contract has, including ones added later, without a second
model to keep in step, and they can pass them on as they are.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_pb2,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.client import retries
from usersvc.client.credentials import (
    BearerCredentials,
    IssuedTokens,
    PasswordLogin,
    TlsConfig,
)
from usersvc.client.errors import (
    REQUEST_ID_KEY,
    DatabaseUnavailable,
    TokenExpired,
    TokenRevoked,
    error_from_rpc,
)

__all__ = ["DEFAULT_TIMEOUT_SECONDS", "UsersvcClient"]

DEFAULT_TIMEOUT_SECONDS = 5.0

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class UsersvcClient:
    """A client of usersvc's UserService and AuthService over one channel.

    Open it with ``async with UsersvcClient.connect(target, ...) as client``
    (or wrap a channel of your own with the constructor). Every call:

    - has a deadline: ``timeout`` seconds if given, else ``default_timeout``;
    - carries ``authorization: Bearer ...`` from ``credentials`` (except
      Login, RefreshToken and GetJwks, which are public), and when the
      server refuses that token as expired or revoked, a login credential
      renews it and the call is made once more;
    - carries ``x_request_id`` as ``x-request-id`` if given (the server logs
      it; the echoed id is on every error as ``request_id``);
    - raises a UsersvcError subclass on failure (usersvc.client.errors),
      never grpc.aio.AioRpcError.

    Which calls gRPC retries by itself, and which DATABASE_UNAVAILABLE
    answers the client retries: see usersvc.client.retries.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        credentials: BearerCredentials | None = None,
        default_timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_attempts: int = retries.DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        """Raises ValueError for a max_attempts outside 1..5."""
        if not 1 <= max_attempts <= 5:
            raise ValueError("max_attempts must be 1..5")
        self._channel = channel
        self._credentials = credentials
        self._default_timeout = default_timeout
        self._max_attempts = max_attempts
        self._users: Any = user_service_pb2_grpc.UserServiceStub(channel)
        self._auth: Any = auth_service_pb2_grpc.AuthServiceStub(channel)
        stubs = {retries.USER_SERVICE: self._users, retries.AUTH_SERVICE: self._auth}
        # The multicallables of the methods that are safe to repeat, by
        # identity: the stubs create each one once.
        self._idempotent = frozenset(
            id(getattr(stubs[service], method)) for service, method in retries.RETRIED_METHODS
        )

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        credentials: BearerCredentials | None = None,
        tls: TlsConfig | None = None,
        default_timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_attempts: int = retries.DEFAULT_MAX_ATTEMPTS,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> UsersvcClient:
        """A client on a new channel to ``target`` (``host:port``): TLS with
        ``tls`` (mTLS when it has a client certificate), else plaintext,
        which sends bearer tokens in the clear and so suits only a local
        server. ``max_attempts`` (1..5) bounds gRPC's retries; ``options``
        are extra channel options. Raises ValueError for a bad
        max_attempts."""
        channel_options = retries.channel_options(max_attempts=max_attempts) + list(options)
        if tls is None:
            channel = grpc.aio.insecure_channel(
                target, options=channel_options, interceptors=interceptors
            )
        else:
            if tls.server_name is not None:
                channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
            channel = grpc.aio.secure_channel(
                target,
                tls.channel_credentials(),
                options=channel_options,
                interceptors=interceptors,
            )
        return cls(
            channel,
            credentials=credentials,
            default_timeout=default_timeout,
            max_attempts=max_attempts,
        )

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)

    async def __aenter__(self) -> UsersvcClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ users

    async def create_user(
        self,
        email: str,
        password: str,
        *,
        display_name: str = "",
        roles: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> user_pb2.User:
        """Create a user. ``request_id`` makes the create idempotent; one is
        generated when not given, so gRPC's retries never create twice.
        Raises InvalidArgument, WeakPassword, EmailAlreadyExists,
        PermissionDenied, UsersvcError."""
        request = user_service_pb2.CreateUserRequest(
            email=email,
            password=password,
            display_name=display_name,
            roles=list(roles),
            labels=dict(labels or {}),
            request_id=request_id or _new_request_id(),
        )
        response = await self._call(self._users.CreateUser, request, timeout, x_request_id)
        return _user_of(response)

    async def get_user(
        self, user_id: str = "me", *, timeout: float | None = None, x_request_id: str | None = None
    ) -> user_pb2.User:
        """The user ``user_id`` (``"me"``: the caller). Raises UserNotFound,
        PermissionDenied, UsersvcError."""
        request = user_service_pb2.GetUserRequest(id=user_id)
        return _user_of(await self._call(self._users.GetUser, request, timeout, x_request_id))

    async def lookup_user(
        self, email: str, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> user_pb2.User:
        """The user with ``email`` (any case). Raises UserNotFound,
        PermissionDenied, UsersvcError."""
        request = user_service_pb2.LookupUserRequest(email=email)
        return _user_of(await self._call(self._users.LookupUser, request, timeout, x_request_id))

    async def list_users(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        filter: str = "",
        order_by: str = "",
        show_deleted: bool = False,
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> user_service_pb2.ListUsersResponse:
        """One page of users. Raises InvalidArgument (filter, order_by,
        page token), PermissionDenied, UsersvcError."""
        request = user_service_pb2.ListUsersRequest(
            page_size=page_size,
            page_token=page_token,
            filter=filter,
            order_by=order_by,
            show_deleted=show_deleted,
        )
        response: user_service_pb2.ListUsersResponse = await self._call(
            self._users.ListUsers, request, timeout, x_request_id
        )
        return response

    async def iter_users(
        self,
        *,
        page_size: int = 0,
        filter: str = "",
        order_by: str = "",
        show_deleted: bool = False,
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> AsyncIterator[user_pb2.User]:
        """Every matching user, page after page (each page is one call with
        its own deadline). Raises what list_users raises."""
        page_token = ""
        while True:
            page = await self.list_users(
                page_size=page_size,
                page_token=page_token,
                filter=filter,
                order_by=order_by,
                show_deleted=show_deleted,
                timeout=timeout,
                x_request_id=x_request_id,
            )
            for user in page.users:
                yield user
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def update_user(
        self,
        user_id: str,
        *,
        email: str | None = None,
        display_name: str | None = None,
        roles: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        etag: str = "",
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> user_pb2.User:
        """Change the fields given (not None), and only those: the update
        mask names exactly them, so ``labels={}`` clears the labels. With
        ``etag``, the update happens only if the user is unchanged since it
        was read. Raises EtagMismatch, InvalidArgument, EmailAlreadyExists,
        UserNotFound, InvalidState, PermissionDenied, UsersvcError; ValueError
        when no field is given."""
        user = user_pb2.User(id=user_id, etag=etag)
        paths: list[str] = []
        if email is not None:
            user.email = email
            paths.append("email")
        if display_name is not None:
            user.display_name = display_name
            paths.append("display_name")
        if roles is not None:
            user.roles.extend(roles)
            paths.append("roles")
        if labels is not None:
            user.labels.update(labels)
            paths.append("labels")
        if not paths:
            raise ValueError("update_user needs at least one field to change")
        request = user_service_pb2.UpdateUserRequest(
            user=user, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return _user_of(await self._call(self._users.UpdateUser, request, timeout, x_request_id))

    async def delete_user(
        self,
        user_id: str,
        *,
        etag: str = "",
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> user_pb2.User:
        """Soft-delete; returns the user in state DELETED. Raises
        EtagMismatch, UserNotFound, PermissionDenied, UsersvcError."""
        request = user_service_pb2.DeleteUserRequest(id=user_id, etag=etag)
        return _user_of(await self._call(self._users.DeleteUser, request, timeout, x_request_id))

    async def undelete_user(
        self, user_id: str, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> user_pb2.User:
        """Restore a soft-deleted user (admins). Raises InvalidState (not
        deleted), UserNotFound, PermissionDenied, UsersvcError."""
        request = user_service_pb2.UndeleteUserRequest(id=user_id)
        return _user_of(await self._call(self._users.UndeleteUser, request, timeout, x_request_id))

    async def purge_user(
        self, user_id: str, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> None:
        """Erase the user for good (admins). Raises UserNotFound,
        PermissionDenied, UsersvcError."""
        request = user_service_pb2.PurgeUserRequest(id=user_id)
        await self._call(self._users.PurgeUser, request, timeout, x_request_id)

    async def disable_user(
        self, user_id: str, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> user_pb2.User:
        """Disable the account and end its sessions (admins). Raises
        UserNotFound, InvalidState, PermissionDenied, UsersvcError."""
        request = user_service_pb2.DisableUserRequest(id=user_id)
        return _user_of(await self._call(self._users.DisableUser, request, timeout, x_request_id))

    async def enable_user(
        self, user_id: str, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> user_pb2.User:
        """Enable a disabled account (admins). Raises UserNotFound,
        InvalidState, PermissionDenied, UsersvcError."""
        request = user_service_pb2.EnableUserRequest(id=user_id)
        return _user_of(await self._call(self._users.EnableUser, request, timeout, x_request_id))

    async def change_password(
        self,
        user_id: str,
        *,
        new_password: str,
        current_password: str = "",
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> None:
        """Set a new password (the user itself gives ``current_password``;
        admins need not). Raises InvalidCredentials, WeakPassword,
        UserNotFound, PermissionDenied, UsersvcError."""
        request = user_service_pb2.ChangePasswordRequest(
            id=user_id, current_password=current_password, new_password=new_password
        )
        await self._call(self._users.ChangePassword, request, timeout, x_request_id)

    async def batch_create_users(
        self,
        requests: Iterable[user_service_pb2.CreateUserRequest],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> list[user_pb2.User]:
        """Create up to 1000 users, all or none, in order. ``request_id`` as
        in create_user (generated when not given). Raises InvalidArgument
        (violations name ``requests[i].field``), EmailAlreadyExists,
        PermissionDenied, UsersvcError."""
        request = user_service_pb2.BatchCreateUsersRequest(
            requests=list(requests), request_id=request_id or _new_request_id()
        )
        response = await self._call(self._users.BatchCreateUsers, request, timeout, x_request_id)
        return list(response.users)

    async def batch_get_users(
        self,
        ids: Iterable[str],
        *,
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> list[user_pb2.User]:
        """Users by id, in the order asked. Raises UserNotFound (any one
        missing), InvalidArgument, PermissionDenied, UsersvcError."""
        request = user_service_pb2.BatchGetUsersRequest(ids=list(ids))
        response = await self._call(self._users.BatchGetUsers, request, timeout, x_request_id)
        return list(response.users)

    async def import_users(
        self,
        batches: AsyncIterable[Sequence[user_service_pb2.ImportedUser]]
        | Iterable[Sequence[user_service_pb2.ImportedUser]],
        *,
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> user_service_pb2.ImportUsersResponse:
        """Stream users with existing bcrypt hashes (admins), one request per
        batch (at most 10,000 each); bad rows are reported in the response,
        not raised. Not retried. Raises PermissionDenied, InvalidArgument,
        UsersvcError."""

        async def requests() -> AsyncIterator[user_service_pb2.ImportUsersRequest]:
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield user_service_pb2.ImportUsersRequest(users=list(batch))
            else:
                for batch in batches:
                    yield user_service_pb2.ImportUsersRequest(users=list(batch))

        # A client stream cannot be replayed, so it is never repeated after
        # a token refresh: the token is fetched fresh beforehand instead.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout(timeout)
        _, metadata = await self._metadata(x_request_id, authenticate=True, deadline=deadline)
        try:
            response: user_service_pb2.ImportUsersResponse = await self._users.ImportUsers(
                requests(), timeout=max(0.0, deadline - loop.time()), metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        return response

    # ------------------------------------------------------------------ auth

    async def login(
        self,
        email: str,
        password: str,
        *,
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> auth_service_pb2.LoginResponse:
        """Log in (a new session). This client's own credentials are neither
        used nor changed: use PasswordLogin to have the client log in for
        itself. Raises InvalidCredentials, RateLimited, UsersvcError."""
        request = auth_service_pb2.LoginRequest(email=email, password=password)
        response: auth_service_pb2.LoginResponse = await self._call(
            self._auth.Login, request, timeout, x_request_id, authenticate=False
        )
        return response

    async def refresh_token(
        self, refresh_token: str, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> auth_service_pb2.RefreshTokenResponse:
        """Trade a refresh token for a new pair (the old one is retired).
        Raises RefreshTokenInvalid, UsersvcError."""
        request = auth_service_pb2.RefreshTokenRequest(refresh_token=refresh_token)
        response: auth_service_pb2.RefreshTokenResponse = await self._call(
            self._auth.RefreshToken, request, timeout, x_request_id, authenticate=False
        )
        return response

    async def logout(
        self,
        *,
        refresh_token: str | None = None,
        timeout: float | None = None,
        x_request_id: str | None = None,
    ) -> None:
        """End the caller's session. With PasswordLogin credentials, their
        refresh token is sent along and they forget their tokens (the next
        call logs in again). Raises InvalidState (a certificate identity has
        no session), Unauthenticated, UsersvcError."""
        credentials = self._credentials
        if refresh_token is None and isinstance(credentials, PasswordLogin):
            refresh_token = credentials.refresh_token
        request = auth_service_pb2.LogoutRequest(refresh_token=refresh_token or "")
        await self._call(self._auth.Logout, request, timeout, x_request_id)
        if credentials is not None:
            credentials.forget()

    async def revoke_all_sessions(
        self, user_id: str, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> int:
        """End every session of ``user_id``; returns how many. Raises
        UserNotFound, PermissionDenied, UsersvcError."""
        request = auth_service_pb2.RevokeAllSessionsRequest(user_id=user_id)
        response = await self._call(self._auth.RevokeAllSessions, request, timeout, x_request_id)
        return int(response.revoked_count)

    async def get_jwks(
        self, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> str:
        """The JSON Web Key Set (RFC 7517) that verifies access tokens.
        Raises UsersvcError."""
        request = auth_service_pb2.GetJwksRequest()
        response = await self._call(
            self._auth.GetJwks, request, timeout, x_request_id, authenticate=False
        )
        return str(response.jwks_json)

    async def introspect_token(
        self, token: str, *, timeout: float | None = None, x_request_id: str | None = None
    ) -> auth_service_pb2.IntrospectTokenResponse:
        """Whether ``token`` is valid right now (revocations included), and
        whose it is (admins and services). Raises PermissionDenied,
        UsersvcError; an invalid token is ``active=False``, not an error."""
        request = auth_service_pb2.IntrospectTokenRequest(token=token)
        response: auth_service_pb2.IntrospectTokenResponse = await self._call(
            self._auth.IntrospectToken, request, timeout, x_request_id
        )
        return response

    # ------------------------------------------------------------------ plumbing

    def _timeout(self, timeout: float | None) -> float:
        return self._default_timeout if timeout is None else timeout

    async def _metadata(
        self, x_request_id: str | None, *, authenticate: bool, deadline: float
    ) -> tuple[str | None, list[tuple[str, str]]]:
        """(the access token sent, the call's metadata). A Login or
        RefreshToken the credentials make for it gets the time left until
        ``deadline`` (event loop time), the deadline of the call that needs
        the token."""
        metadata: list[tuple[str, str]] = []
        if x_request_id:
            metadata.append((REQUEST_ID_KEY, x_request_id))
        token = None
        if authenticate and self._credentials is not None:
            token = await self._credentials.access_token(_Endpoint(self, deadline))
            metadata.append(("authorization", f"Bearer {token}"))
        return token, metadata

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
        x_request_id: str | None,
        *,
        authenticate: bool = True,
    ) -> _Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout(timeout)
        renewed = False
        attempt = 1
        while True:
            token, metadata = await self._metadata(
                x_request_id, authenticate=authenticate, deadline=deadline
            )
            try:
                return await method(
                    request, timeout=max(0.0, deadline - loop.time()), metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                error = error_from_rpc(exc)
                cause = exc
            # The server refused the token before running the call, so making
            # the call again with a renewed token cannot do anything twice.
            if (
                not renewed
                and token is not None
                and self._credentials is not None
                and isinstance(error, TokenExpired | TokenRevoked)
                and self._credentials.reject(token)
            ):
                renewed = True
                continue
            # usersvc answers without response headers, so gRPC has already
            # repeated a refused idempotent call (retries.py). It cannot
            # once headers came first, as servers from before the trailer
            # echo send them: such an answer may be repeated here instead,
            # after a backoff that still fits the deadline.
            if (
                isinstance(error, DatabaseUnavailable)
                and id(method) in self._idempotent
                and _came_after_headers(cause)
                and attempt < self._max_attempts
            ):
                pause = retries.database_backoff(attempt)
                if loop.time() + pause < deadline:
                    attempt += 1
                    await asyncio.sleep(pause)
                    continue
            raise error from cause


class _Endpoint:
    """The client's Login and RefreshToken, as a login credential needs them
    for one call: within what is left of that call's ``deadline`` (event
    loop time), never longer than the call itself may take."""

    def __init__(self, client: UsersvcClient, deadline: float) -> None:
        self._client = client
        self._deadline = deadline

    def _remaining(self) -> float:
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def login_tokens(self, email: str, password: str) -> IssuedTokens:
        response = await self._client.login(email, password, timeout=self._remaining())
        return IssuedTokens(response.access_token, response.refresh_token, response.expires_in)

    async def refresh_tokens(self, refresh_token: str) -> IssuedTokens:
        response = await self._client.refresh_token(refresh_token, timeout=self._remaining())
        return IssuedTokens(response.access_token, response.refresh_token, response.expires_in)


def _user_of(response: Any) -> user_pb2.User:
    user: user_pb2.User = response.user
    return user


def _came_after_headers(error: grpc.aio.AioRpcError) -> bool:
    # Custom response headers (an x-request-id echo) mean the answer was not
    # trailers-only, which is what gRPC's retries need (gRFC A6).
    return bool(error.initial_metadata())


def _new_request_id() -> str:
    return uuid.uuid4().hex
