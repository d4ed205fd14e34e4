"""Hypothesis strategies for any request message, derived from its
descriptor: every field of every type is filled (or left unset) with values
chosen to hurt, so a field added to the proto is fuzzed automatically.

Strings mix arbitrary Unicode (controls and NUL included; lone surrogates are
left out because protobuf cannot encode them: the malformed-bytes tests send
invalid UTF-8 instead), lengths around every documented limit, and values
that steer the request deeper into the service, chosen by the field's name
(ids of existing users, their emails and passwords, live etags and tokens,
filter and order_by grammar, field-mask paths). Integers hit the type's
bounds and the API's own edges; repeated fields and maps sometimes get
around a thousand entries; enums get unknown numbers too. A third of the
requests are "plausible" instead: every field set, mostly to valid values
naming one existing user, so the fuzzer also reaches the paths behind
validation (successful creates, logins, deletes, purges).
"""

from __future__ import annotations

import base64
import json
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from usersvc_protos.v1 import user_pb2

from .payloads import SQL_PAYLOADS

_F = FieldDescriptor
_NO_SURROGATES = st.characters(exclude_categories=("Cs",))
_ASCII = st.characters(min_codepoint=0, max_codepoint=127)
_MAX_DEPTH = 4

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# The API's own edges: page sizes (0 means 50, 1000 is the cap), batch sizes.
_INTERESTING_INTS = (-1, 0, 1, 2, 49, 50, 51, 999, 1000, 1001, 65_535, 65_536)

SPECIAL_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t",
    "\r\n",
    "me",
    "ME",
    "*",
    "null",
    "None",
    "undefined",
    "0",
    "-1",
    "\ufeff",
    "\u200b",
    "\u202e",
    "\u2028",
    "e\u0301",
    "\u0130",  # İ: lower() makes it two characters
    "\u00df",
    "\ufb01",
    "\U0001f600",
    "\uffff",
    "\ufffe",
    "\U0010ffff",
    "\ue000",
    "../../etc/passwd",
    "%s%s%s%n",
    "{0}{1}",
    "${jndi:ldap://x/a}",
    "<script>alert(1)</script>",
    "\\",
    '"',
    "'",
)

_LONG_CHARS = ("a", "\u00e9", "\u20ac", "\U0001f600", "\x00", "'", " ", "\u202e", "A")
_LONG_LENGTHS = (63, 64, 65, 71, 72, 73, 127, 128, 129, 200, 201, 254, 255, 256, 257, 1024)
_HUGE_LENGTHS = (2048, 2049, 4096, 65_536, 100_000)


def long_strings() -> st.SearchStrategy[str]:
    """One character repeated to a length around a documented limit, or far
    beyond every limit."""
    return st.builds(
        lambda char, size, tail: char * size + tail,
        st.sampled_from(_LONG_CHARS),
        st.sampled_from(_LONG_LENGTHS + _HUGE_LENGTHS),
        st.sampled_from(("", "@example.com", "x")),
    )


def arbitrary_text(max_size: int = 40, *, small: bool = False) -> st.SearchStrategy[str]:
    """Any text protobuf can carry; ``small`` leaves out the very long ones
    (for values repeated a thousand times)."""
    choices = [
        st.text(_NO_SURROGATES, max_size=max_size),
        st.text(_ASCII, max_size=max_size),
        st.sampled_from(SPECIAL_STRINGS),
        st.sampled_from(SQL_PAYLOADS),
    ]
    if not small:
        choices.append(long_strings())
    return st.one_of(choices)


@dataclass(frozen=True)
class PoolUser:
    id: str
    email: str
    etag: str
    password: str  # "" when the tests do not know it


