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
from usersvc.domain.revocations import REVOCATION_MARGIN
from usersvc.services.sessions import (
    SessionLifetimes,
    new_refresh_token,
    refresh_token_hash,
    session_id_of,
)

TOKEN_SHAPE = re.compile(r"rt_[A-Za-z0-9_-]{43}")


def test_a_refresh_token_is_rt_and_43_base64url_characters() -> None:
    assert TOKEN_SHAPE.fullmatch(new_refresh_token().value)


def test_two_refresh_tokens_differ() -> None:
    assert new_refresh_token().value != new_refresh_token().value


def test_the_stored_hash_is_the_sha256_of_the_32_random_bytes() -> None:
    token = new_refresh_token()
    secret = base64.urlsafe_b64decode(token.value[3:] + "=")
    assert (len(secret), token.token_hash) == (32, hashlib.sha256(secret).digest())


def test_hashing_a_presented_token_finds_the_stored_hash() -> None:
    token = new_refresh_token()
    assert refresh_token_hash(token.value) == token.token_hash


def test_a_refresh_token_never_shows_in_its_repr() -> None:
    token = new_refresh_token()
    assert token.value not in repr(token)
    assert token.token_hash.hex() not in repr(token)


def _noncanonical(token: str) -> str:
    # The last character carries 4 unused bits; flipping one of them decodes
    # to the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(token[-1])
    return token[:-1] + alphabet[index ^ 1]


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
        "a JWT",
    ],
)
def test_anything_but_an_issued_shape_has_no_hash(make: object) -> None:
    assert callable(make)
    assert refresh_token_hash(make(new_refresh_token().value)) is None


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
