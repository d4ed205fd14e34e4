"""ListUsers ``filter`` and ``order_by``: an AIP-160 / AIP-132 subset.

Grammar (whitespace between tokens is free)::

    filter     := "" | term ("AND" term)*          at most 20 terms, 2048 characters
    term       := field op value
    field      := email | display_name | state | roles | create_time
                | email_verified | labels | labels.<key>
    op         := "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"
    value      := "double-quoted string" (escapes \\" and \\\\) | IDENT | "*"

``AND`` is a keyword and, as in AIP-160, case-sensitive: ``and`` is an error
that says so, never a silent field name. OR, NOT, "-" negation and parentheses
are not supported and say so.

What each comparison means (the repositories implement exactly this):

- ``email`` / ``display_name``: ``=``, ``!=``, ``<`` ... ``>=`` compare the
  text; ``:`` means "contains" (plain substring, no wildcards). Email
  literals are lower-cased (emails are stored lower-cased, so email
  comparisons are case-insensitive); display_name comparisons are
  case-sensitive.
- ``state``: ``=`` / ``!=`` with STATE_ACTIVE, STATE_DISABLED, STATE_DELETED
  (bare or quoted). Deleted users match only when the list shows deleted users.
- ``roles``: only ``roles:"admin"`` (holds the role).
- ``email_verified``: ``=`` / ``!=`` with ``true`` or ``false`` (bare or
  quoted).
- ``create_time``: ``=`` ... ``>=`` with a quoted RFC 3339 timestamp that
  names its offset ("2024-05-01T00:00:00Z"); parsed to an aware UTC datetime.
- ``labels.<key>``: ``=`` compares the value (the key must be present);
  ``!=`` also matches users without the key; ``labels.<key>:*`` means the key
  is present (Comparison value None); ``labels.<key>:"v"`` means
  ``labels.<key> = "v"`` (AIP-160 has-on-a-map-value) and is returned as EQ.
- ``labels:"key"``: the key is present (Comparison with label_key None and the
  key as value, as ``usersvc.domain.listing`` documents).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import TypeVar

from usersvc.domain.errors import InvalidArgument
from usersvc.domain.listing import (
    Comparison,
    Filter,
    FilterField,
    Op,
    Ordering,
    SortField,
)
from usersvc.domain.models import UserState
from usersvc.domain.validation import has_forbidden_characters, is_label_key

MAX_FILTER_LENGTH = 2048
_T = TypeVar("_T")
MAX_FILTER_TERMS = 20
MAX_ORDER_BY_LENGTH = 128

_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_WHITESPACE = frozenset(" \t\r\n")
_OPERATORS = {op.value: op for op in Op}
_STATE_NAMES = {
    "STATE_ACTIVE": UserState.ACTIVE,
    "STATE_DISABLED": UserState.DISABLED,
    "STATE_DELETED": UserState.DELETED,
}
_STATE_LITERALS = {state: name for name, state in _STATE_NAMES.items()}
_PLAIN_FIELDS = {
    "email": FilterField.EMAIL,
    "display_name": FilterField.DISPLAY_NAME,
    "state": FilterField.STATE,
    "roles": FilterField.ROLES,
    "create_time": FilterField.CREATE_TIME,
    "email_verified": FilterField.EMAIL_VERIFIED,
}
_FIELD_LIST = "create_time, display_name, email, email_verified, labels.<key>, roles, state"
_BOOLEANS = {"true": True, "false": False}
_LABELS_PREFIX = "labels."
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_ORDER_FIELDS = {field.value: field for field in SortField}


class _FilterSyntaxError(Exception):
    def __init__(self, position: int, message: str):
        self.position = position
        super().__init__(message)


class _Kind(enum.Enum):
    WORD = "word"
    STRING = "string"
    OPERATOR = "operator"
    STAR = "*"
    END = "end"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # raw text; a STRING token holds its unescaped value
    position: int


def parse_filter(text: str) -> Filter:
    """Parse a ListUsers filter; "" (or only whitespace) matches everything.

    Raises InvalidArgument with one FieldViolation on field "filter" whose
    description gives the 0-based character position of the problem.
    """
    return _parse_text(text, MAX_FILTER_LENGTH, lambda tokens: _Parser(tokens).parse())


def _parse_text(text: str, max_length: int, parse: Callable[[list[_Token]], _T]) -> _T:
    """``parse`` of the tokens of ``text``, a filter of at most ``max_length``
    characters (ListUsers' and the events'). Raises InvalidArgument with one
    FieldViolation on field "filter"."""
    if len(text) > max_length:
        raise InvalidArgument.single(
            "filter", f"must be at most {max_length} characters, got {len(text)}"
        )
    try:
        return parse(_tokenize(text))
    except _FilterSyntaxError as exc:
        raise InvalidArgument.single("filter", f"at position {exc.position}: {exc}") from None


def format_filter(filter: Filter) -> str:
    """The canonical text of a parsed filter: ``parse_filter`` of it gives the
    same Filter back, and filters that differ only in spacing, quoting of
    states or ``labels.k:"v"`` versus ``labels.k = "v"`` format the same."""
    return " AND ".join(_format_term(term) for term in filter.terms)


def parse_order_by(text: str) -> Ordering:
    """``create_time`` (default when empty), ``email`` or ``display_name``,
    optionally followed by ``desc`` or ``asc`` (any case), whitespace free.

    Raises InvalidArgument with one FieldViolation on field "order_by".
    """
    if len(text) > MAX_ORDER_BY_LENGTH:
        raise InvalidArgument.single(
            "order_by", f"must be at most {MAX_ORDER_BY_LENGTH} characters"
        )
    parts = text.split()
    if not parts:
        return Ordering()
    fields = ", ".join(_ORDER_FIELDS)
    if "," in text:
        raise InvalidArgument.single(
            "order_by", f"only one sort field is supported (one of {fields})"
        )
    field = _ORDER_FIELDS.get(parts[0])
    if field is None:
        raise InvalidArgument.single(
            "order_by", f"unknown sort field {parts[0]!r}; use one of {fields}"
        )
    if len(parts) == 1:
        return Ordering(field=field)
    if len(parts) == 2 and parts[1].lower() in ("asc", "desc"):
        return Ordering(field=field, descending=parts[1].lower() == "desc")
    raise InvalidArgument.single(
        "order_by", f'expected "<field>" or "<field> desc", got {text.strip()!r}'
    )


# -- tokenizer -----------------------------------------------------------------


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
        elif ch == '"':
            value, i_next = _read_string(text, i)
            tokens.append(_Token(_Kind.STRING, value, i))
            i = i_next
        elif text.startswith(("<=", ">=", "!="), i):
            tokens.append(_Token(_Kind.OPERATOR, text[i : i + 2], i))
            i += 2
        elif ch in "<>=:":
            tokens.append(_Token(_Kind.OPERATOR, ch, i))
            i += 1
        elif ch == "*":
            tokens.append(_Token(_Kind.STAR, ch, i))
            i += 1
        elif ch in _WORD_CHARS:
            start = i
            while i < n and text[i] in _WORD_CHARS:
                i += 1
            tokens.append(_Token(_Kind.WORD, text[start:i], start))
        else:
            raise _FilterSyntaxError(i, _unexpected_character(ch))
    tokens.append(_Token(_Kind.END, "", n))
    return tokens


def _unexpected_character(ch: str) -> str:
    if ch == "!":
        return "'!' must be followed by '=' (!=)"
    if ch in "()":
        return "parentheses are not supported; join comparisons with AND"
    if ch == "'":
        return "string literals use double quotes"
    return f"unexpected character {ch!r}"


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The unescaped literal starting at the quote at ``start``, and the
    index after its closing quote."""
    chars: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return "".join(chars), i + 1
        if ch == "\\":
            if i + 1 >= n:
                break
            escaped = text[i + 1]
            if escaped not in '"\\':
                raise _FilterSyntaxError(
                    i, f'unsupported escape \\{escaped}; only \\" and \\\\ are allowed'
                )
            chars.append(escaped)
            i += 2
            continue
        if has_forbidden_characters(ch):
            raise _FilterSyntaxError(i, "control characters are not allowed in a string")
        chars.append(ch)
        i += 1
    raise _FilterSyntaxError(start, 'unterminated string literal (missing closing ")')