@dataclass
class Pools:
    """Live values of the world under test, read when a value is drawn (the
    world changes while a test runs: users are purged, tokens revoked).
    Strategies draw an index, so they stay deterministic in shape. Half the
    time the index is shared by every pick of one example, so an email, a
    password, an id and an etag drawn for one request belong to the same
    user and the request gets past the first checks."""

    users: list[PoolUser] = field(default_factory=list)
    refresh_tokens: list[str] = field(default_factory=list)
    access_tokens: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)

    def pick(self, pool: str, *, coherent: bool = False) -> st.SearchStrategy[str]:
        """A value of one user's ``id``, ``email``, ``etag`` or ``password``,
        or of one of the token lists; ``coherent``: always the example's
        shared user."""

        def choose(index: int) -> str:
            if pool in ("id", "email", "etag", "password"):
                users = self.users
                return getattr(users[index % len(users)], pool) if users else ""
            values: list[str] = getattr(self, pool)
            return values[index % len(values)] if values else ""

        shared = st.shared(st.integers(0, 1 << 16), key="usersvc-pool-index")
        if coherent:
            return shared.map(choose)
        return st.one_of(shared, st.integers(0, 1 << 16)).map(choose)


def _mixed_case(text: str, mask: int) -> str:
    return "".join(c.upper() if (mask >> (i % 16)) & 1 else c for i, c in enumerate(text))


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_RESOURCE_FIELDS = tuple(f.name for f in user_pb2.User.DESCRIPTOR.fields)
_FILTER_FIELDS = (
    *_RESOURCE_FIELDS,
    "labels.team",
    "labels.a-b.c_d",
    "labels.",
    "labels.Team",
    "labels.1x",
    "Email",
    "password_hash",
    "users.email",
    "email.x",
    "nosuch",
    "",
)
_FILTER_OPS = ("=", "!=", "<", "<=", ">", ">=", ":", "==", "<>", "~", "=~", "", "IN", "LIKE")
_FILTER_WORDS = (
    "STATE_ACTIVE",
    "STATE_DISABLED",
    "STATE_DELETED",
    "STATE_UNSPECIFIED",
    "state_active",
    "*",
    "true",
    "NULL",
    "1",
    "-1",
    "1e309",
    "admin",
)
_TIMESTAMPS = (
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00.123456789+05:30",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59",
    "0000-01-01T00:00:00Z",
    "2024-02-30T00:00:00Z",
    "2024-01-01T24:00:00Z",
    "2024-01-01T00:00:60Z",
    "2024-01-01T00:00:00+24:00",
    "2024-01-01T00:00:00",
    "2024-01-01",
)
_JOINERS = (" AND ", " AND ", " and ", " OR ", " ", "AND", " AND NOT ", " AND AND ")


def filters() -> st.SearchStrategy[str]:
    """Strings near the ListUsers filter grammar: real fields and operators
    with hostile literals, and near misses of every part."""
    value = st.one_of(
        arbitrary_text(20).map(_quoted),
        st.sampled_from(_FILTER_WORDS),
        st.sampled_from(_TIMESTAMPS).map(_quoted),
        st.sampled_from(SQL_PAYLOADS),
        st.sampled_from(SQL_PAYLOADS).map(_quoted),
        st.text(_ASCII, max_size=10).map(lambda t: '"' + t),
    )
    term = st.builds(
        lambda f, ws1, op, ws2, v: f + ws1 + op + ws2 + v,
        st.one_of(st.sampled_from(_FILTER_FIELDS), st.sampled_from(SQL_PAYLOADS)),
        st.sampled_from(("", " ", "  ", "\t")),
        st.sampled_from(_FILTER_OPS),
        st.sampled_from(("", " ", "\n")),
        value,
    )
    joined = st.builds(
        lambda terms, joiner, prefix: prefix + joiner.join(terms),
        st.lists(term, min_size=1, max_size=4),
        st.sampled_from(_JOINERS),
        st.sampled_from(("", "", "NOT ", "-", "(", " ")),
    )
    many_terms = st.builds(lambda t, n: " AND ".join([t] * n), term, st.sampled_from((20, 21, 300)))
    return st.one_of(joined, many_terms)


