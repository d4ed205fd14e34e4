"""Access tokens (usersvc.services.tokens.TokenService)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakes import FakeDatabase
from hypothesis import given
from hypothesis import strategies as st

from usersvc.domain.errors import TokenExpired, TokenInvalid
from usersvc.domain.keys import jwk_thumbprint
from usersvc.domain.models import PrincipalKind, User
from usersvc.services.tokens import KeyRing, SigningKey, TokenService

ISSUER = "usersvc-test"
AUDIENCE = "usersvc-test-api"
TTL = 900
T0 = 1_700_000_000.0
SIGNING = SigningKey.ed25519(Ed25519PrivateKey.generate())
ATTACKER = SigningKey.ed25519(Ed25519PrivateKey.generate())


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_service(
    clock: Clock | None = None, key_ring: KeyRing | None = None, cache_size: int = 10_000
) -> TokenService:
    return TokenService(
        key_ring or KeyRing(SIGNING),
        issuer=ISSUER,
        audience=AUDIENCE,
        access_ttl_seconds=TTL,
        clock=clock or Clock(),
        cache_size=cache_size,
    )


def a_user() -> User:
    return FakeDatabase().insert("ann@example.com", roles=("user", "admin"))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def good_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(uuid.uuid4()),
        "exp": int(T0) + TTL,
        "iat": int(T0),
        "nbf": int(T0),
        "jti": uuid.uuid4().hex,
        "sid": "session-1",
        "roles": ["user"],
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not ...}


def signed(
    claims: dict[str, Any],
    *,
    key: SigningKey = SIGNING,
    headers: dict[str, Any] | None = None,
) -> str:
    """A token signed by ``key`` (ours unless said); ``headers`` change our
    header (``...`` removes an entry)."""
    header = {"alg": "EdDSA", "typ": "at+jwt", "kid": SIGNING.kid}
    header.update(headers or {})
    header = {name: value for name, value in header.items() if value is not ...}
    return forged(header, claims, key.private_key.sign)


def forged(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A hand-built JWS: ``sign`` maps the signing input to signature bytes."""
    signing_input = (
        b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    ).encode()
    signature = sign(signing_input) if sign else b""
    return signing_input.decode() + "." + b64(signature)


# -- issuing ------------------------------------------------------------------------


def test_an_issued_token_verifies_as_its_user() -> None:
    service = make_service()
    user = a_user()
    token, _ = service.issue_access_token(user, session_id="s-1")
    principal = service.verify_access_token(token)
    assert principal.kind is PrincipalKind.USER
    assert principal.subject == str(user.id)
    assert principal.roles == frozenset({"user", "admin"})
    assert principal.session_id == "s-1"


def test_issuing_reports_the_lifetime_in_seconds() -> None:
    _, expires_in = make_service().issue_access_token(a_user(), session_id="s")
    assert expires_in == TTL


def test_the_header_names_eddsa_the_access_token_type_and_the_key() -> None:
    token, _ = make_service().issue_access_token(a_user(), session_id="s")
    assert jwt.get_unverified_header(token) == {
        "alg": "EdDSA",
        "typ": "at+jwt",
        "kid": SIGNING.kid,
    }


def test_the_claims_follow_the_contract() -> None:
    user = a_user()
    token, _ = make_service().issue_access_token(user, session_id="s-9")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == {"iss", "aud", "sub", "exp", "iat", "nbf", "jti", "sid", "roles"}
    assert (claims["iss"], claims["aud"], claims["sub"]) == (ISSUER, AUDIENCE, str(user.id))
    assert claims["iat"] == claims["nbf"] == int(T0)
    assert claims["exp"] == int(T0) + TTL
    assert claims["sid"] == "s-9"
    assert sorted(claims["roles"]) == ["admin", "user"]


def test_every_token_gets_its_own_id() -> None:
    service = make_service()
    user = a_user()
    first = service.verify_access_token(service.issue_access_token(user, session_id="s")[0])
    second = service.verify_access_token(service.issue_access_token(user, session_id="s")[0])
    assert len(first.token_id) == 32
    assert first.token_id != second.token_id


# -- time ----------------------------------------------------------------------------


def test_a_token_past_its_expiry_is_expired() -> None:
    clock = Clock()
    service = make_service(clock)
    token = signed(good_claims())
    clock.now = T0 + TTL + 5
    with pytest.raises(TokenExpired):
        service.verify_access_token(token)


