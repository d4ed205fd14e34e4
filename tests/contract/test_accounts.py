"""Sign up, log in, and act as oneself with the bearer token; tokens are
verifiable offline with the published key set."""

from __future__ import annotations

import json

import grpc
import jwt
import pytest

from .client import AUTH_SERVICE, USER_SERVICE, CallFailed, ReflectedApi, unverified_header
from .conftest import Account, new_email, new_password, sign_up


def test_sign_up_returns_the_user_lower_cased_active_and_with_the_user_role(
    api: ReflectedApi, request: pytest.FixtureRequest
) -> None:
    account = sign_up(api, request)
    reply = api.call(f"{USER_SERVICE}.GetUser", token=account.access_token, id="me")
    user = reply.message.user

    assert user.id == account.user_id
    assert user.email == account.email.lower()
    assert list(user.roles) == ["user"]
    assert (
        user.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[user.state].name
        == "STATE_ACTIVE"
    )
    assert user.etag
    assert user.create_time.seconds > 0


def test_login_returns_a_bearer_token_pair_and_the_user(
    api: ReflectedApi, account: Account
) -> None:
    reply = api.call(f"{AUTH_SERVICE}.Login", email=account.email, password=account.password)
    message = reply.message

    assert message.token_type == "Bearer"
    assert message.expires_in > 0
    assert message.refresh_token
    assert message.refresh_token.count(".") != 2
    assert message.user.id == account.user_id


def test_the_access_token_verifies_offline_with_the_published_key_set(
    api: ReflectedApi, account: Account
) -> None:
    header = unverified_header(account.access_token)
    jwks = json.loads(api.call(f"{AUTH_SERVICE}.GetJwks").message.jwks_json)
    key = next(key for key in jwks["keys"] if key["kid"] == header["kid"])

    claims = jwt.decode(
        account.access_token,
        key=jwt.PyJWK(key),
        algorithms=["EdDSA"],
        options={"verify_aud": False, "require": ["iss", "aud", "sub", "exp", "iat", "jti"]},
    )

    assert header["typ"] == "at+jwt"
    assert claims["sub"] == account.user_id
    assert "user" in claims["roles"]
    assert claims["sid"]


def test_a_wrong_password_is_refused_with_invalid_credentials(
    api: ReflectedApi, account: Account
) -> None:
    with pytest.raises(CallFailed) as raised:
        api.call(f"{AUTH_SERVICE}.Login", email=account.email, password=new_password())

    assert raised.value.failure.code == grpc.StatusCode.UNAUTHENTICATED
    assert raised.value.failure.reason == "INVALID_CREDENTIALS"


def test_an_unknown_email_gets_the_same_answer_as_a_wrong_password(api: ReflectedApi) -> None:
    with pytest.raises(CallFailed) as raised:
        api.call(f"{AUTH_SERVICE}.Login", email=new_email(), password=new_password())

    assert raised.value.failure.code == grpc.StatusCode.UNAUTHENTICATED
    assert raised.value.failure.reason == "INVALID_CREDENTIALS"