def order_bys() -> st.SearchStrategy[str]:
    fields = ("create_time", "email", "display_name", "id", "state", "labels", "password_hash")
    suffixes = (
        "",
        " desc",
        " DESC",
        " asc",
        "  desc",
        " desc desc",
        ",email",
        "; DROP TABLE users",
    )
    return st.one_of(
        st.builds(lambda f, s: f + s, st.sampled_from(fields), st.sampled_from(suffixes)),
        st.sampled_from(SQL_PAYLOADS),
    )


def _forged_page_token(body: dict[str, Any]) -> str:
    data = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def page_tokens(pools: Pools) -> st.SearchStrategy[str]:
    """Tokens the server issued, and forgeries in the token's own format with
    hostile cursor values."""
    json_value: st.SearchStrategy[Any] = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        arbitrary_text(20),
        st.sampled_from(SQL_PAYLOADS),
    )
    forged = st.builds(
        lambda v, k, f, t: _forged_page_token({"v": v, "k": k, "f": f, "t": t}),
        st.one_of(st.just(1), json_value),
        st.one_of(st.lists(json_value, max_size=3), json_value),
        st.one_of(st.text(string.hexdigits, min_size=16, max_size=16), json_value),
        st.one_of(st.integers(-1, 2**31), json_value),
    )
    return st.one_of(
        pools.pick("page_tokens"),
        forged,
        st.binary(max_size=60).map(lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()),
    )


def tokens(pools: Pools) -> st.SearchStrategy[str]:
    return st.one_of(
        pools.pick("refresh_tokens"),
        pools.pick("access_tokens"),
        st.builds(lambda t, cut: t[:cut], pools.pick("access_tokens"), st.integers(0, 400)),
        st.text(string.ascii_letters + string.digits + "-_", min_size=40, max_size=50),
        st.builds(
            lambda parts: ".".join(parts),
            st.lists(st.text(string.ascii_letters + "-_=", max_size=30), min_size=1, max_size=4),
        ),
    )


def emails(pools: Pools) -> st.SearchStrategy[str]:
    return st.one_of(
        pools.pick("email"),
        st.builds(_mixed_case, pools.pick("email"), st.integers(0, 1 << 16)),
        st.builds(lambda e: f"  {e}\t", pools.pick("email")),
        st.emails(),
        st.sampled_from(
            (
                "a@b",
                "@example.com",
                "a@@example.com",
                "a..b@example.com",
                ".a@example.com",
                "a@example.123",
                "a@-example.com",
                "o'reilly@example.com",
                "%@example.com",
                "_@example.com",
                "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a",
                "\u0130nfo@example.com",
                "a@xn--bcher-kva.example",
                "a" * 64 + "@example.com",
                "a" * 65 + "@example.com",
                "a@" + "b" * 63 + ".com",
                "a@" + ("b" * 60 + ".") * 5 + "com",
            )
        ),
    )


def passwords(pools: Pools) -> st.SearchStrategy[str]:
    return st.one_of(
        pools.pick("password"),
        pools.pick("password"),
        st.text(string.ascii_letters + string.digits + "-!", min_size=12, max_size=24),
        st.sampled_from(("password", "12345678", "x" * 72, "x" * 73, "\u20ac" * 24, "\u20ac" * 25)),
        st.text(_NO_SURROGATES, min_size=8, max_size=30),
    )


def user_ids(pools: Pools) -> st.SearchStrategy[str]:
    return st.one_of(
        pools.pick("id"),
        pools.pick("id").map(str.upper),
        st.sampled_from(("me", "Me", "", "00000000-0000-0000-0000-000000000000")),
        st.uuids().map(str),
        st.uuids().map(lambda u: u.hex),
        st.uuids().map(lambda u: "{" + str(u) + "}"),
    )


def mask_paths() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(("*", "", " email", "Email", "user.email", "labels.team", "email,roles")),
        st.sampled_from(_RESOURCE_FIELDS),
    )


