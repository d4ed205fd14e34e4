"""ListUsers filters as SQL: a parsed ``Filter`` becomes one parameterised
boolean expression over the ``users`` table.

Every literal travels as a bound parameter, so a filter value can never change
the shape of the statement. The parser should only produce comparisons this
module supports; anything else is still refused here as INVALID_ARGUMENT
(field ``filter``) rather than reaching the database.

Semantics:
- ``email`` compares case-insensitively (both sides lower-cased);
  ``display_name`` case-sensitively. ``:`` is "contains" (substring), via
  ``strpos`` so ``%``, ``_`` and ``\\`` in the literal are plain characters.
- ``state`` supports ``=`` and ``!=``; it is computed from the timestamps as
  ``User.state`` does (deleted wins over disabled).
- ``roles:"admin"`` is "the roles array contains admin"; no other operator.
- ``create_time`` supports ``= != < <= > >=`` against a tz-aware datetime.
- ``labels.k = "v"`` / ``labels.k != "v"`` compare the value of key k;
  ``!=`` also matches users without the key, so ``=`` and ``!=`` partition
  the users. ``labels.k:*`` (value None) means "has key k" and
  ``labels.k:"v"`` means the value is v (AIP-160's has-operator on a map
  entry). ``labels:"k"`` means "has key k".
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, literal, not_, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import Text

from usersvc.adapters.orm import users_table
from usersvc.domain.errors import InvalidArgument
from usersvc.domain.listing import Comparison, Filter, FilterField, Op
from usersvc.domain.models import UserState

FILTER_FIELD = "filter"

_ORDERED_OPS: dict[Op, Callable[[Any, Any], Any]] = {
    Op.EQ: operator.eq,
    Op.NE: operator.ne,
    Op.LT: operator.lt,
    Op.LE: operator.le,
    Op.GT: operator.gt,
    Op.GE: operator.ge,
}


def filter_clause(flt: Filter) -> ColumnElement[bool]:
    """The conjunction of the filter's comparisons (TRUE when empty).

    Raises InvalidArgument (field "filter") for a comparison that has no
    meaning, e.g. ``roles = "admin"`` or a non-string email literal.
    """
    return and_(true(), *(comparison_clause(term) for term in flt.terms))


def comparison_clause(term: Comparison) -> ColumnElement[bool]:
    """One comparison as SQL. Raises InvalidArgument (field "filter")."""
    match term.field:
        case FilterField.EMAIL:
            return _email(term)
        case FilterField.DISPLAY_NAME:
            return _display_name(term)
        case FilterField.STATE:
            return _state(term)
        case FilterField.ROLES:
            return _roles(term)
        case FilterField.CREATE_TIME:
            return _create_time(term)
        case FilterField.LABELS:
            return _labels(term)
        case FilterField.EMAIL_VERIFIED:
            return _email_verified(term)
    raise _invalid(f"cannot filter on {term.field!r}")


def _email_verified(term: Comparison) -> ColumnElement[bool]:
    if term.op not in (Op.EQ, Op.NE) or not isinstance(term.value, bool):
        raise _invalid("email_verified supports only = true / = false (and !=)")
    column = users_table.c.email_verified
    return column == term.value if term.op is Op.EQ else column != term.value


def _email(term: Comparison) -> ColumnElement[bool]:
    value = _text_value(term)
    column = func.lower(users_table.c.email)
    literal = func.lower(value)
    if term.op is Op.HAS:
        return func.strpos(column, literal) > 0
    return _ordered(term, column, literal)


def _display_name(term: Comparison) -> ColumnElement[bool]:
    value = _text_value(term)
    column = users_table.c.display_name
    if term.op is Op.HAS:
        return func.strpos(column, value) > 0
    return _ordered(term, column, value)


def _state(term: Comparison) -> ColumnElement[bool]:
    if not isinstance(term.value, UserState):
        raise _invalid("state must be compared with STATE_ACTIVE, STATE_DISABLED or STATE_DELETED")
    deleted = users_table.c.delete_time.is_not(None)
    disabled = users_table.c.disable_time.is_not(None)
    is_state: ColumnElement[bool]
    match term.value:
        case UserState.DELETED:
            is_state = deleted
        case UserState.DISABLED:
            is_state = and_(not_(deleted), disabled)
        case UserState.ACTIVE:
            is_state = and_(not_(deleted), not_(disabled))
    if term.op is Op.EQ:
        return is_state
    if term.op is Op.NE:
        # The operands are IS [NOT] NULL tests, never NULL themselves, so NOT
        # is an exact complement.
        return not_(is_state)
    raise _invalid(f"state supports = and !=, not {term.op.value}")


def _roles(term: Comparison) -> ColumnElement[bool]:
    if term.op is not Op.HAS:
        raise _invalid(f'roles supports only ":" (e.g. roles:"admin"), not {term.op.value}')
    value = _text_value(term)
    return users_table.c.roles.contains(_text_array([value]))


def _create_time(term: Comparison) -> ColumnElement[bool]:
    value = term.value
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise _invalid("create_time must be compared with an RFC 3339 timestamp")
    if term.op is Op.HAS:
        raise _invalid('create_time does not support ":"')
    return _ordered(term, users_table.c.create_time, value)


def _labels(term: Comparison) -> ColumnElement[bool]:
    labels = users_table.c.labels
    clause: ColumnElement[bool]
    if term.label_key is None:
        # labels:"key"
        if term.op is not Op.HAS:
            raise _invalid('labels supports only ":" (e.g. labels:"team")')
        clause = labels.has_key(_text_value(term))
        return clause
    key = term.label_key
    if not key:
        raise _invalid("label key must not be empty")
    _check_text(key)
    if term.op is Op.HAS and term.value is None:
        clause = labels.has_key(key)
        return clause
    value = _text_value(term)
    entry = labels[key].astext
    if term.op in (Op.EQ, Op.HAS):
        clause = entry == value
    elif term.op is Op.NE:
        clause = entry.is_distinct_from(value)
    else:
        raise _invalid(f"labels.{key} supports =, != and :, not {term.op.value}")
    return clause


def _ordered(term: Comparison, column: Any, value: Any) -> ColumnElement[bool]:
    compare = _ORDERED_OPS.get(term.op)
    if compare is None:
        raise _invalid(f"{term.field.value} does not support {term.op.value}")
    result: ColumnElement[bool] = compare(column, value)
    return result


def _text_value(term: Comparison) -> str:
    name = term.field.value if term.label_key is None else f"labels.{term.label_key!r}"
    if not isinstance(term.value, str):
        raise _invalid(f"{name} must be compared with a quoted string")
    _check_text(term.value)
    return term.value


def _check_text(value: str) -> None:
    # PostgreSQL text cannot hold NUL; the driver would fail with a data error.
    if "\x00" in value:
        raise _invalid("strings must not contain NUL characters")


def _text_array(values: list[str]) -> Any:
    return literal(values, ARRAY(Text))


def _invalid(description: str) -> InvalidArgument:
    return InvalidArgument.single(FILTER_FIELD, description)
