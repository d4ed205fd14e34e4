"""ListUsers page tokens (AIP-158): opaque to callers, keyset inside.

A token is urlsafe base64 (no padding) of a 32-byte HMAC-SHA256 tag followed
by compact JSON::

    {"v": 2, "k": [<sort value>, "<id>"], "f": "<fingerprint>", "t": <total_size>}

``k`` is the cursor (the last row's sort value and id), ``t`` carries the
total counted on the first page. ``f`` binds the token to the query it was
issued for: a short hash of the canonical filter, order_by and show_deleted,
so a token reused with another query is refused instead of silently paging
through a different result.

The tag is computed with the first of the server's page-token keys (derived
from the signing key, see usersvc.services.tokens.KeyRing) and checked,
in constant time, against each of them before the JSON is read: a forged,
edited or truncated token (a made-up cursor, a made-up total) is refused as
INVALID_ARGUMENT on ``page_token`` and never reaches a query, and tokens
issued under the previous signing key stay valid while it is still
configured as a verification key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from usersvc.domain.errors import InvalidArgument
from usersvc.domain.filtering import format_filter
from usersvc.domain.listing import Cursor, Filter, Ordering, SortField
from usersvc.domain.validation import has_forbidden_characters

TOKEN_VERSION = 2
MAX_PAGE_TOKEN_LENGTH = 1024
_MAX_TOTAL = 2**31 - 1  # total_size is an int32 on the wire
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]+")
_KEYS = frozenset({"v", "k", "f", "t"})
_FIELD = "page_token"
_TAG_BYTES = 32


@dataclass(frozen=True, slots=True)
class PageToken:
    cursor: Cursor
    total_size: int


def query_fingerprint(filter: Filter, ordering: Ordering, show_deleted: bool) -> str:
    """A short hash naming the query; equal for filters that differ only in
    spelling (see ``format_filter``). Raises nothing."""
    if not filter.terms:
        return _unfiltered_fingerprint(ordering, show_deleted)
    return _fingerprint(filter, ordering, show_deleted)


# Remembered for queries without a filter (the common listing, every page of
# which asks): an Ordering and a bool name their query exactly. Filters are
# not cached: equal ones (the same instant in two time zones) can differ in
# their canonical text.
@functools.lru_cache(maxsize=16)
def _unfiltered_fingerprint(ordering: Ordering, show_deleted: bool) -> str:
    return _fingerprint(Filter(), ordering, show_deleted)


def _fingerprint(filter: Filter, ordering: Ordering, show_deleted: bool) -> str:
    canonical = json.dumps(
        [format_filter(filter), ordering.canonical(), show_deleted], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def encode_page_token(
    cursor: Cursor, *, fingerprint: str, total_size: int, keys: Sequence[bytes]
) -> str:
    """The token that resumes after ``cursor``, tagged with ``keys[0]``.
    Raises IndexError when ``keys`` is empty."""
    value = cursor.sort_value
    sort_value = value.isoformat() if isinstance(value, datetime) else value
    body = {
        "v": TOKEN_VERSION,
        "k": [sort_value, str(cursor.id)],
        "f": fingerprint,
        "t": total_size,
    }
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    tagged = _tag(keys[0], data) + data
    return base64.urlsafe_b64encode(tagged).rstrip(b"=").decode("ascii")


def decode_page_token(
    token: str, *, fingerprint: str, ordering: Ordering, keys: Sequence[bytes]
) -> PageToken:
    """The cursor and carried total of a token issued for the query named by
    ``fingerprint`` (whose ordering is ``ordering``) and tagged with one of
    ``keys``.

    Raises InvalidArgument (field "page_token") for a malformed, forged or
    altered token and for one issued for another filter, order_by or
    show_deleted.
    """
    body = _load(token, keys)
    if body.get("f") != fingerprint:
        raise InvalidArgument.single(
            _FIELD, "page_token was issued for another filter/order_by/show_deleted"
        )
    key, total = body["k"], body["t"]
    if not isinstance(key, list) or len(key) != 2:
        raise _malformed()
    if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total <= _MAX_TOTAL:
        raise _malformed()
    return PageToken(Cursor(_sort_value(key[0], ordering), _row_id(key[1])), total)


def _malformed() -> InvalidArgument:
    return InvalidArgument.single(
        _FIELD, "is not a page token this service issued; pass next_page_token unchanged"
    )


def _reject_constant(_: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _tag(key: bytes, data: bytes) -> bytes:
    # The one-shot form: the same HMAC-SHA256 without an HMAC object.
    return hmac.digest(key, data, "sha256")


def _authentic(tag: bytes, data: bytes, keys: Sequence[bytes]) -> bool:
    # Every key is tried (no early exit), each comparison in constant time.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(tag, _tag(key, data))
    return matched


def _load(token: str, keys: Sequence[bytes]) -> dict[str, Any]:
    if len(token) > MAX_PAGE_TOKEN_LENGTH or _TOKEN_TEXT.fullmatch(token) is None:
        raise _malformed()
    try:
        tagged = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise _malformed() from None
    tag, data = tagged[:_TAG_BYTES], tagged[_TAG_BYTES:]
    if len(tag) != _TAG_BYTES or not _authentic(tag, data, keys):
        raise _malformed()
    try:
        body = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (binascii.Error, ValueError, RecursionError):
        raise _malformed() from None
    if not isinstance(body, dict) or body.keys() != _KEYS:
        raise _malformed()
    if type(body["v"]) is not int or body["v"] != TOKEN_VERSION:
        raise _malformed()
    return body


def _sort_value(value: object, ordering: Ordering) -> str | datetime:
    # Stored emails and names never hold control characters or surrogates;
    # a forged cursor with them must not reach the database driver.
    if not isinstance(value, str) or has_forbidden_characters(value):
        raise _malformed()
    if ordering.field is not SortField.CREATE_TIME:
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _malformed() from None
    if moment.tzinfo is None:
        raise _malformed()
    try:
        # A time whose UTC form falls outside years 1..9999 cannot be sent
        # to the database.
        moment.astimezone(UTC)
    except OverflowError:
        raise _malformed() from None
    return moment


def _row_id(value: object) -> uuid.UUID:
    if not isinstance(value, str):
        raise _malformed()
    try:
        row_id = uuid.UUID(value)
    except ValueError:
        raise _malformed() from None
    if str(row_id) != value:
        raise _malformed()
    return row_id
