"""Health, request ids and the public key set: callable without credentials."""

from __future__ import annotations

import json
import secrets

import pytest

from .client import AUTH_SERVICE, HEALTH_SERVICE, USER_SERVICE, ReflectedApi, b64url_decode


@pytest.mark.parametrize("service", ["", USER_SERVICE, AUTH_SERVICE])
def test_health_reports_serving(api: ReflectedApi, service: str) -> None:
    reply = api.call(f"{HEALTH_SERVICE}.Check", service=service)
    status = reply.message.DESCRIPTOR.fields_by_name["status"].enum_type
    assert status.values_by_number[reply.message.status].name == "SERVING"


def test_the_callers_request_id_is_echoed_in_the_response_trailers(api: ReflectedApi) -> None:
    request_id = f"contract-{secrets.token_hex(8)}"
    reply = api.call(f"{AUTH_SERVICE}.GetJwks", metadata=[("x-request-id", request_id)])
    assert reply.trailing_metadata.get("x-request-id") == request_id


def test_a_request_id_is_generated_when_the_caller_sends_none(api: ReflectedApi) -> None:
    first = api.call(f"{AUTH_SERVICE}.GetJwks").trailing_metadata.get("x-request-id")
    second = api.call(f"{AUTH_SERVICE}.GetJwks").trailing_metadata.get("x-request-id")
    assert first
    assert second
    assert first != second


def test_get_jwks_returns_public_ed25519_keys_only(api: ReflectedApi) -> None:
    jwks = json.loads(api.call(f"{AUTH_SERVICE}.GetJwks").message.jwks_json)

    keys = jwks["keys"]
    assert keys, "the key set is empty"
    kids = [key["kid"] for key in keys]
    assert len(set(kids)) == len(kids)
    assert all(kids)
    for key in keys:
        assert not {"d", "k"} & key.keys(), "private key material published"
        if key["kty"] == "OKP":
            assert key["crv"] == "Ed25519"
            assert len(b64url_decode(key["x"])) == 32