# -- parser --------------------------------------------------------------------


class _Parser:
    def __init__(self, tokens: list[_Token]):
        self._tokens = tokens
        self._index = 0

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _next(self) -> _Token:
        token = self._tokens[self._index]
        if token.kind is not _Kind.END:
            self._index += 1
        return token

    def parse(self) -> Filter:
        if self._peek().kind is _Kind.END:
            return Filter()
        terms = [self._term()]
        while True:
            token = self._next()
            if token.kind is _Kind.END:
                return Filter(tuple(terms))
            if token.kind is not _Kind.WORD or token.text != "AND":
                raise _FilterSyntaxError(token.position, _expected_and(token))
            if len(terms) == MAX_FILTER_TERMS:
                raise _FilterSyntaxError(
                    token.position, f"at most {MAX_FILTER_TERMS} comparisons are allowed"
                )
            terms.append(self._term())

    def _term(self) -> Comparison:
        name = self._next()
        if name.kind is not _Kind.WORD:
            raise _FilterSyntaxError(name.position, f"expected a field name ({_FIELD_LIST})")
        if name.text in ("AND", "OR", "NOT", "and", "or", "not"):
            raise _FilterSyntaxError(name.position, f"expected a field name, got {name.text!r}")
        operator = self._next()
        op = _OPERATORS.get(operator.text) if operator.kind is _Kind.OPERATOR else None
        if op is None:
            raise _FilterSyntaxError(
                operator.position,
                f"expected an operator (=, !=, <, <=, >, >=, :) after {name.text!r}",
            )
        value = self._next()
        if value.kind not in (_Kind.STRING, _Kind.WORD, _Kind.STAR):
            raise _FilterSyntaxError(value.position, f"expected a value after {operator.text!r}")
        return _comparison(name, op, value)


