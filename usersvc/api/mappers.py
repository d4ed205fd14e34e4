"""Proto messages <-> domain objects and service inputs.

The only place that knows both shapes: proto messages stop here, domain
objects never reach the wire except through ``user_to_proto``, which cannot
emit a password hash because the domain User has none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from google.protobuf import timestamp_pb2

from usersvc_protos.v1 import auth_service_pb2, user_pb2, user_service_pb2
from usersvc.domain.errors import FieldViolation, InvalidArgument
from usersvc.domain.models import User, UserPatch, UserState
from usersvc.domain.validation import raise_for_violations, validate_sizes
from usersvc.services.bulk_import import ImportResult, ImportRow
from usersvc.services.inputs import (
    CreateUserInput,
    ListUsersInput,
    LoginResult,
    TokenIntrospection,
    UpdateUserInput,
    UserListResult,
)

_STATES = {
    UserState.ACTIVE: user_pb2.User.STATE_ACTIVE,
    UserState.DISABLED: user_pb2.User.STATE_DISABLED,
    UserState.DELETED: user_pb2.User.STATE_DELETED,
}

# AIP-134: the fields UpdateUser may change, and those a caller may read but
# never write. A mask naming anything else is a caller bug, not a no-op.
WRITABLE_FIELDS = ("email", "display_name", "labels", "roles")
OUTPUT_ONLY_FIELDS = frozenset(
    {"id", "state", "create_time", "update_time", "delete_time", "etag", "email_verified"}
)
_ALL_FIELDS = "*"
# Every meaningful mask fits: four writable fields, or "*".
MAX_UPDATE_MASK_PATHS = 10
MAX_UPDATE_MASK_PATH_LENGTH = 64
# ImportUsers: users per request message. A message is at most 1 MiB
# anyway; this bounds the rows of empty users such a message could carry.
MAX_IMPORTED_USERS_PER_MESSAGE = 10_000
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# google.protobuf.Timestamp: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
_MIN_TIMESTAMP_SECONDS = -62_135_596_800
_MAX_TIMESTAMP_SECONDS = 253_402_300_799
_OUT_OF_RANGE_TIME = datetime.min.replace(tzinfo=UTC)


def user_to_proto(user: User) -> user_pb2.User:
    """The wire form of ``user``. Raises ValueError for a naive timestamp
    (the adapters must return timezone-aware ones)."""
    # Scalars as arguments, the rest filled in place: a list, a map or a
    # Timestamp passed as an argument is converted and copied into the
    # message, which made up most of the mapping's cost (4 of 10 us a
    # user, and a ListUsers page maps 50).
    message = user_pb2.User(
        id=str(user.id),
        email=user.email,
        display_name=user.display_name,
        state=_STATES[user.state],
        etag=user.etag,
        email_verified=user.email_verified,
    )
    if user.roles:
        message.roles.extend(user.roles)
    if user.labels:
        message.labels.update(user.labels)
    _set_timestamp(message.create_time, user.create_time)
    _set_timestamp(message.update_time, user.update_time)
    if user.delete_time is not None:
        _set_timestamp(message.delete_time, user.delete_time)
    return message


def users_to_proto(users: Iterable[User]) -> list[user_pb2.User]:
    """``user_to_proto`` of each, in order. Raises ValueError as it does."""
    return [user_to_proto(user) for user in users]


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    _set_timestamp(stamp, moment)
    return stamp


def _set_timestamp(stamp: timestamp_pb2.Timestamp, moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        # A naive time would be read as UTC whatever zone it was meant in.
        raise ValueError("timestamps must be timezone-aware")
    # Timestamp.FromDatetime goes through a struct_time and calendar.timegm;
    # the same exact arithmetic on a timedelta costs a fraction of that, and
    # every user read maps two or three timestamps.
    delta = moment - _UNIX_EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    if not _MIN_TIMESTAMP_SECONDS <= seconds <= _MAX_TIMESTAMP_SECONDS:
        raise ValueError("timestamp out of the range google.protobuf.Timestamp can hold")
    # Assigning marks the field present even at 0 (the Unix epoch).
    stamp.seconds = seconds
    stamp.nanos = delta.microseconds * 1000


def create_user_input(request: user_service_pb2.CreateUserRequest) -> CreateUserInput:
    """The service input of a CreateUserRequest, unvalidated. Never raises."""
    return CreateUserInput(
        email=request.email,
        password=request.password,
        display_name=request.display_name,
        roles=tuple(request.roles),
        labels=dict(request.labels),
        request_id=request.request_id,
    )


def create_user_inputs(
    request: user_service_pb2.BatchCreateUsersRequest,
) -> list[CreateUserInput]:
    """The service inputs of a BatchCreateUsersRequest's items, in order.
    Never raises."""
    return [create_user_input(item) for item in request.requests]


async def import_rows(
    requests: AsyncIterable[user_service_pb2.ImportUsersRequest],
) -> AsyncIterator[ImportRow]:
    """The rows of an ImportUsers request stream, in order, unvalidated;
    each message is checked as it arrives, before any of its rows is handed
    on. Raises InvalidArgument ("users") for a message with more than
    MAX_IMPORTED_USERS_PER_MESSAGE users, and what iterating ``requests``
    raises."""
    async for request in requests:
        users = request.users
        if len(users) > MAX_IMPORTED_USERS_PER_MESSAGE:
            raise InvalidArgument.single(
                "users",
                f"a message may hold at most {MAX_IMPORTED_USERS_PER_MESSAGE} users, "
                f"got {len(users)}; send them in several messages",
            )
        for user in users:
            yield ImportRow(
                email=user.email,
                password_hash=user.password_hash,
                display_name=user.display_name,
                roles=tuple(user.roles),
                labels=dict(user.labels),
                create_time=_import_time(user) if user.HasField("create_time") else None,
                email_verified=user.email_verified,
            )


def _import_time(user: user_service_pb2.ImportedUser) -> datetime:
    # The spec's range of a Timestamp; anything outside it (or with nanos
    # out of range) is not a time, and datetime.min is refused by the
    # service as out of range.
    stamp = user.create_time
    if not (
        _MIN_TIMESTAMP_SECONDS <= stamp.seconds <= _MAX_TIMESTAMP_SECONDS
        and 0 <= stamp.nanos < 1_000_000_000
    ):
        return _OUT_OF_RANGE_TIME
    return _UNIX_EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def import_users_response(result: ImportResult) -> user_service_pb2.ImportUsersResponse:
    """The ImportUsersResponse of a finished import. Never raises."""
    return user_service_pb2.ImportUsersResponse(
        imported_count=result.imported_count,
        failed_count=result.failed_count,
        errors=[
            user_service_pb2.ImportRowError(
                row=error.row,
                field=error.field,
                reason=error.reason,
                description=error.description,
            )
            for error in result.errors
        ],
        errors_truncated=result.errors_truncated,
    )


def list_users_input(request: user_service_pb2.ListUsersRequest) -> ListUsersInput:
    """The service input of a ListUsersRequest, unvalidated. Never raises."""
    return ListUsersInput(
        page_size=request.page_size,
        page_token=request.page_token,
        filter=request.filter,
        order_by=request.order_by,
        show_deleted=request.show_deleted,
    )


def update_user_input(request: user_service_pb2.UpdateUserRequest) -> UpdateUserInput:
    """Apply the update mask (AIP-134): the patch holds exactly the fields the
    mask selects, with the values ``request.user`` gives them, empty ones
    included (that is how a field is cleared). An empty mask selects the
    writable fields ``user`` sets to a non-default value; "*" selects all.

    Fields the mask does not select are ignored, but their sizes are still
    held to the limits of the selected ones: nothing a request carries is
    unbounded.

    Raises InvalidArgument: "user.id" when the id is missing, "update_mask"
    for more than 10 paths, a path over 64 characters and each path that is
    unknown or output only, "user.<field>" for an oversized field outside
    the mask.
    """
    return _update_input(request.user, request.update_mask.paths)


def batch_update_user_inputs(
    request: user_service_pb2.BatchUpdateUsersRequest,
) -> list[UpdateUserInput]:
    """The service inputs of a BatchUpdateUsersRequest's items, in order:
    each as update_user_input makes it, an item without an update_mask of
    its own taking the request's.

    Raises InvalidArgument: "update_mask" for a bad request mask; otherwise
    every bad item's violations, named "requests[<i>].<field>", with
    metadata "index" naming the first bad item.
    """
    hoisted = list(request.update_mask.paths)
    if hoisted:
        _selected_fields(hoisted, user_pb2.User())
    inputs: list[UpdateUserInput] = []
    violations: list[FieldViolation] = []
    first_bad: int | None = None
    for index, item in enumerate(request.requests):
        try:
            inputs.append(_update_input(item.user, list(item.update_mask.paths) or hoisted))
        except InvalidArgument as exc:
            violations.extend(
                FieldViolation(f"requests[{index}].{v.field}", v.description)
                for v in exc.violations
            )
            if first_bad is None:
                first_bad = index
    if violations:
        raise InvalidArgument(violations, metadata={"index": str(first_bad)})
    return inputs


def _update_input(user: user_pb2.User, paths: Iterable[str]) -> UpdateUserInput:
    if not user.id:
        raise InvalidArgument.single("user.id", "required: the id of the user to update")
    selected = _selected_fields(paths, user)
    _check_unselected_sizes(user, selected)
    return UpdateUserInput(
        user_id=user.id,
        etag=user.etag,
        patch=UserPatch(
            email=user.email if "email" in selected else None,
            display_name=user.display_name if "display_name" in selected else None,
            roles=tuple(user.roles) if "roles" in selected else None,
            labels=dict(user.labels) if "labels" in selected else None,
        ),
    )


def _selected_fields(paths: Iterable[str], user: user_pb2.User) -> frozenset[str]:
    paths = list(paths)
    if not paths:
        return frozenset(name for name in WRITABLE_FIELDS if _is_set(user, name))
    if len(paths) > MAX_UPDATE_MASK_PATHS:
        raise InvalidArgument.single(
            "update_mask", f"must name at most {MAX_UPDATE_MASK_PATHS} paths, got {len(paths)}"
        )
    violations = []
    selected: set[str] = set()
    for path in paths:
        if len(path) > MAX_UPDATE_MASK_PATH_LENGTH:
            # Not quoted back: the caller sent it, and it may be huge.
            violations.append(
                FieldViolation(
                    "update_mask", f"paths must be at most {MAX_UPDATE_MASK_PATH_LENGTH} characters"
                )
            )
        elif path == _ALL_FIELDS:
            selected.update(WRITABLE_FIELDS)
        elif path in WRITABLE_FIELDS:
            selected.add(path)
        elif path in OUTPUT_ONLY_FIELDS:
            violations.append(
                FieldViolation("update_mask", f"{path!r} is output only and cannot be updated")
            )
        else:
            violations.append(
                FieldViolation(
                    "update_mask",
                    f"unknown path {path!r}; updatable: {', '.join(WRITABLE_FIELDS)} or '*'",
                )
            )
    if violations:
        raise InvalidArgument(violations)
    return frozenset(selected)


def _check_unselected_sizes(user: user_pb2.User, selected: frozenset[str]) -> None:
    if selected.issuperset(WRITABLE_FIELDS):
        return
    errors: list[FieldViolation] = []
    validate_sizes(
        email="" if "email" in selected else user.email,
        display_name="" if "display_name" in selected else user.display_name,
        roles=() if "roles" in selected else user.roles,
        labels={} if "labels" in selected else user.labels,
        prefix="user",
        errors=errors,
    )
    raise_for_violations(errors)


def _is_set(user: user_pb2.User, name: str) -> bool:
    # Every writable field is a proto3 scalar, list or map: "set" means
    # non-empty, there is no presence to ask about.
    return bool(getattr(user, name))


def timestamp_to_proto(moment: datetime) -> timestamp_pb2.Timestamp:
    """The wire form of a timezone-aware time. Raises ValueError for a
    naive one, or one out of Timestamp's range."""
    return _timestamp(moment)


