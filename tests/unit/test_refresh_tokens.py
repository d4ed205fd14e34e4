"""Refresh token values and hashes (usersvc.services.sessions), session
arithmetic, and the revocation channel's payloads."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from usersvc.adapters.revocation_channel import (
    MAX_PAYLOAD_BYTES,
    REVOCATION_CHANNEL,
    parse_payload,
    payloads,
)
from usersvc.domain.ports import RefreshChain
from usersvc.domain.revocations import REVOCATION_MARGIN
from usersvc.services.sessions import (
    SessionLifetimes,
    issue_refresh_token,
    new_refresh_secret,
    new_tag_key,
    parse_refresh_token,
    session_id_of,
)

TOKEN_SHAPE = re.compile(r"rt_[A-Za-z0-9_-]{96}")
SESSION = uuid.UUID("0190f3c1-0000-7000-8000-000000000001")


def new_token(generation: int = 1, key: bytes | None = None) -> tuple[str, bytes, RefreshChain]:
    """A token of ``generation``, the hash of its secret, and its chain."""
    secret = new_refresh_secret()
    chain = RefreshChain(generation, key or new_tag_key())
    return issue_refresh_token(SESSION, chain, secret), secret.token_hash, chain


def test_a_refresh_token_is_rt_and_96_base64url_characters() -> None:
    assert TOKEN_SHAPE.fullmatch(new_token()[0])


def test_two_refresh_tokens_differ() -> None:
    assert new_token()[0] != new_token()[0]


def test_a_token_carries_its_session_generation_and_the_hash_of_its_secret() -> None:
    token, token_hash, chain = new_token(generation=7)
    presented = parse_refresh_token(token)
    assert presented is not None
    assert (presented.session_id, presented.generation, presented.token_hash) == (
        SESSION,
        7,
        token_hash,
    )
    assert presented.issued_in(chain)


def test_the_stored_hash_is_the_sha256_of_the_32_random_bytes() -> None:
    secret = new_refresh_secret()
    assert (len(secret.value), secret.token_hash) == (32, hashlib.sha256(secret.value).digest())


def test_a_retired_generation_is_recognised_by_its_tag() -> None:
    key = new_tag_key()
    old, _, _ = new_token(generation=3, key=key)
    presented = parse_refresh_token(old)
    assert presented is not None
    assert presented.issued_in(RefreshChain(9, key))


def test_a_made_up_generation_or_another_key_is_not_issued_in_the_chain() -> None:
    key = new_tag_key()
    token, _, _ = new_token(generation=3, key=key)
    presented = parse_refresh_token(token)
    assert presented is not None
    # A later generation than the chain's, another session's key, a
    # tampered tag.
    assert not presented.issued_in(RefreshChain(2, key))
    assert not presented.issued_in(RefreshChain(3, new_tag_key()))
    raw = bytearray(base64.urlsafe_b64decode(token[3:]))
    raw[-1] ^= 1
    tampered = parse_refresh_token("rt_" + base64.urlsafe_b64encode(bytes(raw)).decode())
    assert tampered is not None
    assert not tampered.issued_in(RefreshChain(3, key))


def test_a_token_from_before_the_chain_is_known_by_its_hash() -> None:
    secret = new_refresh_secret()
    legacy = "rt_" + base64.urlsafe_b64encode(secret.value).rstrip(b"=").decode()
    presented = parse_refresh_token(legacy)
    assert presented is not None
    assert (presented.legacy_hash, presented.session_id) == (secret.token_hash, None)


def test_a_refresh_secret_never_shows_in_its_repr() -> None:
    secret = new_refresh_secret()
    assert secret.value.hex() not in repr(secret)
    assert secret.token_hash.hex() not in repr(secret)
    token, token_hash, _ = new_token()
    presented = parse_refresh_token(token)
    assert token_hash.hex() not in repr(presented)


def _noncanonical(token: str) -> str:
    # The last character of a 43-character legacy token carries 4 unused
    # bits; flipping one of them decodes to the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    legacy = "rt_" + base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    index = alphabet.index(legacy[-1])
    return legacy[:-1] + alphabet[index ^ 1]


def _generation(token: str, generation: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token[3:]))
    raw[16:24] = generation.to_bytes(8, "big")
    return "rt_" + base64.urlsafe_b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    "make",
    [
        lambda t: "",
        lambda t: "rt_",
        lambda t: t[3:],
        lambda t: "xx_" + t[3:],
        lambda t: t + "A",
        lambda t: t[:-1],
        lambda t: t[:-1] + "=",
        lambda t: t[:-2] + "+/",
        lambda t: t[:-1] + "é",
        lambda t: t.replace("rt_", "RT_"),
        lambda t: " " + t[:-1],
        _noncanonical,
        lambda t: _generation(t, 0),
        lambda t: _generation(t, 2**63),
        lambda t: "eyJhbGciOiJFZERTQSJ9.e30.sig",
    ],
    ids=[
        "empty",
        "prefix only",
        "no prefix",
        "other prefix",
        "too long",
        "too short",
        "padding",
        "standard base64 alphabet",
        "non-ascii",
        "upper-case prefix",
        "leading space",
        "non-canonical last character",
        "generation 0",
        "generation beyond bigint",
        "a JWT",
    ],
)
def test_anything_but_an_issued_shape_is_refused(make: object) -> None:
    assert callable(make)
    assert parse_refresh_token(make(new_token()[0])) is None


def test_a_session_id_must_be_a_uuid() -> None:
    sid = uuid.uuid4()
    assert (session_id_of(str(sid)), session_id_of("s1"), session_id_of("")) == (sid, None, None)


def test_a_session_ends_one_refresh_lifetime_after_it_began() -> None:
    lifetimes = SessionLifetimes(access_ttl_seconds=60, refresh_ttl_seconds=3600)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    assert lifetimes.session_expire_time(start) == start + timedelta(hours=1)


def test_a_revocation_is_kept_an_access_token_lifetime_plus_a_margin() -> None:
    lifetimes = SessionLifetimes(access_ttl_seconds=60, refresh_ttl_seconds=3600)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    assert (
        lifetimes.revocation_expire_time(start) == start + timedelta(seconds=60) + REVOCATION_MARGIN
    )


def test_the_lifetimes_clock_is_timezone_aware() -> None:
    lifetimes = SessionLifetimes(access_ttl_seconds=60, refresh_ttl_seconds=60, clock=lambda: 0.0)
    assert lifetimes.now() == datetime(1970, 1, 1, tzinfo=UTC)


def test_the_channel_name_is_fixed() -> None:
    assert REVOCATION_CHANNEL == "usersvc_session_revoked"


def test_many_ids_are_split_into_payloads_under_the_limit_and_none_is_lost() -> None:
    ids = [uuid.uuid4() for _ in range(1000)]
    chunks = list(payloads(ids))
    assert len(chunks) > 1
    assert all(len(chunk.encode()) < MAX_PAYLOAD_BYTES for chunk in chunks)
    assert [i for chunk in chunks for i in parse_payload(chunk)] == [str(i) for i in ids]


def test_no_ids_make_no_payload() -> None:
    assert list(payloads([])) == []


def test_a_payload_part_that_is_not_a_uuid_is_skipped() -> None:
    sid = uuid.uuid4()
    assert parse_payload(f"nonsense,{str(sid).upper()},") == [str(sid)]
