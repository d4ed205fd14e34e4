"""The ``filter`` of ListEvents and WatchEvents: the AIP-160 subset of
ListUsers (usersvc.domain.filtering, whose tokenizer, string and timestamp
rules this reuses) over the fields ``type``, ``user_id``, ``actor`` and
``create_time``::

    filter := "" | field op value ("AND" field op value)*

- ``type`` and ``actor``: ``=``, ``!=``, ``<`` ... ``>=`` compare the text;
  ``:`` means "contains".
- ``user_id``: ``=`` / ``!=`` (``:`` as ``=``) with a quoted UUID.
- ``create_time``: ``=`` ... ``>=`` with a quoted RFC 3339 timestamp that
  names its offset.
"""

from __future__ import annotations

import uuid

from usersvc.domain.events import EventComparison, EventFilter, EventFilterField
from usersvc.domain.filtering import (
    MAX_FILTER_TERMS,
    _expected_and,
    _FilterSyntaxError,
    _Kind,
    _parse_text,
    _quote,
    _string,
    _timestamp,
    _Token,
)

MAX_EVENT_FILTER_LENGTH = 1024
_FIELDS = {field.value: field for field in EventFilterField}
_FIELD_LIST = "actor, create_time, type, user_id"
_OPERATORS = frozenset({"=", "!=", "<", "<=", ">", ">=", ":"})


def parse_event_filter(text: str) -> EventFilter:
    """Parse an events filter; "" (or only whitespace) matches every event.

    Raises InvalidArgument with one FieldViolation on field "filter" whose
    description gives the 0-based character position of the problem.
    """
    return _parse_text(text, MAX_EVENT_FILTER_LENGTH, _parse)


def format_event_filter(flt: EventFilter) -> str:
    """The canonical text of a parsed filter (page tokens bind to it).
    Raises nothing."""
    parts = []
    for term in flt.terms:
        value = term.value
        literal = value.isoformat() if hasattr(value, "isoformat") else str(value)
        parts.append(f"{term.field.value} {term.op} {_quote(literal)}")
    return " AND ".join(parts)


def _parse(tokens: list[_Token]) -> EventFilter:
    index = 0

    def take() -> _Token:
        nonlocal index
        token = tokens[index]
        if token.kind is not _Kind.END:
            index += 1
        return token

    if tokens[0].kind is _Kind.END:
        return EventFilter()
    terms = [_term(take(), take(), take())]
    while True:
        token = take()
        if token.kind is _Kind.END:
            return EventFilter(tuple(terms))
        if token.kind is not _Kind.WORD or token.text != "AND":
            raise _FilterSyntaxError(token.position, _expected_and(token))
        if len(terms) == MAX_FILTER_TERMS:
            raise _FilterSyntaxError(
                token.position, f"at most {MAX_FILTER_TERMS} comparisons are allowed"
            )
        terms.append(_term(take(), take(), take()))


def _term(name: _Token, operator: _Token, value: _Token) -> EventComparison:
    if name.kind is not _Kind.WORD:
        raise _FilterSyntaxError(name.position, f"expected a field name ({_FIELD_LIST})")
    field = _FIELDS.get(name.text)
    if field is None:
        raise _FilterSyntaxError(
            name.position, f"unknown field {name.text!r}; filterable fields: {_FIELD_LIST}"
        )
    if operator.kind is not _Kind.OPERATOR or operator.text not in _OPERATORS:
        raise _FilterSyntaxError(
            operator.position,
            f"expected an operator (=, !=, <, <=, >, >=, :) after {name.text!r}",
        )
    op = operator.text
    if value.kind not in (_Kind.STRING, _Kind.WORD):
        raise _FilterSyntaxError(value.position, f"expected a value after {op!r}")
    match field:
        case EventFilterField.CREATE_TIME:
            if op == ":":
                raise _FilterSyntaxError(
                    value.position, "create_time supports =, !=, <, <=, >, >= (not :)"
                )
            return EventComparison(field, op, _timestamp(value))
        case EventFilterField.USER_ID:
            if op not in ("=", "!=", ":"):
                raise _FilterSyntaxError(value.position, "user_id supports only =, != and :")
            text = _string(value, 'user_id = "<uuid>"')
            try:
                user_id = uuid.UUID(text)
            except ValueError:
                raise _FilterSyntaxError(value.position, f"{text!r} is not a UUID") from None
            return EventComparison(field, "=" if op == ":" else op, user_id)
        case _:
            return EventComparison(field, op, _string(value, f'{name.text} = "..."'))