def test_a_few_seconds_of_clock_skew_are_tolerated() -> None:
    clock = Clock(T0 + TTL + 4)
    assert make_service(clock).verify_access_token(signed(good_claims())).subject


def test_a_token_not_yet_valid_is_invalid() -> None:
    token = signed(good_claims(nbf=int(T0) + 60))
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


def test_a_token_issued_in_the_future_is_invalid() -> None:
    token = signed(good_claims(iat=int(T0) + 60))
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


def test_an_expired_token_with_a_bad_signature_is_invalid_not_expired() -> None:
    clock = Clock()
    token = signed(good_claims(), key=ATTACKER)
    clock.now = T0 + 10 * TTL
    with pytest.raises(TokenInvalid):
        make_service(clock).verify_access_token(token)


# -- claims --------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "sub", "jti", "iss", "aud", "sid", "roles"])
def test_a_token_missing_a_required_claim_is_invalid(claim: str) -> None:
    token = signed(good_claims(**{claim: ...}))
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


@pytest.mark.parametrize(
    "changes",
    [
        {"iss": "someone-else"},
        {"aud": "another-api"},
        {"aud": ["another-api"]},
        {"roles": "admin"},
        {"roles": ["user", 7]},
        {"roles": {"admin": True}},
        {"sub": 42},
        {"sub": "not-a-uuid"},
        {"sid": 5},
        {"sid": ""},
        {"jti": 5},
        {"exp": "soon"},
        {"exp": True},
        {"exp": float("nan")},
        {"iat": [1]},
        {"nbf": None},
    ],
)
def test_a_token_with_a_wrong_or_badly_typed_claim_is_invalid(changes: dict[str, Any]) -> None:
    token = signed(good_claims(**changes))
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


def test_an_audience_list_holding_ours_is_accepted() -> None:
    token = signed(good_claims(aud=["other", AUDIENCE]))
    assert make_service().verify_access_token(token).subject


# -- header and keys --------------------------------------------------------------------


def test_alg_none_is_invalid() -> None:
    token = forged({"alg": "none", "typ": "at+jwt", "kid": SIGNING.kid}, good_claims())
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


def test_hs256_signed_with_the_public_key_is_invalid() -> None:
    public_pem = SIGNING.verification.key.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = SIGNING.verification.key.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    service = make_service()
    for secret in (public_pem, raw, SIGNING.verification.public_jwk["x"].encode()):  # type: ignore[index]
        token = forged(
            {"alg": "HS256", "typ": "at+jwt", "kid": SIGNING.kid},
            good_claims(),
            lambda data, secret=secret: hmac.new(secret, data, hashlib.sha256).digest(),
        )
        with pytest.raises(TokenInvalid):
            service.verify_access_token(token)


def test_a_token_signed_by_another_key_under_our_kid_is_invalid() -> None:
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(signed(good_claims(), key=ATTACKER))


@pytest.mark.parametrize("kid", ["unknown-kid", 7, ...])
def test_an_unknown_or_missing_kid_is_invalid(kid: Any) -> None:
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(signed(good_claims(), headers={"kid": kid}))


@pytest.mark.parametrize("typ", ["JWT", "jwt", "", ...])
def test_a_type_other_than_at_jwt_is_invalid(typ: Any) -> None:
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(signed(good_claims(), headers={"typ": typ}))


def test_the_full_media_type_application_at_jwt_is_accepted() -> None:
    token = signed(good_claims(), headers={"typ": "application/at+jwt"})
    assert make_service().verify_access_token(token).subject


def test_an_embedded_jwk_header_is_not_trusted() -> None:
    token = signed(
        good_claims(),
        key=ATTACKER,
        headers={"jwk": dict(ATTACKER.verification.public_jwk or {})},
    )
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_key_url_headers_are_ignored(header: str) -> None:
    genuine = signed(good_claims(), headers={header: "https://attacker.example/keys"})
    assert make_service().verify_access_token(genuine).subject
    forged_token = signed(
        good_claims(), key=ATTACKER, headers={header: "https://attacker.example/keys"}
    )
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(forged_token)


