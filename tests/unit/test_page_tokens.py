"""ListUsers page tokens (usersvc.services.pagination)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usersvc.domain.errors import InvalidArgument
from usersvc.domain.filtering import parse_filter
from usersvc.domain.listing import Cursor, Filter, Ordering, SortField
from usersvc.services.pagination import (
    MAX_PAGE_TOKEN_LENGTH,
    decode_page_token,
    encode_page_token,
    query_fingerprint,
)

BY_TIME = Ordering()
BY_EMAIL = Ordering(SortField.EMAIL)
FINGERPRINT = query_fingerprint(Filter(), BY_TIME, False)
ROW = uuid.UUID("0190a4b2-6c1e-7cc3-8a1b-1234567890ab")
KEY = b"k" * 32
OLD_KEY = b"o" * 32
KEYS = (KEY,)


def encode_tagged(data: bytes, key: bytes = KEY) -> str:
    tagged = hmac.new(key, data, hashlib.sha256).digest() + data
    return base64.urlsafe_b64encode(tagged).rstrip(b"=").decode()


def encode_body(body: Any, key: bytes = KEY) -> str:
    """A correctly tagged token around any body: what is tested is the
    body's validation."""
    return encode_tagged(json.dumps(body).encode(), key)


def body(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 2,
        "k": ["2024-01-01T00:00:00+00:00", str(ROW)],
        "f": FINGERPRINT,
        "t": 3,
    }
    base.update(changes)
    return base


def page_token_error(token: str, ordering: Ordering = BY_TIME) -> str:
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(token, fingerprint=FINGERPRINT, ordering=ordering, keys=KEYS)
    (violation,) = caught.value.violations
    assert violation.field == "page_token"
    return violation.description


def test_a_time_cursor_round_trips() -> None:
    moment = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)
    token = encode_page_token(
        Cursor(moment, ROW), fingerprint=FINGERPRINT, total_size=42, keys=KEYS
    )
    decoded = decode_page_token(token, fingerprint=FINGERPRINT, ordering=BY_TIME, keys=KEYS)
    assert decoded.cursor == Cursor(moment, ROW)
    assert decoded.total_size == 42


def test_a_text_cursor_round_trips() -> None:
    fingerprint = query_fingerprint(Filter(), BY_EMAIL, False)
    token = encode_page_token(
        Cursor("zoë@example.com", ROW), fingerprint=fingerprint, total_size=0, keys=KEYS
    )
    decoded = decode_page_token(token, fingerprint=fingerprint, ordering=BY_EMAIL, keys=KEYS)
    assert decoded.cursor == Cursor("zoë@example.com", ROW)


def test_tokens_are_url_safe_without_padding() -> None:
    token = encode_page_token(
        Cursor("a" * 50, ROW), fingerprint=FINGERPRINT, total_size=1, keys=KEYS
    )
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@given(
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Co", "Zl", "Zp")), max_size=80),
    st.uuids(),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_any_text_cursor_round_trips(value: str, row: uuid.UUID, total: int) -> None:
    token = encode_page_token(Cursor(value, row), fingerprint="f", total_size=total, keys=KEYS)
    decoded = decode_page_token(token, fingerprint="f", ordering=BY_EMAIL, keys=KEYS)
    assert (decoded.cursor, decoded.total_size) == (Cursor(value, row), total)


def test_a_time_cursor_in_another_offset_is_the_same_instant() -> None:
    moment = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    token = encode_page_token(Cursor(moment, ROW), fingerprint=FINGERPRINT, total_size=1, keys=KEYS)
    decoded = decode_page_token(token, fingerprint=FINGERPRINT, ordering=BY_TIME, keys=KEYS)
    assert decoded.cursor.sort_value == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


# -- fingerprints -------------------------------------------------------------------


def test_the_fingerprint_ignores_spelling_of_the_filter() -> None:
    assert query_fingerprint(
        parse_filter('state=STATE_ACTIVE AND labels.team:"x"'), BY_TIME, False
    ) == query_fingerprint(
        parse_filter('state = "STATE_ACTIVE"   AND labels.team = "x"'), BY_TIME, False
    )


@pytest.mark.parametrize(
    ("flt", "ordering", "show_deleted"),
    [
        ('email:"b"', BY_TIME, False),
        ('email:"a"', Ordering(SortField.CREATE_TIME, descending=True), False),
        ('email:"a"', BY_EMAIL, False),
        ('email:"a"', BY_TIME, True),
    ],
)
def test_the_fingerprint_changes_with_filter_order_and_show_deleted(
    flt: str, ordering: Ordering, show_deleted: bool
) -> None:
    assert query_fingerprint(parse_filter(flt), ordering, show_deleted) != query_fingerprint(
        parse_filter('email:"a"'), BY_TIME, False
    )


def test_a_token_for_another_query_is_refused_with_a_clear_message() -> None:
    token = encode_page_token(Cursor("a", ROW), fingerprint="other", total_size=1, keys=KEYS)
    assert "another filter/order_by/show_deleted" in page_token_error(token)


# -- malformed tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "!!!",
        "a b",
        "abc=",
        "x" * (MAX_PAGE_TOKEN_LENGTH + 1),
        "a",  # not valid base64
        "_w",  # not UTF-8
        encode_body("just a string"),
        encode_body([1, 2]),
        encode_body(body(v=1)),
        encode_body(body(v=True)),
        encode_body(body(t=-1)),
        encode_body(body(t=2**31)),
        encode_body(body(t="3")),
        encode_body(body(t=True)),
        encode_body(body(t=1.5)),
        encode_body(body(k=["2024-01-01T00:00:00+00:00"])),
        encode_body(body(k="2024-01-01T00:00:00+00:00")),
        encode_body(body(k=[17, str(ROW)])),
        encode_body(body(k=["2024-01-01T00:00:00", str(ROW)])),  # naive time
        encode_body(body(k=["yesterday", str(ROW)])),
        encode_body(body(k=["2024-01-01T00:00:00+00:00", "not-a-uuid"])),
        encode_body(body(k=["2024-01-01T00:00:00+00:00", str(ROW).upper()])),
        encode_body(body(k=["2024-01-01T00:00:00+00:00", 5])),
        encode_body({**body(), "extra": 1}),
        encode_body({k: v for k, v in body().items() if k != "t"}),
    ],
)
def test_malformed_tokens_are_invalid_arguments(token: str) -> None:
    assert page_token_error(token)