def _expected_and(token: _Token) -> str:
    if token.kind is _Kind.WORD and token.text in ("and", "And"):
        return "keywords are case-sensitive: write AND"
    if token.kind is _Kind.WORD and token.text.upper() in ("OR", "NOT"):
        return f"{token.text.upper()} is not supported; only AND joins comparisons"
    return "expected AND between comparisons"


def _comparison(name: _Token, op: Op, value: _Token) -> Comparison:
    if name.text == "labels":
        return _labels_has(op, value)
    if name.text.startswith(_LABELS_PREFIX):
        key = name.text[len(_LABELS_PREFIX) :]
        if not is_label_key(key):
            raise _FilterSyntaxError(
                name.position,
                f"invalid label key {key!r}: 1..63 characters of [a-z0-9_.-] "
                "starting with a letter",
            )
        return _label_value(key, op, value)
    field = _PLAIN_FIELDS.get(name.text)
    if field is None:
        hint = "; negation is not supported" if name.text.startswith("-") else ""
        raise _FilterSyntaxError(
            name.position, f"unknown field {name.text!r}; filterable fields: {_FIELD_LIST}{hint}"
        )
    if value.kind is _Kind.STAR:
        raise _FilterSyntaxError(
            value.position, "'*' is only allowed in labels.<key>:* (key present)"
        )
    if field is FilterField.STATE:
        return _state(op, value)
    if field is FilterField.EMAIL_VERIFIED:
        return _email_verified(op, value)
    if field is FilterField.ROLES:
        if op is not Op.HAS:
            raise _FilterSyntaxError(value.position, 'roles supports only ":" (e.g. roles:"admin")')
        return Comparison(field, op, _non_empty_string(value, 'roles:"admin"'))
    if field is FilterField.CREATE_TIME:
        if op is Op.HAS:
            raise _FilterSyntaxError(
                value.position, "create_time supports =, !=, <, <=, >, >= (not :)"
            )
        return Comparison(field, op, _timestamp(value))
    text = _string(value, f'{name.text} = "..."')
    return Comparison(field, op, text.lower() if field is FilterField.EMAIL else text)


