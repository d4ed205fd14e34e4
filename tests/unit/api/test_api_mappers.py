"""Proto <-> domain mapping, and the update mask rules of AIP-134."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import field_mask_pb2

from usersvc_protos.v1 import user_pb2, user_service_pb2
from usersvc.api import mappers
from usersvc.domain.errors import InvalidArgument
from usersvc.domain.models import UserPatch
from usersvc.services.inputs import CreateUserInput, ListUsersInput, LoginResult, UserListResult

from .support import make_user

OUTPUT_ONLY = ["id", "state", "create_time", "update_time", "delete_time", "etag"]


def _update(
    paths: list[str] | None = None, **user_fields: object
) -> user_service_pb2.UpdateUserRequest:
    user_fields.setdefault("id", "0190b4a4-7d40-7c3e-9a51-6a1b2c3d4e5f")
    request = user_service_pb2.UpdateUserRequest(user=user_pb2.User(**user_fields))
    if paths is not None:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    return request


def _violations(error: pytest.ExceptionInfo[InvalidArgument]) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in error.value.violations]


# user_to_proto


def test_user_to_proto_copies_the_plain_fields() -> None:
    user = make_user()
    message = mappers.user_to_proto(user)
    assert (
        message.id,
        message.email,
        message.display_name,
        list(message.roles),
        dict(message.labels),
        message.etag,
    ) == (str(user.id), user.email, user.display_name, ["user"], {"team": "payments"}, user.etag)


def test_user_to_proto_keeps_the_exact_timestamps() -> None:
    user = make_user()
    message = mappers.user_to_proto(user)
    assert (
        message.create_time.ToDatetime(tzinfo=UTC),
        message.update_time.ToDatetime(tzinfo=UTC),
    ) == (user.create_time, user.update_time)


def test_user_to_proto_marks_times_at_the_unix_epoch_as_set() -> None:
    # Filled in place, a Timestamp of all zeros must still be present, as
    # one passed whole was.
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    user = make_user(create_time=epoch, update_time=epoch, delete_time=epoch)
    message = mappers.user_to_proto(user)
    assert [message.HasField(name) for name in ("create_time", "update_time", "delete_time")] == [
        True,
        True,
        True,
    ]
    assert message.create_time.ToDatetime(tzinfo=UTC) == epoch


def test_user_to_proto_leaves_roles_and_labels_empty_when_the_user_has_none() -> None:
    message = mappers.user_to_proto(make_user(roles=(), labels={}))
    assert (list(message.roles), dict(message.labels)) == ([], {})


def test_user_to_proto_converts_other_time_zones_to_the_same_instant() -> None:
    moment = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    message = mappers.user_to_proto(make_user(create_time=moment))
    assert message.create_time.ToDatetime(tzinfo=UTC) == moment


def test_user_to_proto_leaves_delete_time_unset_for_a_live_user() -> None:
    assert not mappers.user_to_proto(make_user()).HasField("delete_time")


@pytest.mark.parametrize(
    ("overrides", "state"),
    [
        ({}, user_pb2.User.STATE_ACTIVE),
        ({"disable_time": datetime(2024, 6, 1, tzinfo=UTC)}, user_pb2.User.STATE_DISABLED),
        ({"delete_time": datetime(2024, 6, 1, tzinfo=UTC)}, user_pb2.User.STATE_DELETED),
    ],
    ids=["active", "disabled", "deleted"],
)
def test_user_to_proto_maps_the_state(overrides: dict[str, object], state: int) -> None:
    assert mappers.user_to_proto(make_user(**overrides)).state == state


def test_user_to_proto_sets_delete_time_for_a_deleted_user() -> None:
    deleted = datetime(2024, 6, 1, 10, 30, tzinfo=UTC)
    message = mappers.user_to_proto(make_user(delete_time=deleted))
    assert message.delete_time.ToDatetime(tzinfo=UTC) == deleted


def test_user_to_proto_refuses_naive_timestamps() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        mappers.user_to_proto(make_user(create_time=datetime(2024, 1, 1)))


def test_the_user_message_has_no_field_for_a_password() -> None:
    names = {f.name for f in user_pb2.User.DESCRIPTOR.fields}
    assert not any("password" in name or "hash" in name for name in names)


# requests -> service inputs


def test_create_user_input_copies_every_field() -> None:
    request = user_service_pb2.CreateUserRequest(
        email="ada@example.com",
        password="correct horse",
        display_name="Ada",
        roles=["user", "admin"],
        labels={"team": "payments"},
        request_id="r-1",
    )
    assert mappers.create_user_input(request) == CreateUserInput(
        email="ada@example.com",
        password="correct horse",
        display_name="Ada",
        roles=("user", "admin"),
        labels={"team": "payments"},
        request_id="r-1",
    )


def test_create_user_inputs_keep_the_batch_order() -> None:
    request = user_service_pb2.BatchCreateUsersRequest(
        requests=[
            user_service_pb2.CreateUserRequest(email="b@example.com"),
            user_service_pb2.CreateUserRequest(email="a@example.com"),
        ]
    )
    assert [i.email for i in mappers.create_user_inputs(request)] == [
        "b@example.com",
        "a@example.com",
    ]


def test_list_users_input_copies_every_field() -> None:
    request = user_service_pb2.ListUsersRequest(
        page_size=10, page_token="t", filter='email:"x"', order_by="email desc", show_deleted=True
    )
    assert mappers.list_users_input(request) == ListUsersInput(
        page_size=10, page_token="t", filter='email:"x"', order_by="email desc", show_deleted=True
    )


# update masks


def test_update_changes_only_the_paths_in_the_mask() -> None:
    request = _update(["display_name"], email="new@example.com", display_name="New")
    assert mappers.update_user_input(request).patch == UserPatch(display_name="New")


def test_update_with_star_selects_every_writable_field() -> None:
    request = _update(["*"], email="new@example.com", display_name="New", roles=["admin"])
    assert mappers.update_user_input(request).patch == UserPatch(
        email="new@example.com", display_name="New", roles=("admin",), labels={}
    )


def test_update_copies_empty_values_of_masked_fields_to_clear_them() -> None:
    request = _update(["display_name", "labels"])
    assert mappers.update_user_input(request).patch == UserPatch(display_name="", labels={})


def test_update_with_an_empty_mask_selects_the_fields_that_are_set() -> None:
    request = _update(None, display_name="New", labels={"team": "core"})
    assert mappers.update_user_input(request).patch == UserPatch(
        display_name="New", labels={"team": "core"}
    )


def test_update_with_an_empty_mask_and_nothing_set_changes_nothing() -> None:
    assert mappers.update_user_input(_update(None)).patch.is_empty()


def test_update_rejects_an_unknown_path_naming_it() -> None:
    with pytest.raises(InvalidArgument) as error:
        mappers.update_user_input(_update(["password"]))
    [(field, description)] = _violations(error)
    assert (field, "'password'" in description) == ("update_mask", True)


@pytest.mark.parametrize("path", OUTPUT_ONLY)
def test_update_rejects_an_output_only_path_naming_it(path: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        mappers.update_user_input(_update([path]))
    [(field, description)] = _violations(error)
    assert (field, f"{path!r} is output only" in description) == ("update_mask", True)


def test_update_reports_every_bad_path() -> None:
    with pytest.raises(InvalidArgument) as error:
        mappers.update_user_input(_update(["etag", "display_name", "nickname"]))
    assert len(error.value.violations) == 2


def test_update_rejects_a_missing_user_id() -> None:
    with pytest.raises(InvalidArgument) as error:
        mappers.update_user_input(_update(["display_name"], id=""))
    assert [v.field for v in error.value.violations] == ["user.id"]


def test_update_passes_the_id_and_etag_on() -> None:
    request = _update(["display_name"], id="u-1", etag='W/"3"')
    result = mappers.update_user_input(request)
    assert (result.user_id, result.etag) == ("u-1", 'W/"3"')


# results -> responses


async def test_user_list_response_carries_the_page() -> None:
    response = user_service_pb2.ListUsersResponse.FromString(
        await mappers.encoded_user_list_response(
            UserListResult(users=(make_user(),), next_page_token="next", total_size=7)
        )
    )
    assert ([u.email for u in response.users], response.next_page_token, response.total_size) == (
        ["ada@example.com"],
        "next",
        7,
    )


def test_login_response_carries_the_token_pair_and_the_user() -> None:
    response = mappers.login_response(
        LoginResult(
            access_token="at",
            refresh_token="rt",
            token_type="Bearer",
            expires_in=900,
            user=make_user(),
        )
    )
    assert (
        response.access_token,
        response.refresh_token,
        response.token_type,
        response.expires_in,
        response.user.email,
    ) == ("at", "rt", "Bearer", 900, "ada@example.com")


def _batch_item(user_id: str, *paths: str, **fields: object) -> user_service_pb2.UpdateUserRequest:
    item = user_service_pb2.UpdateUserRequest(user=user_pb2.User(id=user_id, **fields))
    if paths:
        item.update_mask.paths.extend(paths)
    return item


def test_a_batch_item_without_a_mask_takes_the_requests_mask() -> None:
    request = user_service_pb2.BatchUpdateUsersRequest(
        requests=[_batch_item("a", display_name="New", labels={"k": "v"})],
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )

    (item,) = mappers.batch_update_user_inputs(request)

    assert item.patch == UserPatch(display_name="New")


def test_a_batch_items_own_mask_wins_over_the_requests() -> None:
    request = user_service_pb2.BatchUpdateUsersRequest(
        requests=[_batch_item("a", "labels", display_name="Ignored", labels={"k": "v"})],
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )

    (item,) = mappers.batch_update_user_inputs(request)

    assert item.patch == UserPatch(labels={"k": "v"})


def test_batch_item_violations_are_named_after_the_item_and_the_first_is_indexed() -> None:
    request = user_service_pb2.BatchUpdateUsersRequest(
        requests=[
            _batch_item("a", display_name="Fine"),
            _batch_item("", display_name="No id"),
            _batch_item("c", "state", display_name="Output only"),
        ]
    )

    with pytest.raises(InvalidArgument) as raised:
        mappers.batch_update_user_inputs(request)

    assert [v.field for v in raised.value.violations] == [
        "requests[1].user.id",
        "requests[2].update_mask",
    ]
    assert raised.value.metadata == {"index": "1"}


def test_a_bad_request_mask_is_reported_once_on_update_mask() -> None:
    request = user_service_pb2.BatchUpdateUsersRequest(
        requests=[_batch_item("a", display_name="x")] * 3,
        update_mask=field_mask_pb2.FieldMask(paths=["password"]),
    )

    with pytest.raises(InvalidArgument) as raised:
        mappers.batch_update_user_inputs(request)

    assert [v.field for v in raised.value.violations] == ["update_mask"]


def test_user_to_proto_carries_email_verified() -> None:
    assert mappers.user_to_proto(make_user(email_verified=True)).email_verified