def issued_code_timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """The wire form of a code's expire_time. Raises ValueError for a naive
    time."""
    return _timestamp(moment)


# Users mapped and encoded between two returns to the event loop: 32 users
# with the largest labels take about half a millisecond.
USERS_PER_YIELD = 32
# Protobuf's wire type of a length-delimited field (a message, a string).
_LENGTH_DELIMITED = 2

_UsersResponse = TypeVar(
    "_UsersResponse",
    user_service_pb2.ListUsersResponse,
    user_service_pb2.BatchGetUsersResponse,
    user_service_pb2.BatchUpdateUsersResponse,
    user_service_pb2.BatchDeleteUsersResponse,
)


def _varint(value: int) -> bytes:
    if value < 0x4000:
        # One or two bytes: every user's length, short of huge labels.
        return bytes((value,)) if value < 0x80 else bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


async def encode_users_response(response: _UsersResponse, users: Sequence[User]) -> bytes:
    """The wire form of ``response`` with ``users`` in its ``users`` field,
    in order: the bytes ``SerializeToString`` gives for the whole message,
    encoded one user at a time, letting other tasks run every
    USERS_PER_YIELD users. ``response`` carries the other fields; its own
    ``users`` must be empty.

    Why: a message of 4 MiB encoded in one call holds the event loop for
    milliseconds on end, and filling it first copies every user once more.
    The wire format allows the pieces instead: a repeated message field is
    the concatenation of its elements, each a tag, a length and the
    element's bytes, and the message's other fields may follow (encoders
    write fields in field-number order, and ``users`` is field 1 of these
    responses). The server hands the bytes to grpc as they are
    (usersvc.api.interceptors.encoded_responses). Raises ValueError as
    user_to_proto, and for a ``response`` that already holds users."""
    if response.users:
        raise ValueError("the response's own users field must be empty")
    field = response.DESCRIPTOR.fields_by_name["users"]
    tag = _varint(field.number << 3 | _LENGTH_DELIMITED)
    parts: list[bytes] = []
    for index, user in enumerate(users):
        if index and index % USERS_PER_YIELD == 0:
            await asyncio.sleep(0)
        encoded = user_to_proto(user).SerializeToString()
        parts += (tag, _varint(len(encoded)), encoded)
    parts.append(response.SerializeToString())
    if len(users) > USERS_PER_YIELD:
        # Joining megabytes into fresh memory takes a millisecond or two.
        await asyncio.sleep(0)
    return b"".join(parts)


