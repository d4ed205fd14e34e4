"""The one selector of methods callable without credentials."""

from __future__ import annotations

import pytest

from usersvc.api.public import PublicMethods

ALWAYS_PUBLIC = [
    "/usersvc.v1.AuthService/Login",
    "/usersvc.v1.AuthService/GetJwks",
    "/usersvc.v1.AuthService/RefreshToken",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
]
NEVER_PUBLIC = [
    "/usersvc.v1.UserService/GetUser",
    "/usersvc.v1.UserService/BatchCreateUsers",
    "/usersvc.v1.AuthService/Logout",
    "/usersvc.v1.AuthService/RevokeAllSessions",
    "/usersvc.v1.AuthService/IntrospectToken",
    "/grpc.health.v1.HealthX/Check",
    "/usersvc.v1.AuthService/LoginX",
]


@pytest.mark.parametrize("method", ALWAYS_PUBLIC)
@pytest.mark.parametrize("allow_signup", [True, False])
def test_login_jwks_refresh_health_and_reflection_are_public(
    method: str, allow_signup: bool
) -> None:
    assert PublicMethods(allow_signup=allow_signup).is_public(method)


@pytest.mark.parametrize("method", NEVER_PUBLIC)
def test_other_methods_need_credentials(method: str) -> None:
    assert not PublicMethods(allow_signup=True).is_public(method)


def test_create_user_is_public_when_sign_up_is_enabled() -> None:
    assert PublicMethods(allow_signup=True).is_public("/usersvc.v1.UserService/CreateUser")


def test_create_user_needs_credentials_when_sign_up_is_disabled() -> None:
    assert not PublicMethods(allow_signup=False).is_public("/usersvc.v1.UserService/CreateUser")
