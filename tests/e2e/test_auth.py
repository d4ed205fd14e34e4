"""AuthService.Login and GetJwks, and how the server judges the bearer
tokens it is shown (missing, garbled, foreign, expired, ...)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .helpers import (
    Caller,
    World,
    auth_service_pb2,
    claims_like,
    create_request,
    expect_bad_credentials,
    expect_error,
    expect_token_invalid,
    fails,
    mint_token,
    new_password,
    now,
    unverified_parts,
    user_service_pb2,
)

ME = user_service_pb2.GetUserRequest(id="me")


def login(email: str, password: str) -> auth_service_pb2.LoginRequest:
    return auth_service_pb2.LoginRequest(email=email, password=password)


def with_token(world: World, token: str) -> Caller:
    return Caller(world.channel, token, "holder")


# ----------------------------------------------------------------- Login


async def test_login_returns_a_bearer_token_for_the_user(world: World) -> None:
    response = await world.anonymous.auth.Login(login(world.alice.email, world.alice.password))

    assert response.token_type == "Bearer"
    assert response.expires_in == 900
    assert response.user.id == world.alice.id
    assert response.access_token


async def test_login_ignores_the_case_of_the_email(world: World) -> None:
    response = await world.anonymous.auth.Login(
        login(world.alice.email.upper(), world.alice.password)
    )

    assert response.user.id == world.alice.id


async def test_login_token_opens_the_users_own_record(world: World) -> None:
    response = await world.anonymous.auth.Login(login(world.bob.email, world.bob.password))

    user = (await with_token(world, response.access_token).users.GetUser(ME)).user

    assert user.id == world.bob.id


async def test_login_with_a_wrong_password_is_invalid_credentials(world: World) -> None:
    await expect_bad_credentials(world.anonymous.auth.Login(login(world.alice.email, "Nope-123!x")))


async def test_login_of_an_unknown_email_looks_like_a_wrong_password(world: World) -> None:
    wrong = await expect_bad_credentials(
        world.anonymous.auth.Login(login(world.alice.email, "Nope-123!x"))
    )

    unknown = await expect_bad_credentials(
        world.anonymous.auth.Login(login("nobody@example.com", "Nope-123!x"))
    )

    assert unknown.details == wrong.details


async def test_login_with_a_password_over_72_bytes_is_invalid_credentials(world: World) -> None:
    await expect_bad_credentials(world.anonymous.auth.Login(login(world.alice.email, "é" * 40)))


async def test_login_with_empty_fields_is_invalid_credentials(world: World) -> None:
    await expect_bad_credentials(world.anonymous.auth.Login(login("", "")))


async def test_access_token_header_is_an_eddsa_at_jwt_with_a_published_kid(
    world: World, jwks: dict[str, Any]
) -> None:
    header, _ = unverified_parts(world.alice.token)

    assert header["typ"] == "at+jwt"
    assert header["alg"] == "EdDSA"
    assert header["kid"] in {key["kid"] for key in jwks["keys"]}


async def test_access_token_claims_describe_the_user_and_session(world: World) -> None:
    _, claims = unverified_parts(world.admin.token)

    assert claims["iss"] == "usersvc"
    assert claims["aud"] in ("usersvc", ["usersvc"])
    assert claims["sub"] == world.admin.id
    assert set(claims["roles"]) == {"user", "admin"}
    assert claims["sid"]
    assert claims["jti"]
    assert claims["nbf"] <= claims["iat"] + 1
    assert claims["exp"] - claims["iat"] == world.admin.login.expires_in
    assert abs(claims["iat"] - now()) < 120


async def test_two_logins_get_different_token_ids_and_sessions(world: World) -> None:
    again = await world.login(world.alice.email, world.alice.password)

    _, first = unverified_parts(world.alice.token)
    _, second = unverified_parts(again.access_token)

    assert first["jti"] != second["jti"]
    assert first["sid"] != second["sid"]


async def test_another_service_verifies_the_token_offline_with_the_jwks(
    world: World, jwks: dict[str, Any]
) -> None:
    key_set = jwt.PyJWKSet.from_dict(jwks)
    header, _ = unverified_parts(world.bob.token)

    claims = jwt.decode(
        world.bob.token,
        key_set[header["kid"]],
        algorithms=["EdDSA"],
        audience="usersvc",
        issuer="usersvc",
        options={"require": ["exp", "iat", "nbf", "sub", "jti", "sid", "iss", "aud"]},
    )

    assert claims["sub"] == world.bob.id


async def test_a_tampered_token_fails_offline_verification(
    world: World, jwks: dict[str, Any]
) -> None:
    key = jwt.PyJWKSet.from_dict(jwks).keys[0]
    head, _, signature = world.bob.token.split(".")
    forged_claims = {**unverified_parts(world.bob.token)[1], "roles": ["admin"]}
    forged_body = jwt.utils.base64url_encode(json.dumps(forged_claims).encode()).decode()

    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            f"{head}.{forged_body}.{signature}",
            key,
            algorithms=["EdDSA"],
            audience="usersvc",
        )


# ----------------------------------------------------------------- GetJwks


async def test_jwks_publishes_an_ed25519_public_key(jwks: dict[str, Any]) -> None:
    (key, *_) = jwks["keys"]

    assert key["kty"] == "OKP"
    assert key["crv"] == "Ed25519"
    assert key["kid"]
    assert key["x"]


async def test_jwks_never_publishes_private_key_material(jwks: dict[str, Any]) -> None:
    assert all("d" not in key for key in jwks["keys"])


async def test_jwks_is_served_to_a_caller_with_a_token_too(world: World) -> None:
    response = await world.alice.auth.GetJwks(auth_service_pb2.GetJwksRequest())

    assert json.loads(response.jwks_json)["keys"]


# ----------------------------------------------------------------- bearer tokens


async def test_call_without_credentials_is_token_invalid(world: World) -> None:
    await expect_token_invalid(world.anonymous.users.GetUser(ME))


async def test_garbled_token_is_token_invalid(world: World) -> None:
    await expect_token_invalid(with_token(world, "not.a.jwt").users.GetUser(ME))


async def test_truncated_token_is_token_invalid(world: World) -> None:
    await expect_token_invalid(with_token(world, world.alice.token[:-10]).users.GetUser(ME))


@pytest.mark.parametrize("value", ["Basic {token}", "Token {token}", "{token}", "Bearer"])
async def test_authorization_without_the_bearer_scheme_is_token_invalid(
    world: World, value: str
) -> None:
    metadata = (("authorization", value.format(token=world.alice.token)),)

    await expect_token_invalid(world.anonymous.users.GetUser(ME, metadata=metadata))


async def test_bearer_scheme_is_case_insensitive(world: World) -> None:
    metadata = (("authorization", f"bearer {world.alice.token}"),)

    user = (await world.anonymous.users.GetUser(ME, metadata=metadata)).user

    assert user.id == world.alice.id


async def test_token_signed_by_a_foreign_key_with_our_kid_is_token_invalid(
    world: World,
) -> None:
    header, claims = unverified_parts(world.admin.token)
    forged = mint_token(Ed25519PrivateKey.generate(), kid=header["kid"], claims=claims_like(claims))

    await expect_token_invalid(with_token(world, forged).users.GetUser(ME))


async def test_token_with_an_unknown_kid_is_token_invalid(
    world: World, signing_key: Ed25519PrivateKey
) -> None:
    _, claims = unverified_parts(world.admin.token)
    token = mint_token(signing_key, kid="someone-elses-key", claims=claims_like(claims))

    await expect_token_invalid(with_token(world, token).users.GetUser(ME))


async def test_unsigned_alg_none_token_is_token_invalid(world: World) -> None:
    header, claims = unverified_parts(world.admin.token)
    token = jwt.encode(
        claims_like(claims), None, algorithm="none", headers={"kid": header["kid"], "typ": "at+jwt"}
    )

    await expect_token_invalid(with_token(world, token).users.GetUser(ME))


async def test_token_of_another_type_is_token_invalid(
    world: World, signing_key: Ed25519PrivateKey
) -> None:
    header, claims = unverified_parts(world.alice.token)
    token = mint_token(signing_key, kid=header["kid"], claims=claims_like(claims), typ="JWT")

    await expect_token_invalid(with_token(world, token).users.GetUser(ME))


@pytest.mark.parametrize(
    ("claim", "value"),
    [("aud", "another-service"), ("iss", "someone-else"), ("sub", "not-a-uuid")],
)
async def test_genuinely_signed_token_with_a_wrong_claim_is_token_invalid(
    world: World, signing_key: Ed25519PrivateKey, claim: str, value: str
) -> None:
    header, claims = unverified_parts(world.alice.token)
    token = mint_token(signing_key, kid=header["kid"], claims=claims_like(claims, **{claim: value}))

    await expect_token_invalid(with_token(world, token).users.GetUser(ME))


@pytest.mark.parametrize("claim", ["sub", "sid", "exp", "roles"])
async def test_genuinely_signed_token_missing_a_claim_is_token_invalid(
    world: World, signing_key: Ed25519PrivateKey, claim: str
) -> None:
    header, claims = unverified_parts(world.alice.token)
    trimmed = claims_like(claims)
    del trimmed[claim]

    token = mint_token(signing_key, kid=header["kid"], claims=trimmed)

    await expect_token_invalid(with_token(world, token).users.GetUser(ME))


async def test_expired_token_is_token_expired(world: World, signing_key: Ed25519PrivateKey) -> None:
    header, claims = unverified_parts(world.alice.token)
    issued = now() - 3600
    token = mint_token(
        signing_key,
        kid=header["kid"],
        claims=claims_like(claims, iat=issued, nbf=issued, exp=issued + 900),
    )

    await expect_error(
        with_token(world, token).users.GetUser(ME),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_EXPIRED",
    )


async def test_token_not_valid_yet_is_refused(world: World, signing_key: Ed25519PrivateKey) -> None:
    header, claims = unverified_parts(world.alice.token)
    later = now() + 3600
    token = mint_token(
        signing_key,
        kid=header["kid"],
        claims=claims_like(claims, iat=later, nbf=later, exp=later + 900),
    )

    await expect_token_invalid(with_token(world, token).users.GetUser(ME))


async def test_minted_token_with_a_live_session_is_accepted(
    world: World, signing_key: Ed25519PrivateKey
) -> None:
    # The control for the refusals above: same key, same claims, only fresh.
    header, claims = unverified_parts(world.alice.token)
    token = mint_token(signing_key, kid=header["kid"], claims=claims_like(claims))

    user = (await with_token(world, token).users.GetUser(ME)).user

    assert user.id == world.alice.id


async def test_token_for_a_user_that_does_not_exist_is_refused(
    world: World, signing_key: Ed25519PrivateKey
) -> None:
    header, claims = unverified_parts(world.alice.token)
    token = mint_token(
        signing_key, kid=header["kid"], claims=claims_like(claims, sub=str(uuid.uuid4()))
    )

    failure = await fails(with_token(world, token).users.GetUser(ME))

    # Without server-side sessions a well-signed token is believed and the
    # user is simply missing; with them it is refused up front. Both are
    # right; reading someone's data or failing with INTERNAL is not.
    assert failure.code in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND}
    assert len(failure.error_infos) == 1


async def test_a_password_is_not_cut_short_at_a_nul_character(world: World) -> None:
    password = "Qz8!wLmp\x00" + new_password(world.recorder)
    request = create_request(world.recorder, password=password)
    await world.anonymous.users.CreateUser(request)

    await expect_bad_credentials(world.anonymous.auth.Login(login(request.email, "Qz8!wLmp")))

    assert (await world.login(request.email, password)).user.email == request.email
