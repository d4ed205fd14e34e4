"""Token probes (RFC 8725, OWASP ASVS V9) against a real server: every way of
presenting a bad access token is UNAUTHENTICATED with the right reason,
never INTERNAL, and never accepted.

Forged tokens start from a real token's claims (same session, so only the
probed defect can be what the server objects to), and each group has a
control that a token minted the same way but without the defect passes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .helpers import (
    Caller,
    World,
    claims_like,
    expect_error,
    expect_token_invalid,
    now,
    unverified_parts,
    user_service_pb2,
)

ME = user_service_pb2.GetUserRequest(id="me")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Any, claims: Any, sign: Callable[[bytes], bytes] | None = None) -> str:
    """A JWS built by hand, so nothing a library refuses to produce is out of
    reach; ``header`` and ``claims`` may be any JSON (or raw bytes)."""

    def segment(part: Any) -> str:
        return b64(part if isinstance(part, bytes) else json.dumps(part).encode())

    signing_input = f"{segment(header)}.{segment(claims)}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def hs256_with(key: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(key, data, hashlib.sha256).digest()


class Probe:
    """Mints tokens the way the server does, from alice's real token."""

    def __init__(self, world: World, signing_key: Ed25519PrivateKey) -> None:
        self.world = world
        self.key = signing_key
        header, claims = unverified_parts(world.alice.token)
        self.kid: str = header["kid"]
        self.claims: dict[str, Any] = claims

    def header(self, **changes: Any) -> dict[str, Any]:
        header = {"alg": "EdDSA", "typ": "at+jwt", "kid": self.kid, **changes}
        return {name: value for name, value in header.items() if value is not None}

    def token(
        self,
        *,
        header: dict[str, Any] | None = None,
        key: Ed25519PrivateKey | None = None,
        **claims: Any,
    ) -> str:
        body = claims_like(self.claims, **claims)
        return forge(header or self.header(), body, (key or self.key).sign)

    def without(self, claim: str) -> str:
        body = claims_like(self.claims)
        del body[claim]
        return forge(self.header(), body, self.key.sign)

    def caller(self, token: str) -> Caller:
        return Caller(self.world.channel, token, "prober")

    async def accepted(self, token: str) -> bool:
        reply = await self.caller(token).users.GetUser(ME)
        return bool(reply.user.id == self.world.alice.id)

    async def refused(self, token: str) -> None:
        await expect_token_invalid(self.caller(token).users.GetUser(ME))


@pytest.fixture
def probe(world: World, signing_key: Ed25519PrivateKey) -> Probe:
    return Probe(world, signing_key)


async def test_control_a_token_minted_like_the_probes_is_accepted(probe: Probe) -> None:
    assert await probe.accepted(probe.token())


# -- algorithms (RFC 8725 2.1, 3.1) --------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_is_refused(probe: Probe, alg: str) -> None:
    await probe.refused(forge(probe.header(alg=alg), claims_like(probe.claims)))


async def test_alg_none_with_our_signature_left_on_is_refused(probe: Probe) -> None:
    body = claims_like(probe.claims)
    signature = probe.token().rsplit(".", 1)[1]
    unsigned = forge(probe.header(alg="none"), body)
    await probe.refused(unsigned.rsplit(".", 1)[0] + "." + signature)


@pytest.mark.parametrize("form", ["raw", "pem", "jwk-x"])
async def test_hs256_keyed_with_our_public_key_is_refused(probe: Probe, form: str) -> None:
    public = probe.key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    secret = {
        "raw": raw,
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk-x": b64(raw).encode(),
    }[form]
    token = forge(probe.header(alg="HS256"), claims_like(probe.claims), hs256_with(secret))
    await probe.refused(token)


async def test_an_algorithm_the_key_is_not_for_is_refused_even_when_its_signature_fits(
    probe: Probe,
) -> None:
    # Signed correctly with our key, but the header claims another EdDSA name.
    await probe.refused(probe.token(header=probe.header(alg="Ed25519")))


# -- integrity ---------------------------------------------------------------------------


async def test_a_tampered_payload_is_refused(probe: Probe) -> None:
    header, _, signature = probe.token().split(".")
    payload = b64(json.dumps(claims_like(probe.claims, sub=probe.world.admin.id)).encode())
    await probe.refused(f"{header}.{payload}.{signature}")