def label_keys() -> st.SearchStrategy[str]:
    return st.one_of(
        st.from_regex(r"[a-z][a-z0-9_.-]{0,62}", fullmatch=True),
        st.sampled_from(("a" * 63, "a" * 64, "A", "1a", "", "team", "a b", "a\x00")),
    )


_USER_FIELDS = {"email": "email", "password": "password", "current_password": "password"}
_FRESH = {
    "email": st.from_regex(
        r"[a-z][a-z0-9._+-]{0,15}@[a-z][a-z0-9-]{0,15}\.(com|org|io)", fullmatch=True
    ),
    "password": st.text(string.ascii_letters + string.digits + "-!", min_size=12, max_size=24),
    "id": st.uuids().map(str),
}


def _string_hints(name: str, pools: Pools, mode: str) -> st.SearchStrategy[str] | None:
    """Values worth trying for a string field, judged by its name alone.
    Plausible requests mostly name the example's one pool user, or a new
    but valid value."""
    if mode == PLAUSIBLE:
        attribute = _USER_FIELDS.get(name) or (
            "id" if name in ("id", "ids", "user_id") else "etag" if name == "etag" else None
        )
        if attribute is not None:
            coherent = pools.pick(attribute, coherent=True)
            return st.one_of(coherent, _FRESH.get(attribute, coherent))
    checks: list[tuple[Callable[[str], bool], Callable[[], st.SearchStrategy[str]]]] = [
        (lambda n: n == "request_id", lambda: st.text(string.printable, max_size=10)),
        (lambda n: n.endswith("email"), lambda: emails(pools)),
        (lambda n: "password" in n, lambda: passwords(pools)),
        (lambda n: n in ("id", "ids", "user_id") or n.endswith("_ids"), lambda: user_ids(pools)),
        (lambda n: n == "etag", lambda: pools.pick("etag")),
        (lambda n: n == "filter", filters),
        (lambda n: n == "order_by", order_bys),
        (lambda n: n == "page_token", lambda: page_tokens(pools)),
        (lambda n: "token" in n, lambda: tokens(pools)),
        (lambda n: n == "roles", lambda: st.sampled_from(("user", "admin", "service", "root"))),
        (lambda n: n == "paths", mask_paths),
    ]
    for matches, make in checks:
        if matches(name):
            return make()
    return None