async def encoded_user_list_response(result: UserListResult) -> bytes:
    """The encoded ListUsersResponse of a page (see encode_users_response).
    Raises ValueError as user_to_proto."""
    return await encode_users_response(
        user_service_pb2.ListUsersResponse(
            next_page_token=result.next_page_token, total_size=result.total_size
        ),
        result.users,
    )


async def encoded_batch_users_response(
    response_type: type[_UsersResponse], users: Sequence[User]
) -> bytes:
    """The encoded ``response_type`` (BatchGetUsersResponse,
    BatchUpdateUsersResponse or BatchDeleteUsersResponse) of ``users``, in
    order (see encode_users_response). Raises ValueError as user_to_proto."""
    return await encode_users_response(response_type(), users)


def login_response(result: LoginResult) -> auth_service_pb2.LoginResponse:
    """The LoginResponse of a successful login. Raises ValueError as
    user_to_proto."""
    return auth_service_pb2.LoginResponse(
        access_token=result.access_token,
        refresh_token=result.refresh_token,
        token_type=result.token_type,
        expires_in=result.expires_in,
        user=user_to_proto(result.user),
    )


def refresh_token_response(result: LoginResult) -> auth_service_pb2.RefreshTokenResponse:
    """The RefreshTokenResponse of a rotation. Raises ValueError as
    user_to_proto."""
    return auth_service_pb2.RefreshTokenResponse(
        access_token=result.access_token,
        refresh_token=result.refresh_token,
        token_type=result.token_type,
        expires_in=result.expires_in,
        user=user_to_proto(result.user),
    )


def introspect_token_response(
    result: TokenIntrospection,
) -> auth_service_pb2.IntrospectTokenResponse:
    """The IntrospectTokenResponse; an inactive token leaves every other
    field empty. Raises ValueError for a naive expire_time."""
    if not result.active:
        return auth_service_pb2.IntrospectTokenResponse(active=False)
    response = auth_service_pb2.IntrospectTokenResponse(
        active=True,
        sub=result.subject,
        roles=list(result.roles),
        session_id=result.session_id,
    )
    if result.expire_time is not None:
        response.expire_time.CopyFrom(_timestamp(result.expire_time))
    return response
