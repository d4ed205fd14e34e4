"""What reflection publishes: the services, methods, messages and fields
docs/api.md fixes by name."""

from __future__ import annotations

import pytest

from .client import AUTH_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE, USER_SERVICE, ReflectedApi

USER_FIELDS = {
    "id",
    "email",
    "display_name",
    "roles",
    "state",
    "labels",
    "create_time",
    "update_time",
    "delete_time",
    "etag",
}
USER_STATES = {"STATE_UNSPECIFIED", "STATE_ACTIVE", "STATE_DISABLED", "STATE_DELETED"}
TOKEN_PAIR = {"access_token", "refresh_token", "token_type", "expires_in", "user"}

# (service, method) -> (request fields, response fields), from docs/api.md.
METHODS = {
    (USER_SERVICE, "CreateUser"): (
        {"email", "password", "display_name", "roles", "labels", "request_id"},
        {"user"},
    ),
    (USER_SERVICE, "GetUser"): ({"id"}, {"user"}),
    (USER_SERVICE, "LookupUser"): ({"email"}, {"user"}),
    (USER_SERVICE, "ListUsers"): (
        {"page_size", "page_token", "filter", "order_by", "show_deleted"},
        {"users", "next_page_token", "total_size"},
    ),
    (USER_SERVICE, "UpdateUser"): ({"user", "update_mask"}, {"user"}),
    (USER_SERVICE, "DeleteUser"): ({"id", "etag"}, {"user"}),
    (USER_SERVICE, "UndeleteUser"): ({"id"}, {"user"}),
    (USER_SERVICE, "PurgeUser"): ({"id"}, set()),
    (USER_SERVICE, "DisableUser"): ({"id"}, {"user"}),
    (USER_SERVICE, "EnableUser"): ({"id"}, {"user"}),
    (USER_SERVICE, "ChangePassword"): ({"id", "current_password", "new_password"}, set()),
    (USER_SERVICE, "BatchCreateUsers"): ({"requests", "request_id"}, {"users"}),
    (USER_SERVICE, "BatchGetUsers"): ({"ids"}, {"users"}),
    (AUTH_SERVICE, "Login"): ({"email", "password"}, TOKEN_PAIR),
    (AUTH_SERVICE, "RefreshToken"): ({"refresh_token"}, TOKEN_PAIR),
    (AUTH_SERVICE, "Logout"): ({"refresh_token"}, set()),
    (AUTH_SERVICE, "RevokeAllSessions"): ({"user_id"}, {"revoked_count"}),
    (AUTH_SERVICE, "GetJwks"): (set(), {"jwks_json"}),
    (AUTH_SERVICE, "IntrospectToken"): (
        {"token"},
        {"active", "sub", "roles", "session_id", "expire_time"},
    ),
}


def test_reflection_lists_the_api_and_the_standard_services(api: ReflectedApi) -> None:
    assert {USER_SERVICE, AUTH_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE} <= api.service_names()


@pytest.mark.parametrize(("service", "method"), sorted(METHODS))
def test_each_documented_method_has_its_own_request_and_response_with_the_documented_fields(
    api: ReflectedApi, service: str, method: str
) -> None:
    descriptor = api.method(f"{service}.{method}")
    request_fields, response_fields = METHODS[(service, method)]

    assert not descriptor.client_streaming
    assert not descriptor.server_streaming
    assert descriptor.input_type.full_name == f"usersvc.v1.{method}Request"
    assert descriptor.output_type.full_name == f"usersvc.v1.{method}Response"
    assert request_fields <= set(descriptor.input_type.fields_by_name)
    assert response_fields <= set(descriptor.output_type.fields_by_name)


def test_the_user_resource_has_the_documented_fields_and_states(api: ReflectedApi) -> None:
    user = api.pool.FindMessageTypeByName("usersvc.v1.User")

    assert set(user.fields_by_name) >= USER_FIELDS
    assert set(user.enum_types_by_name["State"].values_by_name) == USER_STATES
    for name in ("create_time", "update_time", "delete_time"):
        assert user.fields_by_name[name].message_type.full_name == "google.protobuf.Timestamp"
    assert "password" not in user.fields_by_name
    assert "password_hash" not in user.fields_by_name


def test_update_user_takes_a_field_mask(api: ReflectedApi) -> None:
    request = api.method(f"{USER_SERVICE}.UpdateUser").input_type
    assert request.fields_by_name["update_mask"].message_type.full_name == (
        "google.protobuf.FieldMask"
    )