def test_nan_in_a_token_is_malformed() -> None:
    token = encode_tagged(f'{{"v":2,"k":["a","{ROW}"],"f":"{FINGERPRINT}","t":NaN}}'.encode())
    assert page_token_error(token, BY_EMAIL)


@pytest.mark.parametrize("value", ["a\x00b", "\ud800"])
def test_a_text_cursor_with_control_characters_is_malformed(value: str) -> None:
    token = encode_body(body(k=[value, str(ROW)]))
    assert page_token_error(token, BY_EMAIL)


def test_a_tampered_token_is_malformed_or_refused_never_a_crash() -> None:
    token = encode_page_token(
        Cursor(datetime(2024, 1, 1, tzinfo=UTC), ROW),
        fingerprint=FINGERPRINT,
        total_size=9,
        keys=KEYS,
    )
    for index in range(len(token)):
        replacement = "A" if token[index] != "A" else "B"
        tampered = token[:index] + replacement + token[index + 1 :]
        try:
            decode_page_token(tampered, fingerprint=FINGERPRINT, ordering=BY_TIME, keys=KEYS)
        except InvalidArgument as exc:
            fields = [v.field for v in exc.violations]
        else:
            fields = ["page_token"]
        assert fields == ["page_token"]


@given(st.text(max_size=200))
def test_arbitrary_text_is_never_more_than_an_invalid_argument(token: str) -> None:
    try:
        decode_page_token(token, fingerprint=FINGERPRINT, ordering=BY_TIME, keys=KEYS)
    except InvalidArgument as exc:
        fields = [v.field for v in exc.violations]
    else:
        fields = ["page_token"]
    assert fields == ["page_token"]


# -- tags ----------------------------------------------------------------------------------


def test_an_untagged_token_is_malformed() -> None:
    untagged = base64.urlsafe_b64encode(json.dumps(body()).encode()).rstrip(b"=").decode()
    assert page_token_error(untagged)


def test_a_token_tagged_with_an_unknown_key_is_malformed() -> None:
    assert page_token_error(encode_body(body(), key=b"x" * 32))


def test_a_token_of_a_retired_key_is_accepted_while_that_key_is_listed() -> None:
    token = encode_body(body(t=5), key=OLD_KEY)
    decoded = decode_page_token(
        token, fingerprint=FINGERPRINT, ordering=BY_TIME, keys=(KEY, OLD_KEY)
    )
    assert decoded.total_size == 5


def test_new_tokens_are_tagged_with_the_first_key() -> None:
    token = encode_page_token(
        Cursor("a", ROW), fingerprint=FINGERPRINT, total_size=1, keys=(OLD_KEY, KEY)
    )
    decode_page_token(token, fingerprint=FINGERPRINT, ordering=BY_EMAIL, keys=(OLD_KEY,))
    with pytest.raises(InvalidArgument):
        decode_page_token(token, fingerprint=FINGERPRINT, ordering=BY_EMAIL, keys=(KEY,))


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_a_time_outside_the_utc_range_is_malformed(moment: str) -> None:
    assert page_token_error(encode_body(body(k=[moment, str(ROW)])))
