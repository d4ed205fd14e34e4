"""BatchUpdateUsers and BatchDeleteUsers end to end: atomic, ordered, each
item under the single-item rules."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from usersvc_protos.v1 import event_service_pb2

from .helpers import (
    RpcFailure,
    World,
    expect_denied,
    expect_error,
    expect_invalid,
    missing_id,
    new_email,
    user_pb2,
    user_service_pb2,
)

pb = user_service_pb2


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def index_of(failure: RpcFailure) -> str:
    return str(failure.error_infos[0].metadata["index"])


async def seed(world: World, count: int) -> list[user_pb2.User]:
    response = await world.admin.users.BatchCreateUsers(
        pb.BatchCreateUsersRequest(
            requests=[
                pb.CreateUserRequest(
                    email=new_email("batch"), password=f"Batch-password-{i}", display_name=f"n{i}"
                )
                for i in range(count)
            ]
        )
    )
    return list(response.users)


async def stored(world: World, users: Sequence[user_pb2.User]) -> list[user_pb2.User]:
    response = await world.admin.users.BatchGetUsers(
        pb.BatchGetUsersRequest(ids=[u.id for u in users])
    )
    return list(response.users)


def rename(user: user_pb2.User, name: str, *, etag: str = "") -> pb.UpdateUserRequest:
    return pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name=name, etag=etag))


# --------------------------------------------------------------------- update


async def test_a_batch_update_changes_every_user_and_keeps_the_order(world: World) -> None:
    users = await seed(world, 3)
    requests = [rename(u, f"renamed {i}", etag=u.etag) for i, u in reversed(list(enumerate(users)))]

    response = await world.admin.users.BatchUpdateUsers(
        pb.BatchUpdateUsersRequest(requests=requests)
    )

    assert [u.id for u in response.users] == [u.id for u in reversed(users)]
    assert [u.display_name for u in response.users] == ["renamed 2", "renamed 1", "renamed 0"]
    assert all(
        new.etag != old.etag for new, old in zip(response.users, reversed(users), strict=True)
    )
    assert [u.display_name for u in await stored(world, users)] == [
        "renamed 0",
        "renamed 1",
        "renamed 2",
    ]


async def test_the_hoisted_mask_applies_to_items_without_their_own(world: World) -> None:
    a, b = await seed(world, 2)
    requests = [
        # Sets two fields; the hoisted mask lets only display_name through.
        pb.UpdateUserRequest(
            user=user_pb2.User(id=a.id, display_name="hoisted", labels={"team": "x"})
        ),
        # Its own mask wins: labels only.
        pb.UpdateUserRequest(
            user=user_pb2.User(id=b.id, display_name="ignored", labels={"team": "y"}),
            update_mask=mask("labels"),
        ),
    ]

    response = await world.admin.users.BatchUpdateUsers(
        pb.BatchUpdateUsersRequest(requests=requests, update_mask=mask("display_name"))
    )

    first, second = response.users
    assert (first.display_name, dict(first.labels)) == ("hoisted", {})
    assert (second.display_name, dict(second.labels)) == (b.display_name, {"team": "y"})


async def test_a_stale_etag_in_item_500_of_1000_leaves_all_1000_unchanged(world: World) -> None:
    users = await seed(world, 1000)
    requests = [rename(u, "changed", etag=u.etag) for u in users]
    requests[499].user.etag = "v999"

    failure = await expect_error(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests)),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )

    assert index_of(failure) == "499"
    after = await stored(world, users)
    assert [(u.display_name, u.etag) for u in after] == [(u.display_name, u.etag) for u in users]


async def test_a_missing_user_fails_the_batch_with_its_index(world: World) -> None:
    users = await seed(world, 3)
    requests = [rename(u, "changed") for u in users]
    requests[2].user.id = missing_id()

    failure = await expect_error(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests)),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )

    assert index_of(failure) == "2"
    assert [u.display_name for u in await stored(world, users[:2])] == ["n0", "n1"]


async def test_an_email_taken_outside_the_batch_fails_it_with_the_items_index(
    world: World,
) -> None:
    users = await seed(world, 2)
    requests = [
        rename(users[0], "changed"),
        pb.UpdateUserRequest(user=user_pb2.User(id=users[1].id, email=world.bob.email)),
    ]

    failure = await expect_error(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests)),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )

    assert index_of(failure) == "1"
    assert (await stored(world, users[:1]))[0].display_name == "n0"


async def test_a_changed_email_in_a_batch_clears_the_verification(world: World) -> None:
    code = await world.service.users.CreateEmailVerificationCode(
        pb.CreateEmailVerificationCodeRequest(id=world.alice.id)
    )
    await world.alice.users.VerifyEmail(pb.VerifyEmailRequest(id="me", code=code.code))

    response = await world.admin.users.BatchUpdateUsers(
        pb.BatchUpdateUsersRequest(
            requests=[
                pb.UpdateUserRequest(user=user_pb2.User(id=world.alice.id, email=new_email()))
            ]
        )
    )

    assert not response.users[0].email_verified


async def test_batches_of_zero_or_1001_items_are_invalid(world: World) -> None:
    await expect_invalid(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest()), "requests"
    )
    too_many = [rename(world.alice.login.user, "x")] * 1001
    await expect_invalid(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=too_many)),
        "requests",
    )
    await expect_invalid(
        world.admin.users.BatchDeleteUsers(pb.BatchDeleteUsersRequest()), "requests"
    )


async def test_a_repeated_id_is_invalid_and_named_by_its_index(world: World) -> None:
    users = await seed(world, 2)
    requests = [rename(users[0], "a"), rename(users[1], "b"), rename(users[0], "c")]

    failure = await expect_invalid(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests)),
        "requests[2].user.id",
    )

    assert index_of(failure) == "2"
    assert [u.display_name for u in await stored(world, users)] == ["n0", "n1"]


async def test_an_item_without_an_id_is_invalid(world: World) -> None:
    users = await seed(world, 1)
    requests = [rename(users[0], "a"), pb.UpdateUserRequest(user=user_pb2.User(display_name="b"))]

    failure = await expect_invalid(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests)),
        "requests[1].user.id",
    )

    assert index_of(failure) == "1"


async def test_a_bad_field_is_named_after_its_item(world: World) -> None:
    users = await seed(world, 2)
    requests = [
        rename(users[0], "fine"),
        pb.UpdateUserRequest(user=user_pb2.User(id=users[1].id, email="not-an-email")),
    ]

    await expect_invalid(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests)),
        "requests[1].user.email",
    )


async def test_only_admins_write_in_batches(world: World) -> None:
    request = pb.BatchUpdateUsersRequest(requests=[rename(world.alice.login.user, "x")])
    await expect_denied(world.service.users.BatchUpdateUsers(request))
    await expect_denied(world.alice.users.BatchUpdateUsers(request))
    deletes = pb.BatchDeleteUsersRequest(requests=[pb.DeleteUserRequest(id=world.alice.id)])
    await expect_denied(world.service.users.BatchDeleteUsers(deletes))


# --------------------------------------------------------------------- delete


async def test_a_batch_delete_soft_deletes_in_order_and_ends_sessions(world: World) -> None:
    requests = [
        pb.DeleteUserRequest(id=world.bob.id, etag=world.bob.login.user.etag),
        pb.DeleteUserRequest(id=world.alice.id),
    ]

    response = await world.admin.users.BatchDeleteUsers(
        pb.BatchDeleteUsersRequest(requests=requests)
    )

    assert [u.id for u in response.users] == [world.bob.id, world.alice.id]
    assert {u.state for u in response.users} == {user_pb2.User.STATE_DELETED}
    for account in (world.alice, world.bob):
        await expect_error(
            account.users.GetUser(pb.GetUserRequest(id="me")),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )


async def test_a_stale_etag_fails_a_batch_delete_and_deletes_nothing(world: World) -> None:
    users = await seed(world, 3)
    requests = [pb.DeleteUserRequest(id=u.id, etag=u.etag) for u in users]
    requests[1].etag = "v999"

    failure = await expect_error(
        world.admin.users.BatchDeleteUsers(pb.BatchDeleteUsersRequest(requests=requests)),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )

    assert index_of(failure) == "1"
    assert {u.state for u in await stored(world, users)} == {user_pb2.User.STATE_ACTIVE}


async def test_deleting_an_already_deleted_user_fails_the_batch(world: World) -> None:
    users = await seed(world, 2)
    await world.admin.users.DeleteUser(pb.DeleteUserRequest(id=users[1].id))

    failure = await expect_error(
        world.admin.users.BatchDeleteUsers(
            pb.BatchDeleteUsersRequest(requests=[pb.DeleteUserRequest(id=u.id) for u in users])
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_STATE",
    )

    assert index_of(failure) == "1"
    assert (await stored(world, users[:1]))[0].state == user_pb2.User.STATE_ACTIVE


async def test_a_batch_delete_with_a_missing_id_or_a_repeat_is_refused(world: World) -> None:
    users = await seed(world, 1)

    await expect_invalid(
        world.admin.users.BatchDeleteUsers(
            pb.BatchDeleteUsersRequest(requests=[pb.DeleteUserRequest(id=users[0].id)] * 2)
        ),
        "requests[1].id",
    )
    await expect_invalid(
        world.admin.users.BatchDeleteUsers(
            pb.BatchDeleteUsersRequest(requests=[pb.DeleteUserRequest()])
        ),
        "requests[0].id",
    )
    assert (await stored(world, users))[0].state == user_pb2.User.STATE_ACTIVE


async def test_swapping_two_emails_in_one_batch_is_refused_and_changes_nothing(
    world: World,
) -> None:
    a, b = await seed(world, 2)
    requests = [
        pb.UpdateUserRequest(user=user_pb2.User(id=a.id, email=b.email)),
        pb.UpdateUserRequest(user=user_pb2.User(id=b.id, email=a.email)),
    ]

    await expect_error(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests)),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )

    assert [u.email for u in await stored(world, [a, b])] == [a.email, b.email]


# --------------------------------------------------------------------- events

EVENT_WAIT_SECONDS = 30.0


async def events_of(world: World, event_type: str, count: int) -> list[Any]:
    """The events of ``event_type`` once at least ``count`` are numbered
    (the sequencer numbers committed events shortly after the commit)."""
    request = event_service_pb2.ListEventsRequest(page_size=1000, filter=f'type = "{event_type}"')
    deadline = asyncio.get_running_loop().time() + EVENT_WAIT_SECONDS
    while True:
        events = list((await world.admin.events.ListEvents(request)).events)
        if len(events) >= count:
            return events
        assert asyncio.get_running_loop().time() < deadline, f"{len(events)} of {count}"
        await asyncio.sleep(0.05)


async def test_a_batch_update_writes_one_event_per_user_with_its_changed_fields(
    world: World,
) -> None:
    users = await seed(world, 3)
    requests = [
        rename(users[0], "changed"),
        pb.UpdateUserRequest(user=user_pb2.User(id=users[1].id, labels={"team": "x"})),
        rename(users[2], users[2].display_name),
    ]

    await world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests))

    events = await events_of(world, "usersvc.user.updated.v1", 3)
    by_user = {e.user_id: (list(e.changed_fields), e.user.etag, e.actor) for e in events}
    after = await stored(world, users)
    assert by_user == {
        users[0].id: (["display_name"], after[0].etag, world.admin.id),
        users[1].id: (["labels"], after[1].etag, world.admin.id),
        users[2].id: ([], after[2].etag, world.admin.id),
    }


async def test_a_failed_batch_writes_no_event(world: World) -> None:
    users = await seed(world, 3)
    requests = [rename(u, "changed", etag=u.etag) for u in users]
    requests[2].user.etag = "v999"
    await expect_error(
        world.admin.users.BatchUpdateUsers(pb.BatchUpdateUsersRequest(requests=requests)),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    # A later change: once its event is numbered, an earlier one would be too.
    await world.admin.users.BatchUpdateUsers(
        pb.BatchUpdateUsersRequest(requests=[rename(world.bob.login.user, "marker")])
    )

    events = await events_of(world, "usersvc.user.updated.v1", 1)

    assert [e.user_id for e in events] == [world.bob.id]


async def test_a_batch_delete_writes_a_deleted_event_per_user(world: World) -> None:
    users = await seed(world, 2)

    await world.admin.users.BatchDeleteUsers(
        pb.BatchDeleteUsersRequest(requests=[pb.DeleteUserRequest(id=u.id) for u in users])
    )

    events = await events_of(world, "usersvc.user.deleted.v1", 2)
    assert sorted(e.user_id for e in events) == sorted(u.id for u in users)
    assert {e.user.state for e in events} == {user_pb2.User.STATE_DELETED}
