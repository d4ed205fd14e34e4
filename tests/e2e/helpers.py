"""Shared pieces of the end-to-end tier: rich-error decoding, callers that
carry a bearer token, a client interceptor that records every response, and
small factories. Nothing here talks to the database directly; seeding goes
through the service layer and everything under test through gRPC."""

from __future__ import annotations

import itertools
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from log_secrets import SWEEP

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    event_service_pb2_grpc,
    user_pb2,
    user_service_pb2,
    user_service_pb2_grpc,
)

DOMAIN = "usersvc.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Generous: only a hung server should ever hit it, and pytest-timeout is the
# backstop behind it.
CALL_TIMEOUT_SECONDS = 30.0
BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")

# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class RpcFailure:
    """A failed call, with the google.rpc.Status decoded from the trailers."""

    code: grpc.StatusCode
    details: str
    status: status_pb2.Status | None
    error_infos: tuple[error_details_pb2.ErrorInfo, ...]
    bad_requests: tuple[error_details_pb2.BadRequest, ...]
    retry_infos: tuple[error_details_pb2.RetryInfo, ...]
    initial_metadata: tuple[tuple[str, str | bytes], ...]
    trailing_metadata: tuple[tuple[str, str | bytes], ...]

    @property
    def reason(self) -> str:
        assert len(self.error_infos) == 1, f"expected one ErrorInfo, got {self.error_infos}"
        return self.error_infos[0].reason

    @property
    def violation_fields(self) -> list[str]:
        return [v.field for br in self.bad_requests for v in br.field_violations]


def _metadata_pairs(metadata: Any) -> tuple[tuple[str, str | bytes], ...]:
    if not metadata:
        return ()
    return tuple((str(key), value) for key, value in metadata)


def decode_failure(exc: grpc.aio.AioRpcError) -> RpcFailure:
    """Decode the rich error model of a failed call (no assertions)."""
    trailing = _metadata_pairs(exc.trailing_metadata())
    status: status_pb2.Status | None = None
    for key, value in trailing:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
    infos: list[error_details_pb2.ErrorInfo] = []
    bad: list[error_details_pb2.BadRequest] = []
    retry: list[error_details_pb2.RetryInfo] = []
    for detail in status.details if status is not None else ():
        for message_type, bucket in (
            (error_details_pb2.ErrorInfo, infos),
            (error_details_pb2.BadRequest, bad),
            (error_details_pb2.RetryInfo, retry),
        ):
            if detail.Is(message_type.DESCRIPTOR):
                message = message_type()
                detail.Unpack(message)
                bucket.append(message)  # type: ignore[arg-type]
    return RpcFailure(
        code=exc.code(),
        details=exc.details() or "",
        status=status,
        error_infos=tuple(infos),
        bad_requests=tuple(bad),
        retry_infos=tuple(retry),
        initial_metadata=_metadata_pairs(exc.initial_metadata()),
        trailing_metadata=trailing,
    )


