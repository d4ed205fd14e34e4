"""ListUsers as SQL: one keyset page (never OFFSET), and the number of
matches a first page reports (exact up to a cap, an estimate beyond: see
``capped_count_statement`` and ``MATCH_STATISTICS``).

The filter becomes a WHERE clause (usersvc.adapters.repository.filters);
rows come strictly after the cursor in the ordering, ties broken by id in the
same direction. Page tokens are decoded and checked by
usersvc.services.pagination before a cursor gets here.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Uuid, func, literal, select, text, tuple_
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ClauseElement, Executable, Select

from usersvc.adapters.orm import users_table
from usersvc.adapters.repository.filters import filter_clause
from usersvc.adapters.repository.user_rows import SELECT_USERS, users
from usersvc.domain.listing import Cursor, Filter, ListQuery, SortField


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


def capped_count_statement(filter: Filter, *, show_deleted: bool, cap: int) -> Select[Any]:
    """How many users match, counting no further than ``cap + 1``: the scan
    stops there, so a first page over millions of rows costs at most
    ``cap + 1`` index or heap entries. Raises InvalidArgument (field
    "filter") for a comparison without meaning."""
    matching = (
        select(literal(1))
        .select_from(users_table)
        .where(_visible(filter, show_deleted=show_deleted))
        .limit(cap + 1)
        .subquery()
    )
    return select(func.count()).select_from(matching)


def planned_rows_statement(filter: Filter, *, show_deleted: bool) -> Executable:
    """``EXPLAIN (FORMAT JSON)`` of selecting the matches: the planner's row
    estimate, from the table's statistics, without running the query. Bind
    parameters stay parameters. Raises InvalidArgument (field "filter")."""
    return _Explain(
        select(literal(1))
        .select_from(users_table)
        .where(_visible(filter, show_deleted=show_deleted))
    )


def planned_rows(explained: Any) -> float:
    """The top plan node's "Plan Rows" from an ``EXPLAIN (FORMAT JSON)``
    answer (text or already decoded). Raises ValueError for anything else."""
    plans = json.loads(explained) if isinstance(explained, str | bytes) else explained
    try:
        return float(plans[0]["Plan"]["Plan Rows"])
    except (LookupError, TypeError) as exc:
        raise ValueError("not an EXPLAIN (FORMAT JSON) answer") from exc


# What the statistics say about the users table, for estimates beyond the
# cap: the live rows (the cumulative statistics, kept current by every
# insert and delete), the share of rows with no delete_time (from the last
# ANALYZE; none yet: all live), and the planner's own idea of the table's
# size (pg_class as of the last VACUUM/ANALYZE, scaled to the table's pages
# now, as the planner scales it), which turns a planned row count into a
# share of the table.
MATCH_STATISTICS = text(
    """
    SELECT s.n_live_tup AS live_rows,
           (SELECT st.null_frac FROM pg_stats AS st
            WHERE st.schemaname = s.schemaname AND st.tablename = s.relname
              AND st.attname = 'delete_time') AS not_deleted_share,
           CASE WHEN c.relpages > 0 AND c.reltuples >= 0
                THEN c.reltuples / c.relpages
                     * (pg_relation_size(c.oid) / current_setting('block_size')::float8)
           END AS planner_rows
    FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
    WHERE s.relid = CAST(:table_name AS regclass)
    """
).bindparams(table_name=users_table.name)


class _Explain(Executable, ClauseElement):
    """``EXPLAIN (FORMAT JSON) <statement>``: SQLAlchemy has no EXPLAIN of
    its own; this is its compiler extension's recipe."""

    inherit_cache = False

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement


@compiles(_Explain)
def _compile_explain(element: _Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN (FORMAT JSON) " + str(compiler.process(element.statement, **kw))


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