@pytest.mark.parametrize("header", [{"crit": ["exp"]}, {"b64": False, "crit": ["b64"]}])
def test_critical_extensions_are_invalid(header: dict[str, Any]) -> None:
    token = forged(
        {"alg": "EdDSA", "typ": "at+jwt", "kid": SIGNING.kid, **header},
        good_claims(),
        SIGNING.private_key.sign,
    )
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


def test_a_tampered_payload_is_invalid() -> None:
    header, _, signature = signed(good_claims()).split(".")
    payload = b64(json.dumps(good_claims(roles=["user", "admin"])).encode())
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(f"{header}.{payload}.{signature}")


def test_a_tampered_signature_is_invalid() -> None:
    header, payload, signature = signed(good_claims()).split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(f"{header}.{payload}.{flipped}")


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "....", "e30.e30.", "!!.??.**", "x" * 9000, "é.é.é"],
)
def test_malformed_tokens_are_invalid(token: str) -> None:
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


def test_a_non_string_token_is_invalid() -> None:
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(None)  # type: ignore[arg-type]


@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_token_invalid(token: str) -> None:
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


@given(st.lists(st.sampled_from([SIGNING.kid, "eyJ", "e30", ".", "AAAA", "_-"]), max_size=8))
def test_token_shaped_noise_raises_only_token_invalid(parts: list[str]) -> None:
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token("".join(parts))


# -- rotation and key set ------------------------------------------------------------------


def test_a_token_of_a_retired_signing_key_verifies_while_its_key_is_in_the_ring() -> None:
    old = SigningKey.ed25519(Ed25519PrivateKey.generate())
    token = signed(good_claims(), key=old, headers={"kid": old.kid})
    ring = KeyRing(SIGNING, [old.verification])
    assert make_service(key_ring=ring).verify_access_token(token).subject
    with pytest.raises(TokenInvalid):
        make_service().verify_access_token(token)


def test_the_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 8037 appendix A.3.
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert SIGNING.kid == jwk_thumbprint(SIGNING.verification.public_jwk or {})


def test_the_jwks_publishes_the_public_keys_only() -> None:
    old = SigningKey.ed25519(Ed25519PrivateKey.generate())
    keys = json.loads(make_service(key_ring=KeyRing(SIGNING, [old.verification])).jwks_json())
    raw = SIGNING.verification.key.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert keys["keys"][0] == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64(raw),
        "kid": SIGNING.kid,
        "alg": "EdDSA",
        "use": "sig",
    }
    assert [k["kid"] for k in keys["keys"]] == [SIGNING.kid, old.kid]


def test_the_jwks_verifies_issued_tokens_offline() -> None:
    service = make_service()
    token, _ = service.issue_access_token(a_user(), session_id="s")
    jwk = json.loads(service.jwks_json())["keys"][0]
    key = jwt.PyJWK(jwk)
    claims = jwt.decode(
        token, key, algorithms=["EdDSA"], audience=AUDIENCE, options={"verify_exp": False}
    )
    assert claims["iss"] == ISSUER


# -- cache -------------------------------------------------------------------------------


class DecodeCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counting)


def test_a_verified_token_is_not_verified_again(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = DecodeCounter(monkeypatch)
    service = make_service()
    token = signed(good_claims())
    assert service.verify_access_token(token) == service.verify_access_token(token)
    assert counter.calls == 1


def test_a_cached_token_still_expires() -> None:
    clock = Clock()
    service = make_service(clock)
    token = signed(good_claims())
    service.verify_access_token(token)
    clock.now = T0 + TTL + 5
    with pytest.raises(TokenExpired):
        service.verify_access_token(token)


def test_the_cache_forgets_the_least_recently_used_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = DecodeCounter(monkeypatch)
    service = make_service(cache_size=2)
    first, second, third = (signed(good_claims()) for _ in range(3))
    for token in (first, second, first, third):
        service.verify_access_token(token)
    assert counter.calls == 3
    service.verify_access_token(first)  # still cached: used after second
    assert counter.calls == 3
    service.verify_access_token(second)  # evicted by third
    assert counter.calls == 4


def test_a_refused_token_is_refused_again(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = DecodeCounter(monkeypatch)
    service = make_service()
    token = signed(good_claims(), key=ATTACKER)
    for _ in range(2):
        with pytest.raises(TokenInvalid):
            service.verify_access_token(token)
    assert counter.calls == 2