async def test_roles_added_to_a_real_token_are_refused(probe: Probe) -> None:
    header, _, signature = probe.world.alice.token.split(".")
    elevated = dict(probe.claims, roles=["user", "admin"])
    await probe.refused(f"{header}.{b64(json.dumps(elevated).encode())}.{signature}")


@pytest.mark.parametrize("change", ["flip", "truncate", "empty", "foreign"])
async def test_a_tampered_signature_is_refused(probe: Probe, change: str) -> None:
    header, payload, signature = probe.token().split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    forged = {
        "flip": raw[:-1] + bytes([raw[-1] ^ 1]),
        "truncate": raw[:32],
        "empty": b"",
        "foreign": Ed25519PrivateKey.generate().sign(f"{header}.{payload}".encode()),
    }[change]
    await probe.refused(f"{header}.{payload}.{b64(forged)}")


# -- time --------------------------------------------------------------------------------


async def test_an_expired_token_is_token_expired(probe: Probe) -> None:
    issued = now() - 3600
    token = probe.token(iat=issued, nbf=issued, exp=issued + 900)
    await expect_error(
        probe.caller(token).users.GetUser(ME), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"
    )


async def test_a_token_whose_nbf_is_in_the_future_is_refused(probe: Probe) -> None:
    await probe.refused(probe.token(iat=now(), nbf=now() + 600, exp=now() + 900))


async def test_a_token_issued_in_the_future_is_refused(probe: Probe) -> None:
    await probe.refused(probe.token(iat=now() + 600))


@pytest.mark.parametrize("value", ["soon", None, True, 1e400])
async def test_a_non_numeric_exp_is_refused(probe: Probe, value: Any) -> None:
    await probe.refused(probe.token(exp=value))


# -- required claims -----------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "sub", "jti", "iss", "aud", "sid", "roles"])
async def test_a_token_missing_a_required_claim_is_refused(probe: Probe, claim: str) -> None:
    await probe.refused(probe.without(claim))


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("iss", "https://evil.example"),
        ("aud", "another-api"),
        ("aud", ["another-api"]),
        ("sub", ""),
        ("sid", ""),
        ("jti", 7),
    ],
)
async def test_a_token_with_a_wrong_claim_is_refused(probe: Probe, claim: str, value: Any) -> None:
    await probe.refused(probe.token(**{claim: value}))


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt2", "refresh+jwt", None])
async def test_a_token_of_the_wrong_type_is_refused(probe: Probe, typ: str | None) -> None:
    await probe.refused(probe.token(header=probe.header(typ=typ)))


async def test_a_refresh_token_used_as_an_access_token_is_refused(probe: Probe) -> None:
    refresh_token = probe.world.alice.login.refresh_token
    # Before server-side sessions Login returned no refresh token; the probe
    # then uses one of the same shape (opaque, random, not a JWT).
    await probe.refused(refresh_token or "rt_" + secrets.token_urlsafe(32))


# -- key-locating headers (RFC 8725 3.10): never fetched, never trusted --------------------


