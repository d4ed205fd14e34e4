"""ImportUsers at the API edge: the mappers between the request stream and
the service's rows, and the client-streaming call through the real
interceptor chain (rich errors, request decoding, deadlines) on a real
grpc.aio server with a fake service behind it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_status import rpc_status

from usersvc_protos.v1 import user_service_pb2 as pb
from usersvc.api import mappers
from usersvc.domain import errors
from usersvc.services.bulk_import import ImportResult, ImportRow, ImportRowError

from .support import RunningServer, bearer, only_error_info, unpack_details

HASH = "$2b$04$Svru9xUp63Tg3ojPEEy/buT7mQ9cR71FGvUmXAJSjrBpPfx/2rjB6"
IMPORT_USERS = "/usersvc.v1.UserService/ImportUsers"


def message(*emails: str) -> pb.ImportUsersRequest:
    return pb.ImportUsersRequest(
        users=[pb.ImportedUser(email=email, password_hash=HASH) for email in emails]
    )


async def stream_of(messages: Iterable[Any]) -> AsyncIterator[Any]:
    for item in messages:
        yield item


async def rows_of(messages: Iterable[pb.ImportUsersRequest]) -> list[ImportRow]:
    return [row async for row in mappers.import_rows(stream_of(messages))]


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status in the trailers"
    return only_error_info(status).reason


# -- mappers -------------------------------------------------------------------------------


async def test_rows_of_every_message_come_out_in_stream_order() -> None:
    rows = await rows_of([message("a@example.com", "b@example.com"), message(), message("c@x.io")])

    assert [row.email for row in rows] == ["a@example.com", "b@example.com", "c@x.io"]


async def test_every_field_of_an_imported_user_reaches_the_row() -> None:
    user = pb.ImportedUser(
        email="a@example.com",
        password_hash=HASH,
        display_name="Ann",
        roles=["admin"],
        labels={"team": "payments"},
        create_time=timestamp_pb2.Timestamp(seconds=1_600_000_000, nanos=123_456_789),
    )

    [row] = await rows_of([pb.ImportUsersRequest(users=[user])])

    assert row == ImportRow(
        email="a@example.com",
        password_hash=HASH,
        display_name="Ann",
        roles=("admin",),
        labels={"team": "payments"},
        create_time=datetime(2020, 9, 13, 12, 26, 40, 123456, tzinfo=UTC),
    )


async def test_an_unset_create_time_is_none() -> None:
    [row] = await rows_of([message("a@example.com")])

    assert row.create_time is None


@pytest.mark.parametrize(
    "stamp",
    [
        timestamp_pb2.Timestamp(seconds=0, nanos=-1),
        timestamp_pb2.Timestamp(seconds=0, nanos=1_000_000_000),
        timestamp_pb2.Timestamp(seconds=2**62),
        timestamp_pb2.Timestamp(seconds=-(2**62)),
    ],
    ids=["negative-nanos", "nanos-overflow", "far-future", "far-past"],
)
async def test_a_timestamp_that_is_not_a_time_becomes_one_validation_refuses(
    stamp: timestamp_pb2.Timestamp,
) -> None:
    [row] = await rows_of(
        [pb.ImportUsersRequest(users=[pb.ImportedUser(email="a@x.io", create_time=stamp)])]
    )

    assert row.create_time == datetime.min.replace(tzinfo=UTC)


async def test_a_message_over_the_user_limit_is_refused_before_any_of_its_rows() -> None:
    oversized = pb.ImportUsersRequest(
        users=[pb.ImportedUser()] * (mappers.MAX_IMPORTED_USERS_PER_MESSAGE + 1)
    )
    seen: list[ImportRow] = []

    async def read_all() -> None:
        async for row in mappers.import_rows(stream_of([message("a@x.io"), oversized])):
            seen.append(row)

    with pytest.raises(errors.InvalidArgument) as raised:
        await read_all()

    assert [v.field for v in raised.value.violations] == ["users"]
    assert len(seen) == 1


async def test_a_message_at_the_user_limit_is_accepted() -> None:
    full = pb.ImportUsersRequest(users=[pb.ImportedUser()] * mappers.MAX_IMPORTED_USERS_PER_MESSAGE)

    rows = await rows_of([full])

    assert len(rows) == mappers.MAX_IMPORTED_USERS_PER_MESSAGE


def test_the_response_carries_the_counts_and_the_listed_errors() -> None:
    result = ImportResult(
        imported_count=5,
        failed_count=3,
        errors=(ImportRowError(2, "email", "EMAIL_ALREADY_EXISTS", "taken"),),
    )

    response = mappers.import_users_response(result)

    assert response == pb.ImportUsersResponse(
        imported_count=5,
        failed_count=3,
        errors=[
            pb.ImportRowError(
                row=2, field="email", reason="EMAIL_ALREADY_EXISTS", description="taken"
            )
        ],
        errors_truncated=True,
    )


# -- the call through the interceptors ---------------------------------------------------


async def test_a_streamed_import_reaches_the_service_and_its_result_comes_back(
    served: RunningServer,
) -> None:
    response = await served.user_stub.ImportUsers(
        stream_of([message("a@x.io", "b@x.io"), message("c@x.io")]), metadata=bearer()
    )

    assert [row.email for row in served.users.imported_rows] == ["a@x.io", "b@x.io", "c@x.io"]
    assert (response.imported_count, response.failed_count) == (2, 1)
    assert [(e.row, e.reason) for e in response.errors] == [(1, "INVALID_PASSWORD_HASH")]


async def test_a_refusal_before_the_stream_is_read_is_a_rich_permission_denied(
    served: RunningServer,
) -> None:
    served.users.error = errors.PermissionDenied("the caller may not import users")

    error = await _failure(
        served.user_stub.ImportUsers(stream_of([message("a@x.io")]), metadata=bearer())
    )

    assert (error.code(), _reason(error)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    assert served.users.imported_rows == []


async def test_an_import_without_a_token_is_a_rich_unauthenticated(served: RunningServer) -> None:
    error = await _failure(served.user_stub.ImportUsers(stream_of([message("a@x.io")])))

    assert (error.code(), _reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
    assert served.users.calls == []


async def test_a_message_over_the_user_limit_fails_the_call_naming_the_field(
    served: RunningServer,
) -> None:
    oversized = pb.ImportUsersRequest(
        users=[pb.ImportedUser()] * (mappers.MAX_IMPORTED_USERS_PER_MESSAGE + 1)
    )

    error = await _failure(served.user_stub.ImportUsers(stream_of([oversized]), metadata=bearer()))

    status = rpc_status.from_call(error)
    assert status is not None
    [bad_request] = unpack_details(status)["BadRequest"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request.field_violations] == ["users"]  # type: ignore[attr-defined]


async def test_an_undecodable_message_in_the_stream_is_a_rich_invalid_argument(
    served: RunningServer,
) -> None:
    call = served.channel.stream_unary(IMPORT_USERS)  # bytes in, bytes out
    valid = message("a@x.io").SerializeToString()

    error = await _failure(call(stream_of([valid, b"\x0a\xff"]), metadata=bearer()))

    assert (error.code(), _reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_an_import_still_reading_near_its_deadline_gets_a_rich_deadline_exceeded(
    served: RunningServer,
) -> None:
    answered = asyncio.Event()

    async def until_answered() -> AsyncIterator[pb.ImportUsersRequest]:
        yield message("a@x.io")
        # Ends once the call has: grpc's task that reads the stream would
        # otherwise wait on it forever.
        await answered.wait()

    try:
        error = await _failure(
            served.user_stub.ImportUsers(until_answered(), metadata=bearer(), timeout=0.5)
        )
    finally:
        answered.set()

    assert (error.code(), _reason(error)) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
    )
