"""The largest responses are encoded a user at a time
(usersvc.api.mappers.encode_users_response): the bytes are those of the
whole message, the event loop is never held long, and the server hands
them to the client as they are (usersvc.api.interceptors.encoded_responses)."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from usersvc_protos.v1 import user_service_pb2
from usersvc.api import mappers
from usersvc.api.interceptors import EncodedResponseInterceptor
from usersvc.api.interceptors.encoded_responses import passing_bytes
from usersvc.domain.models import User
from usersvc.services.inputs import UserListResult
from usersvc.services.response_size import MAX_RESPONSE_BYTES, fitting_prefix

from .support import CALLER_ID, RunningServer, bearer, make_user

OTHER_ID = "0190b4a4-7d40-7c3e-9a51-000000000002"

RESPONSE_TYPES = [
    user_service_pb2.ListUsersResponse,
    user_service_pb2.BatchGetUsersResponse,
    user_service_pb2.BatchUpdateUsersResponse,
    user_service_pb2.BatchDeleteUsersResponse,
]
# The longest the service means to hold the event loop at a time.
MAX_STEP_SECONDS = 0.01
DELETED = datetime(2025, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)


def some_users(count: int, labels: int = 1) -> list[User]:
    return [
        make_user(
            id=uuid.UUID(int=index + 1),
            email=f"u{index}@example.com",
            labels={f"k{n}": f"v{index}" for n in range(labels)},
            delete_time=DELETED if index % 3 == 0 else None,
        )
        for index in range(count)
    ]


def maximal(index: int) -> User:
    """64 labels of 63-character keys and 256-character values (~21 KB)."""
    return replace(
        make_user(id=uuid.UUID(int=index + 1), email=f"u{index:04d}@example.com"),
        display_name="N" * 200,
        labels={f"k{n:02d}{index:04d}".ljust(63, "x"): f"{n:0256d}" for n in range(64)},
    )


def whole(response_type: Any, users: list[User], **fields: Any) -> Any:
    return response_type(users=mappers.users_to_proto(users), **fields)


@pytest.mark.parametrize("response_type", RESPONSE_TYPES, ids=lambda t: t.__name__)
async def test_the_bytes_are_those_of_the_whole_message(response_type: Any) -> None:
    # One label per user: map entries are the only part protobuf may order
    # differently from one encoding to the next.
    users = some_users(101)
    fields = (
        {"next_page_token": "next", "total_size": 7} if "List" in response_type.__name__ else {}
    )
    encoded = await mappers.encode_users_response(response_type(**fields), users)
    assert encoded == whole(response_type, users, **fields).SerializeToString()


async def test_users_with_many_labels_decode_to_the_same_message() -> None:
    users = some_users(40, labels=64)
    encoded = await mappers.encoded_user_list_response(
        UserListResult(users=tuple(users), next_page_token="t", total_size=40)
    )
    expected = whole(user_service_pb2.ListUsersResponse, users, next_page_token="t", total_size=40)
    assert user_service_pb2.ListUsersResponse.FromString(encoded) == expected


async def test_no_users_encode_as_the_other_fields_alone() -> None:
    encoded = await mappers.encoded_user_list_response(
        UserListResult(users=(), next_page_token="", total_size=0)
    )
    assert encoded == b""
    assert await mappers.encoded_batch_users_response(
        user_service_pb2.BatchGetUsersResponse, []
    ) == (b"")


async def test_a_response_that_already_holds_users_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        await mappers.encode_users_response(
            whole(user_service_pb2.BatchGetUsersResponse, some_users(1)), some_users(1)
        )


async def test_users_are_encoded_in_order_while_other_tasks_run() -> None:
    users = some_users(320)
    ticks = 0

    async def other_call() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_call())
    try:
        encoded = await mappers.encoded_batch_users_response(
            user_service_pb2.BatchGetUsersResponse, users
        )
    finally:
        ticker.cancel()
    decoded = user_service_pb2.BatchGetUsersResponse.FromString(encoded)
    assert [u.email for u in decoded.users] == [u.email for u in users]
    assert ticks >= 9  # a turn every 32 users


async def test_the_largest_response_never_holds_the_loop_long() -> None:
    # As many users with the largest labels as one response takes (~4 MiB).
    users = [maximal(index) for index in range(300)]
    users = users[: fitting_prefix(users)]
    # This thread's CPU time at each turn of another task: what lies between
    # two turns is a step of the encoder (a wait for a CPU is not counted).
    marks = [time.thread_time()]

    async def other_call() -> None:
        while True:
            await asyncio.sleep(0)
            marks.append(time.thread_time())

    ticker = asyncio.create_task(other_call())
    await asyncio.sleep(0)
    try:
        encoded = await mappers.encoded_user_list_response(
            UserListResult(users=tuple(users), next_page_token="t", total_size=1000)
        )
        marks.append(time.thread_time())
    finally:
        ticker.cancel()
    steps = [end - start for start, end in itertools.pairwise(marks)]
    message = user_service_pb2.ListUsersResponse.FromString(encoded)
    # What one SerializeToString of that message costs, for comparison.
    started = time.thread_time()
    assert len(message.SerializeToString()) == len(encoded)
    one_call = time.thread_time() - started
    print(
        f"\n{len(users)} users, {len(encoded)} bytes: {len(steps)} steps, the longest "
        f"{max(steps) * 1000:.2f} ms of {sum(steps) * 1000:.2f}; one SerializeToString "
        f"{one_call * 1000:.2f} ms"
    )
    assert MAX_RESPONSE_BYTES * 0.9 < len(encoded) < MAX_RESPONSE_BYTES
    assert max(steps) < MAX_STEP_SECONDS
    # Cut in pieces, whatever this machine's speed.
    assert max(steps) < sum(steps) / 2


# -- the serializer that lets encoded bytes through ---------------------------------


def test_bytes_pass_through_and_messages_are_serialized() -> None:
    serialize = passing_bytes(user_service_pb2.BatchGetUsersResponse.SerializeToString)
    message = whole(user_service_pb2.BatchGetUsersResponse, some_users(2))
    assert serialize(b"\x0a\x00") == b"\x0a\x00"
    assert serialize(message) == message.SerializeToString()


def test_only_the_serializer_of_a_single_response_method_changes() -> None:
    async def behaviour(request: Any, context: Any) -> bytes:
        return b""

    interceptor = EncodedResponseInterceptor()
    unary = grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=user_service_pb2.ListUsersRequest.FromString,
        response_serializer=user_service_pb2.ListUsersResponse.SerializeToString,
    )
    wrapped = interceptor.wrap(unary, "/usersvc.v1.UserService/ListUsers")
    assert (wrapped.unary_unary, wrapped.request_deserializer) == (
        behaviour,
        unary.request_deserializer,
    )
    assert wrapped.response_serializer(b"raw") == b"raw"  # type: ignore[misc]
    streaming = grpc.unary_stream_rpc_method_handler(
        behaviour, response_serializer=user_service_pb2.ListUsersResponse.SerializeToString
    )
    assert interceptor.wrap(streaming, "/s/M") is streaming


async def test_encoded_responses_reach_a_client_over_grpc(served: RunningServer) -> None:
    page = await served.user_stub.ListUsers(user_service_pb2.ListUsersRequest(), metadata=bearer())
    batch = await served.user_stub.BatchGetUsers(
        user_service_pb2.BatchGetUsersRequest(ids=[OTHER_ID, CALLER_ID]), metadata=bearer()
    )
    assert ([u.email for u in page.users], page.next_page_token, page.total_size) == (
        ["ada@example.com"],
        "next",
        7,
    )
    assert [u.id for u in batch.users] == [OTHER_ID, CALLER_ID]