async def fails(call: Awaitable[Any]) -> RpcFailure:
    """Await a call that must fail and return its decoded failure."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return decode_failure(info.value)


def assert_rich_error(
    failure: RpcFailure,
    code: grpc.StatusCode,
    reason: str,
    *,
    fields: Iterable[str] | None = None,
) -> None:
    """The status code, exactly one usersvc ErrorInfo with ``reason``, and on
    INVALID_ARGUMENT a BadRequest whose violations name exactly ``fields``
    (when given)."""
    assert failure.code == code, (
        f"expected {code.name}/{reason}, got {failure.code.name}: {failure.details!r} "
        f"{[i.reason for i in failure.error_infos]}"
    )
    assert failure.status is not None, f"{code.name} without {STATUS_DETAILS_KEY}"
    assert failure.status.code == code.value[0]
    assert len(failure.error_infos) == 1, f"expected one ErrorInfo: {failure.error_infos}"
    info = failure.error_infos[0]
    assert info.domain == DOMAIN
    assert info.reason == reason, f"reason {info.reason!r} ({failure.details!r})"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert len(failure.bad_requests) == 1, "INVALID_ARGUMENT without one BadRequest"
        assert failure.violation_fields, "BadRequest without field violations"
        if fields is not None:
            assert set(failure.violation_fields) == set(fields), failure.violation_fields


async def expect_error(
    call: Awaitable[Any],
    code: grpc.StatusCode,
    reason: str,
    *,
    fields: Iterable[str] | None = None,
) -> RpcFailure:
    """Await ``call``, assert it fails with the rich error described, and
    return the failure for further checks."""
    failure = await fails(call)
    assert_rich_error(failure, code, reason, fields=fields)
    return failure


async def expect_invalid(call: Awaitable[Any], *fields: str) -> RpcFailure:
    return await expect_error(
        call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", fields=fields or None
    )


async def expect_denied(call: Awaitable[Any]) -> RpcFailure:
    return await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def expect_not_found(call: Awaitable[Any]) -> RpcFailure:
    return await expect_error(call, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


async def expect_token_invalid(call: Awaitable[Any]) -> RpcFailure:
    return await expect_error(call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def expect_bad_credentials(call: Awaitable[Any]) -> RpcFailure:
    return await expect_error(call, grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


# --------------------------------------------------------------------------- recording


def _method_name(method: Any) -> str:
    return method.decode() if isinstance(method, bytes) else str(method)


@dataclass
class RecordedResponse:
    method: str
    payload: bytes


# The leak search may not cost "every password against every byte": by the
# end of the tier thousands of passwords meet responses of megabytes (the
# heavy pages of test_response_size.py), a minute and a half of teardown that
# way. Each password is indexed by _GRAM_STRIDE byte strings of _GRAM_BYTES
# at consecutive offsets near its end, and a response yields its byte strings
# of that length at every _GRAM_STRIDE-th offset: wherever a password occurs,
# exactly one of its indexed strings starts at such an offset. Only passwords
# whose key turns up (and the few too short to index) are searched with `in`.
_GRAM_BYTES = 8
_GRAM_STRIDE = 8
_INDEXED_BYTES = _GRAM_BYTES + _GRAM_STRIDE - 1


class ResponseRecorder(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Keeps the serialized form of every response and error status the test
    channels receive, so a test can prove no password or hash ever leaves
    the server."""

    def __init__(self) -> None:
        self.responses: list[RecordedResponse] = []
        self.secrets: set[str] = set()
        # The index of the leak search, over the secrets seen so far.
        self._indexed: set[str] = set()
        self._by_gram: dict[bytes, set[str]] = {}
        self._unindexed: set[str] = set()

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = await continuation(client_call_details, request)
        method = _method_name(client_call_details.method)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            self.responses.append(RecordedResponse(method, _failure_bytes(exc)))
            # Awaiting the call again re-raises the same error to the caller.
            return call
        payload = response if isinstance(response, bytes) else response.SerializeToString()
        self.responses.append(RecordedResponse(method, payload))
        return call

    def leaks(self, since: int = 0) -> list[str]:
        """Responses recorded after index ``since`` that carry a bcrypt hash
        or a password the suite used."""
        self._index_new_secrets()
        found = []
        for recorded in self.responses[since:]:
            payload = recorded.payload
            if any(prefix in payload for prefix in BCRYPT_PREFIXES):
                found.append(f"{recorded.method}: bcrypt hash")
            grams = {
                payload[start : start + _GRAM_BYTES]
                for start in range(0, len(payload) - _GRAM_BYTES + 1, _GRAM_STRIDE)
            }
            candidates = set(self._unindexed)
            for gram in grams.intersection(self._by_gram):
                candidates |= self._by_gram[gram]
            for plain in sorted(candidates):
                if plain.encode() in payload:
                    found.append(f"{recorded.method}: password {plain!r}")
        return found

    def _index_new_secrets(self) -> None:
        for plain in self.secrets - self._indexed:
            self._indexed.add(plain)
            encoded = plain.encode()
            if len(encoded) < _INDEXED_BYTES:
                self._unindexed.add(plain)
                continue
            end = len(encoded) - _GRAM_BYTES
            for start in range(end - _GRAM_STRIDE + 1, end + 1):
                self._by_gram.setdefault(encoded[start : start + _GRAM_BYTES], set()).add(plain)


def _failure_bytes(exc: grpc.aio.AioRpcError) -> bytes:
    parts = [(exc.details() or "").encode()]
    for key, value in _metadata_pairs(exc.trailing_metadata()):
        parts.append(key.encode())
        parts.append(value if isinstance(value, bytes) else value.encode())
    return b"\x00".join(parts)


# --------------------------------------------------------------------------- callers


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class _WithMetadata:
    """A stub whose methods add the caller's metadata and a timeout to every
    call; everything else (request, extra metadata) passes through."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]):
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)

        def invoke(request: Message, **kwargs: Any) -> Any:
            metadata = tuple(kwargs.pop("metadata", ())) + self._metadata
            kwargs.setdefault("timeout", CALL_TIMEOUT_SECONDS)
            return method(request, metadata=metadata, **kwargs)

        return invoke


class Caller:
    """Someone calling the service: anonymous when ``token`` is None."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None, name: str = "anonymous"):
        self.name = name
        self.token = token
        self.channel = channel
        metadata = bearer(token) if token is not None else ()
        self.users: Any = _WithMetadata(user_service_pb2_grpc.UserServiceStub(channel), metadata)
        self.auth: Any = _WithMetadata(auth_service_pb2_grpc.AuthServiceStub(channel), metadata)
        self.events: Any = _WithMetadata(event_service_pb2_grpc.EventServiceStub(channel), metadata)

    def __repr__(self) -> str:
        return f"Caller({self.name})"