def _labels_has(op: Op, value: _Token) -> Comparison:
    if op is not Op.HAS or value.kind is _Kind.STAR:
        raise _FilterSyntaxError(
            value.position,
            'labels supports only labels:"key" (key present) or labels.<key> comparisons',
        )
    key = _string(value, 'labels:"key"')
    if not is_label_key(key):
        raise _FilterSyntaxError(value.position, f"invalid label key {key!r}")
    return Comparison(FilterField.LABELS, Op.HAS, key)


def _label_value(key: str, op: Op, value: _Token) -> Comparison:
    if value.kind is _Kind.STAR:
        if op is not Op.HAS:
            raise _FilterSyntaxError(value.position, "'*' needs ':' (labels.<key>:*)")
        return Comparison(FilterField.LABELS, Op.HAS, None, label_key=key)
    if op not in (Op.EQ, Op.NE, Op.HAS):
        raise _FilterSyntaxError(value.position, f"labels.{key} supports =, != and :")
    text = _string(value, f'labels.{key} = "..."')
    # AIP-160: has on a map value is equality; one spelling keeps the
    # repositories and the page-token fingerprint simple.
    return Comparison(FilterField.LABELS, Op.EQ if op is Op.HAS else op, text, label_key=key)


def _state(op: Op, value: _Token) -> Comparison:
    if op not in (Op.EQ, Op.NE):
        raise _FilterSyntaxError(value.position, "state supports only = and !=")
    state = _STATE_NAMES.get(value.text)
    if state is None:
        raise _FilterSyntaxError(
            value.position,
            f"unknown state {value.text!r}; use one of {', '.join(_STATE_NAMES)}",
        )
    return Comparison(FilterField.STATE, op, state)


def _email_verified(op: Op, value: _Token) -> Comparison:
    if op not in (Op.EQ, Op.NE):
        raise _FilterSyntaxError(value.position, "email_verified supports only = and !=")
    flag = _BOOLEANS.get(value.text)
    if flag is None:
        raise _FilterSyntaxError(value.position, "email_verified compares with true or false")
    return Comparison(FilterField.EMAIL_VERIFIED, op, flag)


def _string(value: _Token, example: str) -> str:
    if value.kind is not _Kind.STRING:
        raise _FilterSyntaxError(value.position, f"expected a double-quoted string, e.g. {example}")
    return value.text


def _non_empty_string(value: _Token, example: str) -> str:
    text = _string(value, example)
    if not text:
        raise _FilterSyntaxError(value.position, "the value must not be empty")
    return text


def _timestamp(value: _Token) -> datetime:
    text = _string(value, 'create_time >= "2024-01-01T00:00:00Z"')
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _FilterSyntaxError(
            value.position,
            'expected an RFC 3339 timestamp with an offset, e.g. "2024-01-01T00:00:00Z"',
        )
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        if zulu:
            tz = UTC
        else:
            if int(off_h) > 23 or int(off_m) > 59:
                raise ValueError("offset out of range")
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            tz = timezone(-offset if sign == "-" else offset)
        micros = int((fraction or "0")[:6].ljust(6, "0"))
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tz
        )
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _FilterSyntaxError(value.position, f"{text!r} is not a valid timestamp") from None


# -- formatting ----------------------------------------------------------------


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_term(term: Comparison) -> str:
    value = term.value
    if term.field is FilterField.LABELS:
        if term.label_key is None:
            return f"labels:{_quote(str(value))}"
        if value is None:
            return f"labels.{term.label_key}:*"
        return f"labels.{term.label_key} {term.op.value} {_quote(str(value))}"
    if isinstance(value, UserState):
        literal = _STATE_LITERALS[value]
    elif isinstance(value, bool):
        literal = "true" if value else "false"
    elif isinstance(value, datetime):
        literal = _quote(value.isoformat())
    else:
        literal = _quote(str(value))
    return f"{term.field.value} {term.op.value} {literal}"
