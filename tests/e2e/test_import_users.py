"""UserService.ImportUsers over real gRPC: an admin streams users with their
existing bcrypt hashes; they can log in with their original passwords; bad
rows and taken emails come back per row with their index in the stream;
nobody else may import; message limits hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import bcrypt
import grpc
import pytest
from google.protobuf import timestamp_pb2

from .conftest import RunningServer
from .helpers import (
    BCRYPT_PREFIXES,
    Caller,
    World,
    expect_denied,
    expect_invalid,
    expect_token_invalid,
    fails,
    new_email,
    user_service_pb2,
)

MIB = 1024 * 1024
# Cost 4, as the e2e servers hash: known passwords, each hash shared by
# many imported users.
PASSWORDS = [f"Imported-password-{n}!" for n in range(4)]
HASHES = [bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode() for p in PASSWORDS]


def imported(email: str, n: int = 0, **fields: Any) -> user_service_pb2.ImportedUser:
    values: dict[str, Any] = {"email": email, "password_hash": HASHES[n % len(HASHES)]}
    values.update(fields)
    return user_service_pb2.ImportedUser(**values)


def chunks(
    users: Sequence[user_service_pb2.ImportedUser], size: int
) -> list[user_service_pb2.ImportUsersRequest]:
    return [
        user_service_pb2.ImportUsersRequest(users=users[start : start + size])
        for start in range(0, len(users), size)
    ]


async def stream(messages: Iterable[Any]) -> AsyncIterator[Any]:
    for message in messages:
        yield message


async def import_users(
    caller: Caller, messages: Iterable[user_service_pb2.ImportUsersRequest]
) -> user_service_pb2.ImportUsersResponse:
    response: user_service_pb2.ImportUsersResponse = await caller.users.ImportUsers(
        stream(messages)
    )
    # The recorder on the test channels sees unary calls only: this one's
    # response is searched for hashes here.
    assert not any(prefix in response.SerializeToString() for prefix in BCRYPT_PREFIXES)
    return response


def row_errors(response: user_service_pb2.ImportUsersResponse) -> list[tuple[int, str, str]]:
    return [(e.row, e.field, e.reason) for e in response.errors]


async def total_users(world: World, email_filter: str) -> int:
    page = await world.admin.users.ListUsers(
        user_service_pb2.ListUsersRequest(filter=f'email:"{email_filter}"', page_size=1)
    )
    return page.total_size


async def test_an_admin_imports_ten_thousand_users_sent_in_several_messages(
    world: World,
) -> None:
    users = [imported(f"bulk-{n}@import.example.com", n) for n in range(10_000)]

    response = await import_users(world.admin, chunks(users, 1500))

    assert (response.imported_count, response.failed_count) == (10_000, 0)
    assert (list(response.errors), response.errors_truncated) == ([], False)
    assert await total_users(world, "@import.example.com") == 10_000


async def test_imported_users_log_in_with_their_original_passwords(world: World) -> None:
    emails = [new_email(f"login{n}") for n in range(len(PASSWORDS))]
    users = [imported(email, n, display_name=f"Login {n}") for n, email in enumerate(emails)]
    await import_users(world.admin, chunks(users, 2))

    logins = [await world.login(email, PASSWORDS[n]) for n, email in enumerate(emails)]

    assert [login.user.email for login in logins] == emails
    assert [login.user.display_name for login in logins] == [f"Login {n}" for n in range(4)]


@pytest.mark.parametrize("variant", ["$2a$", "$2y$"])
async def test_hashes_of_the_other_bcrypt_variants_log_in_too(world: World, variant: str) -> None:
    email = new_email("variant")
    await import_users(
        world.admin, chunks([imported(email, password_hash=variant + HASHES[0][4:])], 1)
    )

    login = await world.login(email, PASSWORDS[0])

    assert login.user.email == email


async def test_roles_labels_and_create_time_are_imported(world: World) -> None:
    email = new_email("full")
    user = imported(
        email,
        display_name="Full Import",
        roles=["admin"],
        labels={"source": "legacy"},
        create_time=timestamp_pb2.Timestamp(seconds=1_500_000_000),
    )
    await import_users(world.admin, chunks([user], 1))

    found = (
        await world.admin.users.LookupUser(user_service_pb2.LookupUserRequest(email=email))
    ).user

    assert (found.display_name, list(found.roles), dict(found.labels)) == (
        "Full Import",
        ["admin", "user"],
        {"source": "legacy"},
    )
    assert found.create_time.seconds == 1_500_000_000
    assert found.state == found.STATE_ACTIVE


async def test_bad_hashes_and_taken_emails_are_reported_per_row_across_messages(
    world: World,
) -> None:
    taken = world.bob.email.upper()
    users = [
        imported(new_email("ok")),  # 0
        imported(new_email("bad"), password_hash="md5:abcdef"),  # 1
        imported(taken),  # 2
        imported(new_email("ok")),  # 3
        imported("not-an-email"),  # 4
        imported("dup@import-dups.example.com"),  # 5
        imported(new_email("bad"), password_hash=HASHES[0][:-1]),  # 6
        imported("DUP@import-dups.example.com"),  # 7
        imported(new_email("ok"), roles=["root"]),  # 8
        imported(new_email("ok")),  # 9
    ]

    response = await import_users(world.admin, chunks(users, 3))

    assert (response.imported_count, response.failed_count) == (4, 6)
    assert row_errors(response) == [
        (1, "password_hash", "INVALID_PASSWORD_HASH"),
        (2, "email", "EMAIL_ALREADY_EXISTS"),
        (4, "email", "INVALID_ARGUMENT"),
        (6, "password_hash", "INVALID_PASSWORD_HASH"),
        (7, "email", "EMAIL_ALREADY_EXISTS"),
        (8, "roles[0]", "INVALID_ARGUMENT"),
    ]
    assert all(HASHES[0][7:] not in e.description for e in response.errors)


async def test_importing_the_same_stream_again_imports_nothing_twice(world: World) -> None:
    users = [imported(new_email("again"), n) for n in range(5)]
    await import_users(world.admin, chunks(users, 2))

    again = await import_users(world.admin, chunks(users, 2))

    assert (again.imported_count, again.failed_count) == (0, 5)
    assert {e.reason for e in again.errors} == {"EMAIL_ALREADY_EXISTS"}


async def test_the_listed_errors_stop_at_a_thousand_and_say_so(world: World) -> None:
    users = [imported(f"nohash-{n}@example.com", password_hash="x") for n in range(1200)]

    response = await import_users(world.admin, chunks(users, 600))

    assert (response.imported_count, response.failed_count) == (0, 1200)
    assert (len(response.errors), response.errors_truncated) == (1000, True)
    assert [e.row for e in response.errors] == list(range(1000))


async def test_an_empty_stream_imports_nothing(world: World) -> None:
    empty = await import_users(world.admin, [])
    empty_messages = await import_users(world.admin, [user_service_pb2.ImportUsersRequest()] * 3)

    assert (empty.imported_count, empty.failed_count) == (0, 0)
    assert (empty_messages.imported_count, empty_messages.failed_count) == (0, 0)


# -- who may import ---------------------------------------------------------------------------


async def test_a_plain_user_may_not_import(world: World) -> None:
    email = new_email("sneaky")

    await expect_denied(world.alice.users.ImportUsers(stream(chunks([imported(email)], 1))))

    await fails(world.admin.users.LookupUser(user_service_pb2.LookupUserRequest(email=email)))


async def test_a_service_may_not_import(world: World) -> None:
    await expect_denied(
        world.service.users.ImportUsers(stream(chunks([imported(new_email("svc"))], 1)))
    )


async def test_an_anonymous_caller_may_not_import(world: World) -> None:
    await expect_token_invalid(
        world.anonymous.users.ImportUsers(stream(chunks([imported(new_email("anon"))], 1)))
    )


# -- message limits ----------------------------------------------------------------------------


async def test_a_message_over_one_mebibyte_is_refused(world: World) -> None:
    fine = chunks([imported(new_email("before"))], 1)
    huge = user_service_pb2.ImportUsersRequest(
        users=[imported(new_email("huge"), display_name="d" * (2 * MIB))]
    )

    failure = await fails(world.admin.users.ImportUsers(stream([*fine, huge])))

    assert failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_message_of_more_than_ten_thousand_users_is_invalid(world: World) -> None:
    crowded = user_service_pb2.ImportUsersRequest(users=[user_service_pb2.ImportedUser()] * 10_001)

    await expect_invalid(world.admin.users.ImportUsers(stream([crowded])), "users")


# -- deadlines -------------------------------------------------------------------------------


async def test_a_deadline_keeps_the_batches_committed_and_drops_the_rest(
    world: World, primary: RunningServer
) -> None:
    from usersvc.services.bulk_import import DEFAULT_BATCH_SIZE

    count = 2 * DEFAULT_BATCH_SIZE + 10
    users = [imported(f"late-{n}@deadline.example.com") for n in range(count)]

    answered = asyncio.Event()

    async def then_stall() -> AsyncIterator[user_service_pb2.ImportUsersRequest]:
        for message in chunks(users, DEFAULT_BATCH_SIZE):
            yield message
        # The client does not finish its stream before the call has ended
        # (then it does, or grpc's task reading it would wait forever).
        await answered.wait()

    try:
        failure = await fails(world.admin.users.ImportUsers(then_stall(), timeout=3.0))
    finally:
        answered.set()

    assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await total_users(world, "@deadline.example.com") == 2 * DEFAULT_BATCH_SIZE
    assert await connections_returned(primary)


async def connections_returned(server: RunningServer) -> bool:
    """Whether the server's pool has every connection back (given a moment:
    the client's timer may end the call before the server's clean-up)."""
    pool = server.container.engine.pool
    for _ in range(100):
        if pool.checkedout() == 0:
            return True
        await asyncio.sleep(0.02)  # polled: bounded by the loop
    return False