class Account(Caller):
    """A user that exists and has logged in through AuthService.Login."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        login: auth_service_pb2.LoginResponse,
        *,
        password: str,
        name: str,
    ):
        super().__init__(channel, login.access_token, name)
        self.login = login
        self.id = login.user.id
        self.email = login.user.email
        self.password = password
        self.roles = tuple(login.user.roles)

    def __repr__(self) -> str:
        return f"Account({self.name}, {self.email})"


# --------------------------------------------------------------------------- factories

_counter = itertools.count(1)


def new_email(prefix: str = "user", domain: str = "example.com") -> str:
    """A unique, lower-case email."""
    return f"{prefix}-{next(_counter):05d}-{secrets.token_hex(3)}@{domain}"


def missing_id() -> str:
    """A well-formed id that names no user."""
    return str(uuid.uuid4())


def create_request(
    recorder: ResponseRecorder,
    *,
    email: str | None = None,
    password: str | None = None,
    display_name: str = "",
    roles: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    request_id: str = "",
) -> user_service_pb2.CreateUserRequest:
    return user_service_pb2.CreateUserRequest(
        email=email if email is not None else new_email(),
        password=password if password is not None else new_password(recorder),
        display_name=display_name,
        roles=list(roles),
        labels=dict(labels or {}),
        request_id=request_id,
    )


def new_password(recorder: ResponseRecorder) -> str:
    """A strong, unique password, remembered so the leak check looks for it."""
    password = f"Pw-{secrets.token_hex(8)}!"
    recorder.secrets.add(password)
    SWEEP.ledger.add("password", password)
    return password


# --------------------------------------------------------------------------- tokens


def unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a JWT, read without checking the signature."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return header, claims


def mint_token(
    key: Ed25519PrivateKey,
    *,
    kid: str,
    claims: Mapping[str, Any],
    typ: str = "at+jwt",
    algorithm: str = "EdDSA",
) -> str:
    token = jwt.encode(dict(claims), key, algorithm=algorithm, headers={"kid": kid, "typ": typ})
    SWEEP.ledger.add("access token (minted)", token)
    return token


def claims_like(template: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """A copy of a real token's claims with a fresh jti and some overrides."""
    claims = dict(template)
    claims["jti"] = secrets.token_hex(16)
    claims.update(overrides)
    return claims


def now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- world


class World:
    """The users one test runs against: an admin, a service account and two
    plain users (alice, bob), all logged in through AuthService.Login.

    Seeding goes through the service layer (as an operator would with
    ``usersvc create-admin``); every behaviour under test goes through gRPC.
    """

    def __init__(self, *, user_service: Any, channel: grpc.aio.Channel, recorder: ResponseRecorder):
        self.user_service = user_service
        self.channel = channel
        self.recorder = recorder
        self.anonymous = Caller(channel, None)
        self.admin: Account
        self.service: Account
        self.alice: Account
        self.bob: Account

    async def populate(self) -> World:
        self.admin = await self.account("admin", roles=("user", "admin"))
        self.service = await self.account("service", roles=("service",))
        self.alice = await self.account("alice")
        self.bob = await self.account("bob")
        return self

    async def seed_user(
        self,
        *,
        email: str | None = None,
        password: str | None = None,
        display_name: str = "",
        roles: Sequence[str] = ("user",),
        labels: Mapping[str, str] | None = None,
    ) -> tuple[str, str, str]:
        """Create a user through the service layer; returns (id, email, password)."""
        from usersvc.domain.models import ROLE_ADMIN, Principal, PrincipalKind
        from usersvc.services.inputs import CreateUserInput

        operator = Principal(
            kind=PrincipalKind.SERVICE, subject="e2e-seed", roles=frozenset({ROLE_ADMIN})
        )
        password = password if password is not None else new_password(self.recorder)
        SWEEP.ledger.add("password", password)
        user = await self.user_service.create_user(
            principal=operator,
            request=CreateUserInput(
                email=email if email is not None else new_email(),
                password=password,
                display_name=display_name,
                roles=tuple(roles),
                labels=dict(labels or {}),
            ),
        )
        return str(user.id), user.email, password

    async def login(self, email: str, password: str) -> auth_service_pb2.LoginResponse:
        response: auth_service_pb2.LoginResponse = await self.anonymous.auth.Login(
            auth_service_pb2.LoginRequest(email=email, password=password)
        )
        return response

    async def account(
        self,
        name: str,
        *,
        roles: Sequence[str] = ("user",),
        display_name: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> Account:
        _, email, password = await self.seed_user(
            email=new_email(name),
            display_name=display_name or name.title(),
            roles=roles,
            labels=labels,
        )
        login = await self.login(email, password)
        return Account(self.channel, login, password=password, name=name)

    async def get_as_admin(self, user_id: str) -> user_pb2.User:
        response = await self.admin.users.GetUser(user_service_pb2.GetUserRequest(id=user_id))
        return response.user
