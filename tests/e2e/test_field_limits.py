"""Every string, list and map field of every request has a maximum: written
in the proto comment (what reflection serves), and enforced by a real server.

``LIMITS`` is the table: one row per way a field can be too big, each with
the call that sends one unit over the limit and the answer the contract
promises. Credential fields answer as the credential contract says (a
password that cannot match is INVALID_CREDENTIALS, a malformed refresh token
REFRESH_TOKEN_INVALID, an oversized introspected token inactive); every
other field answers INVALID_ARGUMENT with a violation naming it. The first
two tests keep the table complete and the protos honest: a new request
field without a row, or a row whose maximum the proto comment does not
state, fails them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import field_mask_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .helpers import (
    World,
    auth_service_pb2,
    claims_like,
    create_request,
    expect_error,
    expect_invalid,
    mint_token,
    unverified_parts,
    user_pb2,
    user_service_pb2,
)

PROTO_DIR = Path(__file__).resolve().parents[2] / "protos" / "usersvc" / "v1"
INVALID = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
WEAK = (grpc.StatusCode.INVALID_ARGUMENT, "WEAK_PASSWORD")
BAD_CREDENTIALS = (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
BAD_REFRESH = (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_INVALID")
INACTIVE = "inactive"
# ImportUsers succeeds and lists the row as failed, for this reason.
ROW_INVALID = (grpc.StatusCode.OK, "INVALID_ARGUMENT")

# One character over each maximum.
EMAIL_255 = "a" * 243 + "@example.com"
ID_37 = "0" * 37
UUIDS_1001 = [str(uuid.uuid4()) for _ in range(1001)]
PASSWORD_73_BYTES = "Pw-" + "x" * 70
ETAG_65 = "v" * 65
LABELS_65 = {f"k{i}": "v" for i in range(65)}
ROLES_17 = ["user"] * 17
TOKEN_47 = "rt_" + "A" * 44
CODE_65 = "A" * 65
# A well-formed bcrypt hash (cost 4).
BCRYPT_HASH = "$2b$04$Svru9xUp63Tg3ojPEEy/buT7mQ9cR71FGvUmXAJSjrBpPfx/2rjB6"

Call = Callable[[World], Awaitable[Any]]


@dataclass(frozen=True)
class Limit:
    message: str  # full name of the message that holds the field
    field: str
    documented: str  # text the field's proto comment must contain
    case: str  # what is over the limit
    call: Call
    expect: tuple[grpc.StatusCode, str] | str
    violations: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.message, self.field


def _update(world: World, user: user_pb2.User, *paths: str) -> Awaitable[Any]:
    return world.admin.users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        )
    )


def _own(world: World, **fields: Any) -> user_pb2.User:
    return user_pb2.User(id=world.alice.id, **fields)


def _create(world: World, **fields: Any) -> Awaitable[Any]:
    return world.admin.users.CreateUser(create_request(world.recorder, **fields))


def _batch_create(world: World, count: int, **fields: Any) -> Awaitable[Any]:
    # One fixed password: a fresh one per item would grow the recorder's
    # list of secrets that every later response is searched for.
    requests = [
        create_request(world.recorder, password="Pw-batch-item-1", **fields) for _ in range(count)
    ]
    return world.admin.users.BatchCreateUsers(
        user_service_pb2.BatchCreateUsersRequest(requests=requests)
    )


def _list(world: World, **fields: Any) -> Awaitable[Any]:
    return world.admin.users.ListUsers(user_service_pb2.ListUsersRequest(**fields))


def _imported(**fields: Any) -> user_service_pb2.ImportedUser:
    values: dict[str, Any] = {"email": "row@import-limits.example.com"}
    values.update(fields)
    values.setdefault("password_hash", BCRYPT_HASH)
    return user_service_pb2.ImportedUser(**values)


def _import(world: World, *users: user_service_pb2.ImportedUser) -> Awaitable[Any]:
    async def stream() -> AsyncIterator[user_service_pb2.ImportUsersRequest]:
        yield user_service_pb2.ImportUsersRequest(users=users)

    return world.admin.users.ImportUsers(stream())


CREATE = "usersvc.v1.CreateUserRequest"
USER = "usersvc.v1.User"
LIST = "usersvc.v1.ListUsersRequest"
IMPORTED = "usersvc.v1.ImportedUser"

LIMITS: tuple[Limit, ...] = (
    # -- UserService -----------------------------------------------------------------------
    Limit(
        CREATE,
        "email",
        "254",
        "255 characters",
        lambda w: _create(w, email=EMAIL_255),
        INVALID,
        ("email",),
    ),
    Limit(
        CREATE,
        "password",
        "72 UTF-8 bytes",
        "73 bytes",
        lambda w: _create(w, password=PASSWORD_73_BYTES),
        WEAK,
        ("password",),
    ),
    Limit(
        CREATE,
        "display_name",
        "200",
        "201 characters",
        lambda w: _create(w, display_name="d" * 201),
        INVALID,
        ("display_name",),
    ),
    Limit(
        CREATE,
        "roles",
        "16 entries",
        "17 entries",
        lambda w: _create(w, roles=ROLES_17),
        INVALID,
        ("roles",),
    ),
    Limit(
        CREATE,
        "labels",
        "64 entries",
        "65 entries",
        lambda w: _create(w, labels=LABELS_65),
        INVALID,
        ("labels",),
    ),
    Limit(
        CREATE,
        "labels",
        "1..63 characters",
        "a 64-character key",
        lambda w: _create(w, labels={"k" * 64: "v"}),
        INVALID,
        ("labels",),
    ),
    Limit(
        CREATE,
        "labels",
        "values at most 256",
        "a 257-character value",
        lambda w: _create(w, labels={"team": "v" * 257}),
        INVALID,
        ("labels.team",),
    ),
    Limit(
        CREATE,
        "request_id",
        "128",
        "129 characters",
        lambda w: _create(w, request_id="r" * 129),
        INVALID,
        ("request_id",),
    ),
    Limit(
        "usersvc.v1.GetUserRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.GetUser(user_service_pb2.GetUserRequest(id=ID_37)),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.LookupUserRequest",
        "email",
        "254",
        "255 characters",
        lambda w: w.admin.users.LookupUser(user_service_pb2.LookupUserRequest(email=EMAIL_255)),
        INVALID,
        ("email",),
    ),
    Limit(
        LIST,
        "page_token",
        "1024",
        "1025 characters",
        lambda w: _list(w, page_token="A" * 1025),
        INVALID,
        ("page_token",),
    ),
    Limit(
        LIST,
        "filter",
        "2048",
        "2049 characters",
        lambda w: _list(w, filter='email:"' + "x" * 2041 + '"'),
        INVALID,
        ("filter",),
    ),
    Limit(
        LIST,
        "filter",
        "20 comparisons",
        "21 comparisons",
        lambda w: _list(w, filter=" AND ".join(["state = STATE_ACTIVE"] * 21)),
        INVALID,
        ("filter",),
    ),
    Limit(
        LIST,
        "order_by",
        "128",
        "129 characters",
        lambda w: _list(w, order_by="email" + " " * 124),
        INVALID,
        ("order_by",),
    ),
    Limit(
        USER,
        "id",
        "36 characters",
        "37 characters (UpdateUser)",
        lambda w: _update(w, user_pb2.User(id=ID_37, display_name="x"), "display_name"),
        INVALID,
        ("user.id",),
    ),
    Limit(
        USER,
        "email",
        "254",
        "255 characters (UpdateUser, in the mask)",
        lambda w: _update(w, _own(w, email=EMAIL_255), "email"),
        INVALID,
        ("user.email",),
    ),
    Limit(
        USER,
        "email",
        "254",
        "255 characters (UpdateUser, outside the mask)",
        lambda w: _update(w, _own(w, email=EMAIL_255, display_name="x"), "display_name"),
        INVALID,
        ("user.email",),
    ),
    Limit(
        USER,
        "display_name",
        "200",
        "201 characters (UpdateUser)",
        lambda w: _update(w, _own(w, display_name="d" * 201), "display_name"),
        INVALID,
        ("user.display_name",),
    ),
    Limit(
        USER,
        "roles",
        "16 entries",
        "17 entries (UpdateUser)",
        lambda w: _update(w, _own(w, roles=ROLES_17), "roles"),
        INVALID,
        ("user.roles",),
    ),
    Limit(
        USER,
        "labels",
        "64 entries",
        "65 entries (UpdateUser, in the mask)",
        lambda w: _update(w, _own(w, labels=LABELS_65), "labels"),
        INVALID,
        ("user.labels",),
    ),
    Limit(
        USER,
        "labels",
        "64 entries",
        "65 entries (UpdateUser, outside the mask)",
        lambda w: _update(w, _own(w, labels=LABELS_65, display_name="x"), "display_name"),
        INVALID,
        ("user.labels",),
    ),
    Limit(
        USER,
        "etag",
        "64 characters",
        "65 characters (UpdateUser)",
        lambda w: _update(w, _own(w, display_name="x", etag=ETAG_65), "display_name"),
        INVALID,
        ("user.etag",),
    ),
    Limit(
        "google.protobuf.FieldMask",
        "paths",
        "At most 10 paths",
        "11 paths",
        lambda w: _update(w, _own(w, display_name="x"), *["display_name"] * 11),
        INVALID,
        ("update_mask",),
    ),
    Limit(
        "google.protobuf.FieldMask",
        "paths",
        "each at most 64",
        "a 65-character path",
        lambda w: _update(w, _own(w, display_name="x"), "p" * 65),
        INVALID,
        ("update_mask",),
    ),
    Limit(
        "usersvc.v1.DeleteUserRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=ID_37)),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.DeleteUserRequest",
        "etag",
        "64 characters",
        "65 characters",
        lambda w: w.alice.users.DeleteUser(
            user_service_pb2.DeleteUserRequest(id="me", etag=ETAG_65)
        ),
        INVALID,
        ("etag",),
    ),
    Limit(
        "usersvc.v1.UndeleteUserRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.UndeleteUser(user_service_pb2.UndeleteUserRequest(id=ID_37)),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.PurgeUserRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.PurgeUser(user_service_pb2.PurgeUserRequest(id=ID_37)),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.DisableUserRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.DisableUser(user_service_pb2.DisableUserRequest(id=ID_37)),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.EnableUserRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.EnableUser(user_service_pb2.EnableUserRequest(id=ID_37)),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.ChangePasswordRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.ChangePassword(
            user_service_pb2.ChangePasswordRequest(id=ID_37, new_password="Pw-fine-12345")
        ),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.ChangePasswordRequest",
        "current_password",
        "72 UTF-8 bytes",
        "73 bytes",
        lambda w: w.alice.users.ChangePassword(
            user_service_pb2.ChangePasswordRequest(
                id="me", current_password=PASSWORD_73_BYTES, new_password="Pw-fine-12345"
            )
        ),
        BAD_CREDENTIALS,
    ),
    Limit(
        "usersvc.v1.ChangePasswordRequest",
        "new_password",
        "72 UTF-8 bytes",
        "73 bytes",
        lambda w: w.admin.users.ChangePassword(
            user_service_pb2.ChangePasswordRequest(id=w.bob.id, new_password=PASSWORD_73_BYTES)
        ),
        WEAK,
        ("new_password",),
    ),
    Limit(
        "usersvc.v1.BatchCreateUsersRequest",
        "requests",
        "1..1000",
        "1001 items",
        lambda w: _batch_create(w, 1001),
        INVALID,
        ("requests",),
    ),
    Limit(
        "usersvc.v1.BatchCreateUsersRequest",
        "requests",
        "limits of CreateUserRequest",
        "an item's 201-character display_name",
        lambda w: _batch_create(w, 1, display_name="d" * 201),
        INVALID,
        ("requests[0].display_name",),
    ),
    Limit(
        "usersvc.v1.BatchCreateUsersRequest",
        "request_id",
        "128",
        "129 characters",
        lambda w: w.admin.users.BatchCreateUsers(
            user_service_pb2.BatchCreateUsersRequest(
                requests=[create_request(w.recorder)], request_id="r" * 129
            )
        ),
        INVALID,
        ("request_id",),
    ),
    Limit(
        "usersvc.v1.BatchGetUsersRequest",
        "ids",
        "1..1000",
        "1001 ids",
        lambda w: w.admin.users.BatchGetUsers(
            user_service_pb2.BatchGetUsersRequest(ids=UUIDS_1001)
        ),
        INVALID,
        ("ids",),
    ),
    Limit(
        "usersvc.v1.BatchGetUsersRequest",
        "ids",
        "36 characters each",
        "a 37-character id",
        lambda w: w.admin.users.BatchGetUsers(user_service_pb2.BatchGetUsersRequest(ids=[ID_37])),
        INVALID,
        ("ids[0]",),
    ),
    Limit(
        "usersvc.v1.ImportUsersRequest",
        "users",
        "10000 users",
        "10001 users in a message",
        lambda w: _import(w, *[user_service_pb2.ImportedUser()] * 10_001),
        INVALID,
        ("users",),
    ),
    # An imported row over a limit fails that row only: the call succeeds
    # and reports it (ImportUsersResponse.errors).
    Limit(
        IMPORTED,
        "email",
        "254",
        "255 characters",
        lambda w: _import(w, _imported(email=EMAIL_255)),
        ROW_INVALID,
        ("email",),
    ),
    Limit(
        IMPORTED,
        "password_hash",
        "exactly 60 characters",
        "61 characters",
        lambda w: _import(w, _imported(password_hash=BCRYPT_HASH + "a")),
        (grpc.StatusCode.OK, "INVALID_PASSWORD_HASH"),
        ("password_hash",),
    ),
    Limit(
        IMPORTED,
        "display_name",
        "200",
        "201 characters",
        lambda w: _import(w, _imported(display_name="d" * 201)),
        ROW_INVALID,
        ("display_name",),
    ),
    Limit(
        IMPORTED,
        "roles",
        "16 entries",
        "17 entries",
        lambda w: _import(w, _imported(roles=ROLES_17)),
        ROW_INVALID,
        ("roles",),
    ),
    Limit(
        IMPORTED,
        "labels",
        "64 entries",
        "65 entries",
        lambda w: _import(w, _imported(labels=LABELS_65)),
        ROW_INVALID,
        ("labels",),
    ),
    Limit(
        IMPORTED,
        "labels",
        "values at most 256",
        "a 257-character value",
        lambda w: _import(w, _imported(labels={"team": "v" * 257})),
        ROW_INVALID,
        ("labels.team",),
    ),
    Limit(
        "usersvc.v1.BatchUpdateUsersRequest",
        "requests",
        "1..1000",
        "1001 items",
        lambda w: w.admin.users.BatchUpdateUsers(
            user_service_pb2.BatchUpdateUsersRequest(
                requests=[user_service_pb2.UpdateUserRequest(user=_own(w, display_name="x"))] * 1001
            )
        ),
        INVALID,
        ("requests",),
    ),
    Limit(
        "usersvc.v1.BatchDeleteUsersRequest",
        "requests",
        "1..1000",
        "1001 items",
        lambda w: w.admin.users.BatchDeleteUsers(
            user_service_pb2.BatchDeleteUsersRequest(
                requests=[user_service_pb2.DeleteUserRequest(id=w.bob.id)] * 1001
            )
        ),
        INVALID,
        ("requests",),
    ),
    Limit(
        "usersvc.v1.CreateEmailVerificationCodeRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.CreateEmailVerificationCode(
            user_service_pb2.CreateEmailVerificationCodeRequest(id=ID_37)
        ),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.VerifyEmailRequest",
        "id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.users.VerifyEmail(
            user_service_pb2.VerifyEmailRequest(id=ID_37, code="ABCDEFGH")
        ),
        INVALID,
        ("id",),
    ),
    Limit(
        "usersvc.v1.VerifyEmailRequest",
        "code",
        "64 characters",
        "65 characters",
        lambda w: w.alice.users.VerifyEmail(
            user_service_pb2.VerifyEmailRequest(id="me", code=CODE_65)
        ),
        INVALID,
        ("code",),
    ),
    Limit(
        "usersvc.v1.CreatePasswordResetCodeRequest",
        "email",
        "254",
        "255 characters",
        lambda w: w.service.users.CreatePasswordResetCode(
            user_service_pb2.CreatePasswordResetCodeRequest(email=EMAIL_255)
        ),
        INVALID,
        ("email",),
    ),
    Limit(
        "usersvc.v1.ResetPasswordRequest",
        "email",
        "254",
        "255 characters",
        lambda w: w.anonymous.users.ResetPassword(
            user_service_pb2.ResetPasswordRequest(
                email=EMAIL_255, code="ABCDEFGH", new_password="Pw-fine-12345"
            )
        ),
        INVALID,
        ("email",),
    ),
    Limit(
        "usersvc.v1.ResetPasswordRequest",
        "code",
        "64 characters",
        "65 characters",
        lambda w: w.anonymous.users.ResetPassword(
            user_service_pb2.ResetPasswordRequest(
                email=w.alice.email, code=CODE_65, new_password="Pw-fine-12345"
            )
        ),
        INVALID,
        ("code",),
    ),
    Limit(
        "usersvc.v1.ResetPasswordRequest",
        "new_password",
        "72 UTF-8 bytes",
        "73 bytes",
        lambda w: w.anonymous.users.ResetPassword(
            user_service_pb2.ResetPasswordRequest(
                email=w.alice.email, code="ABCDEFGH", new_password=PASSWORD_73_BYTES
            )
        ),
        WEAK,
        ("new_password",),
    ),
    # -- AuthService -----------------------------------------------------------------------
    Limit(
        "usersvc.v1.LoginRequest",
        "email",
        "254",
        "255 characters",
        lambda w: w.anonymous.auth.Login(
            auth_service_pb2.LoginRequest(email=EMAIL_255, password=w.alice.password)
        ),
        BAD_CREDENTIALS,
    ),
    Limit(
        "usersvc.v1.LoginRequest",
        "password",
        "72 UTF-8 bytes",
        "73 bytes",
        lambda w: w.anonymous.auth.Login(
            auth_service_pb2.LoginRequest(email=w.alice.email, password=PASSWORD_73_BYTES)
        ),
        BAD_CREDENTIALS,
    ),
    Limit(
        "usersvc.v1.RefreshTokenRequest",
        "refresh_token",
        "exactly 46",
        "47 characters",
        lambda w: w.anonymous.auth.RefreshToken(
            auth_service_pb2.RefreshTokenRequest(refresh_token=TOKEN_47)
        ),
        BAD_REFRESH,
    ),
    Limit(
        "usersvc.v1.LogoutRequest",
        "refresh_token",
        "Exactly 46",
        "47 characters",
        lambda w: w.alice.auth.Logout(auth_service_pb2.LogoutRequest(refresh_token=TOKEN_47)),
        INVALID,
        ("refresh_token",),
    ),
    Limit(
        "usersvc.v1.RevokeAllSessionsRequest",
        "user_id",
        "36 characters",
        "37 characters",
        lambda w: w.admin.auth.RevokeAllSessions(
            auth_service_pb2.RevokeAllSessionsRequest(user_id=ID_37)
        ),
        INVALID,
        ("user_id",),
    ),
    Limit(
        "usersvc.v1.IntrospectTokenRequest",
        "token",
        "8192",
        "8193 characters",
        lambda w: w.service.auth.IntrospectToken(
            auth_service_pb2.IntrospectTokenRequest(token="e" * 8193)
        ),
        INACTIVE,
    ),
)


# -- the table is complete and the protos say what it says ---------------------------------


def _request_messages() -> Iterator[Descriptor]:
    for module in (user_service_pb2, auth_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield method.input_type


def _bounded_fields(message: Descriptor, seen: set[str]) -> Iterator[tuple[str, str]]:
    """(message, field) for every string, bytes, repeated and map field
    reachable from ``message``."""
    if message.full_name in seen:
        return
    seen.add(message.full_name)
    for field in message.fields:
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if (
            field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
            or field.is_repeated
        ):
            yield message.full_name, field.name
        if field.message_type is not None and not is_map:
            yield from _bounded_fields(field.message_type, seen)


_FIELD_LINE = re.compile(r"^\s*(?:repeated\s+)?(?:map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*;")
_OPEN = re.compile(r"^\s*(message|enum|service)\s+(\w+)\s*\{")


def _field_comments() -> dict[tuple[str, str], str]:
    """The comment above each field of each message in the protos."""
    comments: dict[tuple[str, str], str] = {}
    for path in sorted(PROTO_DIR.glob("*.proto")):
        stack: list[str] = []
        pending: list[str] = []
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("//"):
                pending.append(stripped[2:].strip())
                continue
            opened = _OPEN.match(line)
            field = _FIELD_LINE.match(line)
            if opened:
                stack.append(opened.group(2))
            elif field and stack:
                comments[(f"usersvc.v1.{stack[-1]}", field.group(1))] = " ".join(pending)
            elif stripped.startswith("}") and stack:
                stack.pop()
            pending = []
    return comments


def test_every_string_list_and_map_field_of_every_request_has_a_limit() -> None:
    seen: set[str] = set()
    fields = {key for message in _request_messages() for key in _bounded_fields(message, seen)}

    assert fields == {limit.key for limit in LIMITS}


def _documenting_comment(limit: Limit, comments: dict[tuple[str, str], str]) -> str:
    if limit.key == ("google.protobuf.FieldMask", "paths"):
        # A well-known type: its limit is written on the field that holds it.
        return comments[("usersvc.v1.UpdateUserRequest", "update_mask")]
    return comments[limit.key]


@pytest.mark.parametrize("limit", LIMITS, ids=lambda limit: f"{limit.field}: {limit.case}")
def test_the_proto_comment_states_the_limit(limit: Limit) -> None:
    assert limit.documented in _documenting_comment(limit, _field_comments())


# -- the server enforces it ------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    LIMITS,
    ids=lambda limit: f"{limit.message.rsplit('.', 1)[1]}.{limit.field}: {limit.case}",
)
async def test_a_field_over_its_limit_gets_the_documented_answer(
    world: World, limit: Limit
) -> None:
    call = limit.call(world)
    if limit.expect == INACTIVE:
        response = await call
        assert response.active is False
    elif limit.expect == INVALID:
        await expect_invalid(call, *limit.violations)
    elif isinstance(limit.expect, tuple) and limit.expect[0] == grpc.StatusCode.OK:
        response = await call
        failed = [(e.row, e.field, e.reason) for e in response.errors]
        assert failed == [(0, limit.violations[0], limit.expect[1])]
    else:
        assert isinstance(limit.expect, tuple)
        code, reason = limit.expect
        await expect_error(call, code, reason, fields=limit.violations or None)


async def test_a_mask_of_ten_paths_is_within_the_limit(world: World) -> None:
    reply = await _update(world, _own(world, display_name="Ten"), *["display_name"] * 10)

    assert reply.user.display_name == "Ten"


async def test_a_stale_etag_of_sixty_four_characters_is_a_mismatch_not_a_violation(
    world: World,
) -> None:
    await expect_error(
        _update(world, _own(world, display_name="x", etag="v" * 64), "display_name"),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )


async def test_fields_outside_the_mask_within_their_limits_are_ignored(world: World) -> None:
    user = _own(world, display_name="Only this", labels={"team": "ignored"}, email="x@y.io")

    reply = await _update(world, user, "display_name")

    assert (reply.user.display_name, dict(reply.user.labels)) == ("Only this", {})
    assert reply.user.email == world.alice.email


async def test_an_otherwise_valid_access_token_over_8192_characters_is_inactive(
    world: World, signing_key: Ed25519PrivateKey
) -> None:
    header, claims = unverified_parts(world.alice.token)
    within, over = (
        mint_token(signing_key, kid=header["kid"], claims=claims_like(claims, pad="p" * size))
        for size in (5000, 6500)
    )
    assert len(within) <= 8192 < len(over)

    control = await world.service.auth.IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token=within)
    )
    oversized = await world.service.auth.IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token=over)
    )

    assert (control.active, oversized.active) == (True, False)