def _integers(kind: int) -> st.SearchStrategy[int]:
    if kind in (_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32):
        lo, hi = INT32
    elif kind in (_F.TYPE_UINT32, _F.TYPE_FIXED32):
        lo, hi = 0, 2**32 - 1
    elif kind in (_F.TYPE_UINT64, _F.TYPE_FIXED64):
        lo, hi = 0, 2**64 - 1
    else:
        lo, hi = INT64
    edges = sorted({v for v in (lo, lo + 1, hi - 1, hi, *_INTERESTING_INTS) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


# How a value is drawn: "hostile" anything goes; "small" the same without
# the very long values (for an item repeated a thousand times); "plausible"
# mostly valid values, so that requests get past validation into the
# service's deeper paths.
HOSTILE, SMALL, PLAUSIBLE = "hostile", "small", "plausible"
_PLAIN_TEXT = st.text(string.ascii_letters + string.digits + " .-_", max_size=20)


def _scalar(fd: FieldDescriptor, pools: Pools, mode: str) -> st.SearchStrategy[Any]:
    kind = fd.type
    if kind == _F.TYPE_STRING:
        hints = _string_hints(fd.name, pools, mode)
        if mode == PLAUSIBLE:
            return _PLAIN_TEXT if hints is None else hints
        generic = arbitrary_text(small=mode == SMALL)
        return generic if hints is None else st.one_of(hints, hints, generic)
    if kind == _F.TYPE_BYTES:
        if mode != HOSTILE:
            return st.binary(max_size=64)
        return st.one_of(st.binary(max_size=64), st.binary(min_size=4096, max_size=5000))
    if kind == _F.TYPE_BOOL:
        return st.booleans()
    if kind == _F.TYPE_DOUBLE:
        return st.floats()
    if kind == _F.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == _F.TYPE_ENUM:
        known = [value.number for value in fd.enum_type.values]
        if fd.enum_type.is_closed or mode == PLAUSIBLE:
            return st.sampled_from(known)
        return st.one_of(st.sampled_from(known), _integers(_F.TYPE_INT32))
    if mode == PLAUSIBLE:
        return st.integers(0, 100)
    return _integers(kind)


def _value(fd: FieldDescriptor, pools: Pools, depth: int, mode: str) -> st.SearchStrategy[Any]:
    if fd.type == _F.TYPE_MESSAGE:
        return _message(fd.message_type, pools, depth + 1, mode)
    return _scalar(fd, pools, mode)


def _field(fd: FieldDescriptor, pools: Pools, depth: int, mode: str) -> st.SearchStrategy[Any]:
    # Around the API's limits (64 labels, 1000 items), one small drawn value
    # repeated: cheap to generate, and the message stays under the size limit.
    counts = st.sampled_from((64, 65, 1000, 1001))
    if fd.type == _F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
        key_fd = fd.message_type.fields_by_name["key"]
        value_fd = fd.message_type.fields_by_name["value"]
        if mode == PLAUSIBLE:
            keys = st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)
            return st.dictionaries(keys, _value(value_fd, pools, depth, mode), max_size=2)
        keys = _scalar(key_fd, pools, mode)
        if key_fd.type == _F.TYPE_STRING:
            keys = st.one_of(label_keys(), keys)
        few = st.dictionaries(keys, _value(value_fd, pools, depth, mode), max_size=4)
        if mode == SMALL:
            return few
        many = st.builds(
            lambda value, count: {f"k{i}": value for i in range(count)},
            _value(value_fd, pools, depth, SMALL),
            counts,
        )
        return st.one_of(few, many)
    if not fd.is_repeated:
        return _value(fd, pools, depth, mode)
    if mode == PLAUSIBLE:
        return st.lists(_value(fd, pools, depth, mode), max_size=2)
    few_items = st.lists(_value(fd, pools, depth, mode), max_size=4)
    if mode == SMALL:
        return few_items
    many_items = st.builds(
        lambda value, count: [value] * count, _value(fd, pools, depth, SMALL), counts
    )
    return st.one_of(few_items, many_items)


def _message(
    descriptor: Descriptor, pools: Pools, depth: int, mode: str
) -> st.SearchStrategy[Message]:
    message_class = message_factory.GetMessageClass(descriptor)
    if depth > _MAX_DEPTH:
        return st.builds(message_class)
    fields = {fd.name: _field(fd, pools, depth, mode) for fd in descriptor.fields}
    # Plausible requests set every field; hostile ones any subset.
    values = (
        st.fixed_dictionaries(fields)
        if mode == PLAUSIBLE
        else st.fixed_dictionaries({}, optional=fields)
    )
    return values.map(lambda chosen: build_message(message_class, chosen))


def message_strategy(descriptor: Descriptor, pools: Pools) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with any subset of fields set: a
    third of them plausible, the rest hostile."""
    return st.one_of(
        _message(descriptor, pools, 0, PLAUSIBLE),
        _message(descriptor, pools, 0, HOSTILE),
        _message(descriptor, pools, 0, HOSTILE),
    )


def build_message(message_class: type[Message], values: dict[str, Any]) -> Message:
    """A message of ``message_class`` with ``values`` set field by field
    (messages copied in, lists extended, maps updated)."""
    message = message_class()
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        fd = fields[name]
        target = getattr(message, name)
        if fd.type == _F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].type == _F.TYPE_MESSAGE:
                for key, item in value.items():
                    target[key].CopyFrom(item)
            else:
                target.update(value)
        elif fd.is_repeated:
            target.extend(value)
        elif fd.type == _F.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message
