"""The error shape every consumer relies on: a google.rpc.Status in
grpc-status-details-bin with exactly one ErrorInfo of domain usersvc.v1,
and BadRequest field violations on INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from .client import ERROR_DOMAIN, USER_SERVICE, CallFailed, Failure, ReflectedApi
from .conftest import Account, create_user, new_password


def failure(api: ReflectedApi, method: str, **kwargs: object) -> Failure:
    with pytest.raises(CallFailed) as raised:
        api.call(method, **kwargs)  # type: ignore[arg-type]
    return raised.value.failure


def assert_error_shape(found: Failure, code: grpc.StatusCode, reason: str) -> None:
    assert found.code == code, found
    assert found.status is not None, "no google.rpc.Status in grpc-status-details-bin"
    assert found.status.code == code.value[0]
    assert found.status.message == found.message
    (info,) = found.error_infos()
    assert info.domain == ERROR_DOMAIN
    assert info.reason == reason


def creation_failure(api: ReflectedApi, request: pytest.FixtureRequest, **fields: str) -> Failure:
    with pytest.raises(CallFailed) as raised:
        create_user(api, request, **fields)
    return raised.value.failure


def test_an_invalid_email_is_invalid_argument_with_a_field_violation(
    api: ReflectedApi, request: pytest.FixtureRequest
) -> None:
    found = creation_failure(api, request, email="not-an-email", password=new_password())

    assert_error_shape(found, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert "email" in found.violated_fields()


def test_a_common_password_is_a_weak_password_field_violation(
    api: ReflectedApi, request: pytest.FixtureRequest
) -> None:
    found = creation_failure(api, request, email="weak@example.com", password="password")

    assert found.code == grpc.StatusCode.INVALID_ARGUMENT
    assert found.status is not None
    assert len(found.error_infos()) == 1
    assert "password" in found.violated_fields()


def test_a_call_without_a_token_is_unauthenticated_token_invalid(api: ReflectedApi) -> None:
    found = failure(api, f"{USER_SERVICE}.GetUser", id="me")

    assert_error_shape(found, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


def test_a_malformed_token_is_unauthenticated_token_invalid(api: ReflectedApi) -> None:
    found = failure(api, f"{USER_SERVICE}.GetUser", token="not.a.jwt", id="me")

    assert_error_shape(found, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


def test_a_user_may_not_list_users(api: ReflectedApi, account: Account) -> None:
    found = failure(api, f"{USER_SERVICE}.ListUsers", token=account.access_token)

    assert_error_shape(found, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


def test_a_user_may_not_read_another_user_whether_or_not_it_exists(
    api: ReflectedApi, account: Account
) -> None:
    missing = "00000000-0000-7000-8000-000000000000"
    found = failure(api, f"{USER_SERVICE}.GetUser", token=account.access_token, id=missing)

    assert_error_shape(found, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


def test_an_admin_reading_a_missing_user_gets_not_found(
    api: ReflectedApi, admin_token: str
) -> None:
    missing = "00000000-0000-7000-8000-000000000000"
    found = failure(api, f"{USER_SERVICE}.GetUser", token=admin_token, id=missing)

    assert_error_shape(found, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
