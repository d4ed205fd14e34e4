"""UserService.UpdateUser end to end: field masks, etags, email clashes."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from .helpers import (
    World,
    assert_rich_error,
    decode_failure,
    expect_denied,
    expect_error,
    expect_invalid,
    new_email,
    user_pb2,
    user_service_pb2,
)


def update(user: user_pb2.User, *paths: str) -> user_service_pb2.UpdateUserRequest:
    return user_service_pb2.UpdateUserRequest(
        user=user, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
    )


def patch(user_id: str, **fields: object) -> user_pb2.User:
    return user_pb2.User(id=user_id, **fields)  # type: ignore[arg-type]


async def test_mask_changes_only_the_named_field(world: World) -> None:
    before = await world.get_as_admin(world.alice.id)
    request = update(
        patch(world.alice.id, display_name="Alice Liddell", email=new_email("ignored")),
        "display_name",
    )

    after = (await world.alice.users.UpdateUser(request)).user

    assert after.display_name == "Alice Liddell"
    assert after.email == before.email
    assert dict(after.labels) == dict(before.labels)


async def test_email_update_is_lower_cased(world: World) -> None:
    email = new_email("renamed")

    after = (
        await world.alice.users.UpdateUser(
            update(patch(world.alice.id, email=email.upper()), "email")
        )
    ).user

    assert after.email == email


async def test_labels_update_replaces_the_whole_map(world: World) -> None:
    await world.alice.users.UpdateUser(
        update(patch(world.alice.id, labels={"a": "1", "b": "2"}), "labels")
    )

    after = (
        await world.alice.users.UpdateUser(
            update(patch(world.alice.id, labels={"c": "3"}), "labels")
        )
    ).user

    assert dict(after.labels) == {"c": "3"}


async def test_admin_may_change_roles(world: World) -> None:
    after = (
        await world.admin.users.UpdateUser(
            update(patch(world.bob.id, roles=["user", "service"]), "roles")
        )
    ).user

    assert set(after.roles) == {"user", "service"}


async def test_user_changing_its_own_roles_is_permission_denied(world: World) -> None:
    await expect_denied(
        world.alice.users.UpdateUser(
            update(patch(world.alice.id, roles=["user", "admin"]), "roles")
        )
    )


async def test_star_mask_as_admin_writes_every_writable_field(world: World) -> None:
    email = new_email("star")
    request = update(
        patch(
            world.bob.id,
            email=email,
            display_name="Robert",
            roles=["user", "admin"],
            labels={"team": "core"},
        ),
        "*",
    )

    after = (await world.admin.users.UpdateUser(request)).user

    assert (after.email, after.display_name, set(after.roles), dict(after.labels)) == (
        email,
        "Robert",
        {"user", "admin"},
        {"team": "core"},
    )


async def test_star_mask_clears_writable_fields_left_unset(world: World) -> None:
    await world.alice.users.UpdateUser(update(patch(world.alice.id, labels={"x": "y"}), "labels"))
    request = update(patch(world.alice.id, email=world.alice.email, roles=["user"]), "*")

    after = (await world.admin.users.UpdateUser(request)).user

    assert after.display_name == ""
    assert dict(after.labels) == {}


async def test_empty_mask_updates_only_the_fields_that_are_set(world: World) -> None:
    await world.alice.users.UpdateUser(
        update(patch(world.alice.id, labels={"keep": "me"}), "labels")
    )

    after = (
        await world.alice.users.UpdateUser(update(patch(world.alice.id, display_name="Ally")))
    ).user

    assert after.display_name == "Ally"
    assert after.email == world.alice.email
    assert dict(after.labels) == {"keep": "me"}


@pytest.mark.parametrize("path", ["nickname", "password", "labels.team.extra", ""])
async def test_unknown_mask_path_is_invalid_argument_naming_update_mask(
    world: World, path: str
) -> None:
    await expect_invalid(
        world.admin.users.UpdateUser(update(patch(world.bob.id, display_name="B"), path)),
        "update_mask",
    )


@pytest.mark.parametrize(
    "path", ["id", "state", "create_time", "update_time", "delete_time", "etag"]
)
async def test_output_only_mask_path_is_invalid_argument_naming_update_mask(
    world: World, path: str
) -> None:
    await expect_invalid(
        world.admin.users.UpdateUser(update(patch(world.bob.id), path)), "update_mask"
    )


async def test_invalid_email_in_update_is_invalid_argument_naming_user_email(world: World) -> None:
    await expect_invalid(
        world.alice.users.UpdateUser(update(patch(world.alice.id, email="nope"), "email")),
        "user.email",
    )


async def test_update_without_an_id_is_invalid_argument(world: World) -> None:
    failure = await expect_invalid(
        world.admin.users.UpdateUser(update(patch("", display_name="X"), "display_name"))
    )

    assert all(name.startswith("user") for name in failure.violation_fields)


async def test_update_to_an_email_taken_by_another_user_is_already_exists(world: World) -> None:
    await expect_error(
        world.alice.users.UpdateUser(
            update(patch(world.alice.id, email=world.bob.email.upper()), "email")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )


async def test_update_of_a_missing_user_by_an_admin_is_not_found(world: World) -> None:
    await expect_error(
        world.admin.users.UpdateUser(
            update(patch(str(uuid.uuid4()), display_name="Ghost"), "display_name")
        ),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )


async def test_current_etag_lets_the_update_through_and_changes_the_etag(world: World) -> None:
    before = await world.get_as_admin(world.bob.id)

    after = (
        await world.admin.users.UpdateUser(
            update(patch(world.bob.id, etag=before.etag, display_name="Bobby"), "display_name")
        )
    ).user

    assert after.display_name == "Bobby"
    assert after.etag != before.etag


async def test_update_time_moves_forward_on_update(world: World) -> None:
    before = await world.get_as_admin(world.bob.id)

    after = (
        await world.admin.users.UpdateUser(
            update(patch(world.bob.id, display_name="B2"), "display_name")
        )
    ).user

    assert after.update_time.ToNanoseconds() > before.update_time.ToNanoseconds()
    assert after.create_time == before.create_time


async def test_stale_etag_is_aborted_and_changes_nothing(world: World) -> None:
    stale = await world.get_as_admin(world.bob.id)
    await world.admin.users.UpdateUser(
        update(patch(world.bob.id, display_name="First"), "display_name")
    )
    current = await world.get_as_admin(world.bob.id)

    await expect_error(
        world.admin.users.UpdateUser(
            update(patch(world.bob.id, etag=stale.etag, display_name="Second"), "display_name")
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )

    assert await world.get_as_admin(world.bob.id) == current


async def test_update_of_a_deleted_user_is_failed_precondition(world: World) -> None:
    await world.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=world.bob.id))

    await expect_error(
        world.admin.users.UpdateUser(update(patch(world.bob.id, display_name="Z"), "display_name")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_STATE",
    )


async def test_changing_only_the_case_of_ones_own_email_is_not_a_clash(world: World) -> None:
    after = (
        await world.alice.users.UpdateUser(
            update(patch(world.alice.id, email=world.alice.email.upper()), "email")
        )
    ).user

    assert after.email == world.alice.email


async def test_update_to_a_deleted_users_email_is_already_exists(world: World) -> None:
    await world.admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=world.bob.id))

    await expect_error(
        world.alice.users.UpdateUser(update(patch(world.alice.id, email=world.bob.email), "email")),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )


async def test_too_many_labels_is_invalid_argument_naming_labels(world: World) -> None:
    labels = {f"k{i}": "v" for i in range(65)}

    failure = await expect_invalid(
        world.alice.users.UpdateUser(update(patch(world.alice.id, labels=labels), "labels"))
    )

    assert all(name.startswith("user.labels") for name in failure.violation_fields)


async def test_label_value_over_256_characters_is_invalid_argument(world: World) -> None:
    failure = await expect_invalid(
        world.alice.users.UpdateUser(
            update(patch(world.alice.id, labels={"team": "v" * 257}), "labels")
        )
    )

    assert all(name.startswith("user.labels") for name in failure.violation_fields)


async def test_concurrent_updates_with_one_etag_let_exactly_one_through(world: World) -> None:
    etag = (await world.get_as_admin(world.bob.id)).etag
    calls = [
        world.admin.users.UpdateUser(
            update(patch(world.bob.id, etag=etag, display_name=f"Writer {i}"), "display_name")
        )
        for i in range(6)
    ]

    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 5
    for loser in losers:
        assert_rich_error(decode_failure(loser), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert (await world.get_as_admin(world.bob.id)).display_name == winners[0].user.display_name
