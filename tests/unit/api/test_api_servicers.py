"""The servicers are thin: request -> service input, one call as the caller
in the context, result -> response."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from usersvc_protos.v1 import auth_service_pb2, auth_service_pb2_grpc, user_pb2
from usersvc_protos.v1 import user_service_pb2 as pb
from usersvc.api.auth_servicer import AuthServicer
from usersvc.api.context import set_principal
from usersvc.api.user_servicer import UserServicer
from usersvc.domain.models import UserPatch
from usersvc.services.inputs import (
    CreateUserInput,
    ListUsersInput,
    TokenIntrospection,
    UpdateUserInput,
)

from .support import CALLER, CALLER_ID, FakeAuthService, FakeUserService

OTHER_ID = "0190b4a4-7d40-7c3e-9a51-000000000002"


@pytest.fixture
def users() -> FakeUserService:
    return FakeUserService()


@pytest.fixture
def servicer(users: FakeUserService) -> Iterator[UserServicer]:
    token = set_principal(CALLER)
    yield UserServicer(users)
    token.var.reset(token)


async def _only_call(users: FakeUserService) -> tuple[str, dict[str, Any]]:
    [call] = users.calls
    assert call.principal is CALLER
    return call.method, call.kwargs


async def test_create_user_passes_the_mapped_input(
    servicer: UserServicer, users: FakeUserService
) -> None:
    response = await servicer.CreateUser(
        pb.CreateUserRequest(email="a@example.com", password="pw", request_id="r"), None
    )
    assert await _only_call(users) == (
        "create_user",
        {"request": CreateUserInput(email="a@example.com", password="pw", request_id="r")},
    )
    assert response.user.id == CALLER_ID


async def test_get_user_passes_the_id(servicer: UserServicer, users: FakeUserService) -> None:
    response = await servicer.GetUser(pb.GetUserRequest(id="me"), None)
    assert (await _only_call(users), response.user.email) == (
        ("get_user", {"user_id": "me"}),
        "ada@example.com",
    )


async def test_lookup_user_passes_the_email(servicer: UserServicer, users: FakeUserService) -> None:
    await servicer.LookupUser(pb.LookupUserRequest(email="ada@example.com"), None)
    assert await _only_call(users) == ("lookup_user", {"email": "ada@example.com"})


async def test_list_users_passes_the_query_and_returns_the_page(
    servicer: UserServicer, users: FakeUserService
) -> None:
    response = pb.ListUsersResponse.FromString(
        await servicer.ListUsers(pb.ListUsersRequest(page_size=5, order_by="email"), None)
    )
    assert await _only_call(users) == (
        "list_users",
        {"request": ListUsersInput(page_size=5, order_by="email")},
    )
    assert (len(response.users), response.next_page_token, response.total_size) == (1, "next", 7)


async def test_update_user_passes_the_masked_patch(
    servicer: UserServicer, users: FakeUserService
) -> None:
    request = pb.UpdateUserRequest(
        user=user_pb2.User(id=CALLER_ID, display_name="New", email="ignored@example.com"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )
    await servicer.UpdateUser(request, None)
    assert await _only_call(users) == (
        "update_user",
        {
            "request": UpdateUserInput(
                user_id=CALLER_ID, etag="", patch=UserPatch(display_name="New")
            )
        },
    )


async def test_delete_user_passes_id_and_etag_and_returns_the_deleted_user(
    servicer: UserServicer, users: FakeUserService
) -> None:
    response = await servicer.DeleteUser(pb.DeleteUserRequest(id=CALLER_ID, etag='W/"3"'), None)
    assert await _only_call(users) == ("delete_user", {"user_id": CALLER_ID, "etag": 'W/"3"'})
    assert response.user.state == user_pb2.User.STATE_DELETED


@pytest.mark.parametrize(
    ("rpc", "request_type", "method"),
    [
        ("UndeleteUser", pb.UndeleteUserRequest, "undelete_user"),
        ("DisableUser", pb.DisableUserRequest, "disable_user"),
        ("EnableUser", pb.EnableUserRequest, "enable_user"),
        ("PurgeUser", pb.PurgeUserRequest, "purge_user"),
    ],
)
async def test_state_changes_pass_the_id(
    servicer: UserServicer, users: FakeUserService, rpc: str, request_type: Any, method: str
) -> None:
    await getattr(servicer, rpc)(request_type(id=CALLER_ID), None)
    assert await _only_call(users) == (method, {"user_id": CALLER_ID})


async def test_purge_user_answers_an_empty_response(servicer: UserServicer) -> None:
    response = await servicer.PurgeUser(pb.PurgeUserRequest(id=CALLER_ID), None)
    assert response == pb.PurgeUserResponse()


async def test_change_password_passes_both_passwords(
    servicer: UserServicer, users: FakeUserService
) -> None:
    await servicer.ChangePassword(
        pb.ChangePasswordRequest(id="me", current_password="old", new_password="new"), None
    )
    assert await _only_call(users) == (
        "change_password",
        {"user_id": "me", "current_password": "old", "new_password": "new"},
    )


async def test_batch_create_users_keeps_the_order(
    servicer: UserServicer, users: FakeUserService
) -> None:
    request = pb.BatchCreateUsersRequest(
        requests=[
            pb.CreateUserRequest(email="b@example.com"),
            pb.CreateUserRequest(email="a@example.com"),
        ],
        request_id="batch-1",
    )
    response = await servicer.BatchCreateUsers(request, None)
    assert [u.email for u in response.users] == ["b@example.com", "a@example.com"]
    assert users.calls[0].kwargs["request_id"] == "batch-1"


async def test_batch_get_users_keeps_the_order(servicer: UserServicer) -> None:
    response = pb.BatchGetUsersResponse.FromString(
        await servicer.BatchGetUsers(pb.BatchGetUsersRequest(ids=[OTHER_ID, CALLER_ID]), None)
    )
    assert [u.id for u in response.users] == [OTHER_ID, CALLER_ID]


async def test_login_answers_the_token_pair() -> None:
    response = await AuthServicer(FakeAuthService()).Login(
        auth_service_pb2.LoginRequest(email="ada@example.com", password="pw"), None
    )
    assert (response.access_token, response.token_type, response.user.email) == (
        "at",
        "Bearer",
        "ada@example.com",
    )


async def test_get_jwks_answers_the_key_set() -> None:
    response = await AuthServicer(FakeAuthService()).GetJwks(
        auth_service_pb2.GetJwksRequest(), None
    )
    assert response.jwks_json == '{"keys": []}'


@pytest.fixture
def auth() -> Iterator[FakeAuthService]:
    token = set_principal(CALLER)
    yield FakeAuthService()
    token.var.reset(token)


async def test_refresh_token_passes_the_token_and_answers_the_new_pair(
    auth: FakeAuthService,
) -> None:
    response = await AuthServicer(auth).RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token="rt_old"), None
    )
    [call] = auth.calls
    assert (call.method, call.kwargs) == ("refresh_token", {"refresh_token": "rt_old"})
    assert (response.access_token, response.refresh_token, response.token_type) == (
        "at2",
        "rt2",
        "Bearer",
    )
    assert (response.expires_in, response.user.id) == (900, CALLER_ID)


async def test_logout_passes_the_caller_and_the_optional_refresh_token(
    auth: FakeAuthService,
) -> None:
    response = await AuthServicer(auth).Logout(
        auth_service_pb2.LogoutRequest(refresh_token="rt_x"), None
    )
    [call] = auth.calls
    assert (call.method, call.principal, call.kwargs) == (
        "logout",
        CALLER,
        {"refresh_token": "rt_x"},
    )
    assert response == auth_service_pb2.LogoutResponse()


async def test_revoke_all_sessions_passes_the_user_id_and_answers_the_count(
    auth: FakeAuthService,
) -> None:
    response = await AuthServicer(auth).RevokeAllSessions(
        auth_service_pb2.RevokeAllSessionsRequest(user_id="me"), None
    )
    [call] = auth.calls
    assert (call.method, call.principal, call.kwargs) == (
        "revoke_all_sessions",
        CALLER,
        {"user_id": "me"},
    )
    assert response.revoked_count == 3


async def test_introspect_token_answers_the_claims_of_an_active_token(
    auth: FakeAuthService,
) -> None:
    response = await AuthServicer(auth).IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token="some.jwt"), None
    )
    [call] = auth.calls
    assert (call.method, call.principal, call.kwargs) == (
        "introspect_token",
        CALLER,
        {"token": "some.jwt"},
    )
    assert (response.active, response.sub, list(response.roles), response.session_id) == (
        True,
        CALLER_ID,
        ["admin", "user"],
        "s1",
    )
    assert response.expire_time.ToDatetime(tzinfo=UTC) == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


async def test_introspect_token_answers_only_active_false_for_an_inactive_token(
    auth: FakeAuthService,
) -> None:
    auth.introspection = TokenIntrospection(active=False)
    response = await AuthServicer(auth).IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token="bad"), None
    )
    assert response == auth_service_pb2.IntrospectTokenResponse(active=False)


@pytest.mark.parametrize("rpc", ["RefreshToken", "Logout", "RevokeAllSessions", "IntrospectToken"])
def test_every_auth_method_is_implemented_here(rpc: str) -> None:
    assert getattr(AuthServicer, rpc) is not getattr(auth_service_pb2_grpc.AuthServiceServicer, rpc)