class KeyServer:
    """An HTTP server the forged headers point at; it serves the attacker's
    key set to anyone who asks and counts who did."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.body = json.dumps(jwks).encode()
        self.requests = 0
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        await reader.readline()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(self.body)}\r\nconnection: close\r\n\r\n".encode()
            + self.body
        )
        await writer.drain()
        writer.close()


ATTACKER = Ed25519PrivateKey.generate()


def attacker_jwk(kid: str) -> dict[str, str]:
    raw = ATTACKER.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw), "kid": kid, "alg": "EdDSA"}


@pytest_asyncio.fixture(loop_scope="session")
async def key_server() -> AsyncIterator[KeyServer]:
    keys = KeyServer({"keys": [attacker_jwk("attacker")]})
    server = await asyncio.start_server(keys.handle, "127.0.0.1", 0)
    keys.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/jwks.json"
    try:
        yield keys
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("kid", ["attacker", "ours"])
@pytest.mark.parametrize("header", ["jku", "x5u"])
async def test_a_key_url_header_is_never_fetched_nor_trusted(
    probe: Probe, key_server: KeyServer, header: str, kid: str
) -> None:
    token = probe.token(
        header=probe.header(kid=probe.kid if kid == "ours" else kid, **{header: key_server.url}),
        key=ATTACKER,
    )
    await probe.refused(token)
    assert key_server.requests == 0


@pytest.mark.parametrize("kid", ["attacker", "ours"])
async def test_an_embedded_jwk_is_not_trusted(probe: Probe, kid: str) -> None:
    chosen = probe.kid if kid == "ours" else "attacker"
    token = probe.token(header=probe.header(kid=chosen, jwk=attacker_jwk(chosen)), key=ATTACKER)
    await probe.refused(token)


async def test_an_embedded_certificate_chain_is_not_trusted(probe: Probe) -> None:
    token = probe.token(header=probe.header(x5c=["MIIB"]), key=ATTACKER)
    await probe.refused(token)


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk"])
async def test_our_own_token_carrying_a_key_header_is_judged_by_our_key_alone(
    probe: Probe, key_server: KeyServer, header: str
) -> None:
    # The header is signed, so only we could have put it there; ignoring it
    # means the token stands or falls by our key, and nothing is fetched.
    value: Any = attacker_jwk(probe.kid) if header == "jwk" else key_server.url
    assert await probe.accepted(probe.token(header=probe.header(**{header: value})))
    assert key_server.requests == 0


# -- malformed tokens and headers ------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[]",
        b'"EdDSA"',
        b"{",
        b'{"alg":"EdDSA","typ":"at+jwt","kid":7}',
        b'{"alg":"EdDSA","typ":"at+jwt"}',
        b'{"alg":["EdDSA"],"typ":"at+jwt"}',
        b'{"alg":"EdDSA","typ":"at+jwt","kid":null}',
    ],
)
async def test_a_malformed_jose_header_is_refused(probe: Probe, header: bytes) -> None:
    await probe.refused(forge(header, claims_like(probe.claims), probe.key.sign))


@pytest.mark.parametrize(
    "token",
    [
        "a.b",
        "a.b.c.d",
        "...",
        "!!!.@@@.###",
        "eyJhbGciOiJFZERTQSJ9",
        # Large, yet under grpc's 8 KiB metadata limit (beyond it grpc itself answers).
        "x" * 7000,
    ],
)
async def test_a_malformed_token_is_refused(probe: Probe, token: str) -> None:
    await probe.refused(token)


async def test_claims_that_are_not_a_json_object_are_refused(probe: Probe) -> None:
    await probe.refused(forge(probe.header(), [1, 2, 3], probe.key.sign))


async def test_a_critical_header_extension_is_refused(probe: Probe) -> None:
    await probe.refused(probe.token(header=probe.header(crit=["exp"], exp=1)))


# -- the authorization header -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "Basic {token}",
        "Token {token}",
        "JWT {token}",
        "DPoP {token}",
        "{token}",
        "Bearer",
        "Bearer ",
        "Bearer  {token}",
        "Bearer {token} extra",
    ],
)
async def test_an_authorization_other_than_one_bearer_token_is_refused(
    probe: Probe, value: str
) -> None:
    metadata = (("authorization", value.format(token=probe.world.alice.token)),)
    await expect_token_invalid(probe.world.anonymous.users.GetUser(ME, metadata=metadata))


async def test_two_authorization_headers_are_refused(probe: Probe) -> None:
    token = probe.world.alice.token
    metadata = (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}"))
    await expect_token_invalid(probe.world.anonymous.users.GetUser(ME, metadata=metadata))


async def test_the_scheme_name_is_case_insensitive(probe: Probe) -> None:
    metadata = (("authorization", f"BEARER {probe.world.alice.token}"),)
    reply = await probe.world.anonymous.users.GetUser(ME, metadata=metadata)
    assert reply.user.id == probe.world.alice.id


async def test_a_detached_unencoded_payload_token_is_refused(probe: Probe) -> None:
    # RFC 7797: PyJWT produces these, we never issue or accept them.
    headers = {"kid": probe.kid, "typ": "at+jwt", "b64": False}
    token = jwt.encode(claims_like(probe.claims), probe.key, algorithm="EdDSA", headers=headers)
    await probe.refused(token)
