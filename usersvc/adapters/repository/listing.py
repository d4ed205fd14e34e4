"""ListUsers as SQL: one keyset page (never OFFSET) and an exact count.

The filter becomes a WHERE clause (usersvc.adapters.repository.filters);
rows come strictly after the cursor in the ordering, ties broken by id in the
same direction. Page tokens are decoded and checked by
usersvc.services.pagination before a cursor gets here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Uuid, func, literal, select, tuple_
from sqlalchemy.sql import Select

from usersvc.adapters.orm import users_table
from usersvc.adapters.repository.filters import filter_clause
from usersvc.adapters.repository.user_rows import SELECT_USERS, users
from usersvc.domain.listing import Cursor, Filter, ListQuery, SortField
from usersvc.domain.models import User


def page_statement(query: ListQuery) -> Select[Any]:
    """The rows of one page plus one, which tells whether another follows.
    Raises ValueError for a page size below 1 or a cursor whose value does
    not fit the ordering (the service checks both first); InvalidArgument
    (field "filter") for a comparison without meaning."""
    if query.page_size < 1:
        raise ValueError(f"page_size must be at least 1, not {query.page_size}")
    field = query.ordering.field
    sort_key = _sort_key(field)
    statement = SELECT_USERS.where(_visible(query.filter, show_deleted=query.show_deleted))
    if query.after is not None:
        row_key = tuple_(sort_key, users.id)
        bound = tuple_(_cursor_value(field, query.after), literal(query.after.id, Uuid))
        statement = statement.where(
            row_key < bound if query.ordering.descending else row_key > bound
        )
    if query.ordering.descending:
        statement = statement.order_by(sort_key.desc(), users.id.desc())
    else:
        statement = statement.order_by(sort_key.asc(), users.id.asc())
    return statement.limit(query.page_size + 1)


def count_statement(filter: Filter, *, show_deleted: bool) -> Select[Any]:
    """The exact number of users matching. Raises InvalidArgument (field
    "filter") for a comparison without meaning."""
    return (
        select(func.count())
        .select_from(users_table)
        .where(_visible(filter, show_deleted=show_deleted))
    )


def cursor_after(field: SortField, user: User) -> Cursor:
    """The cursor of the page that starts after ``user``. Raises nothing."""
    sort_value: str | datetime
    match field:
        case SortField.CREATE_TIME:
            sort_value = user.create_time
        case SortField.EMAIL:
            sort_value = user.email
        case SortField.DISPLAY_NAME:
            sort_value = user.display_name
    return Cursor(sort_value=sort_value, id=user.id)


def _visible(flt: Filter, *, show_deleted: bool) -> ColumnElement[bool]:
    clause = filter_clause(flt)
    if show_deleted:
        return clause
    return clause & users.delete_time.is_(None)


def _sort_key(field: SortField) -> ColumnElement[Any]:
    match field:
        case SortField.CREATE_TIME:
            return users.create_time
        case SortField.EMAIL:
            # lower(email), not email: the unique index is on lower(email).
            return func.lower(users.email)
        case SortField.DISPLAY_NAME:
            return users.display_name


def _cursor_value(field: SortField, cursor: Cursor) -> ColumnElement[Any]:
    value = cursor.sort_value
    if field is SortField.CREATE_TIME:
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError("a create_time cursor holds an aware datetime")
        return literal(value, users.create_time.type)
    if not isinstance(value, str) or "\x00" in value:
        raise ValueError(f"a {field.value} cursor holds text without NUL")
    if field is SortField.EMAIL:
        return func.lower(literal(value, users.email.type))
    return literal(value, users.display_name.type)
