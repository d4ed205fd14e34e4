"""ListUsers as SQL: one keyset page (never OFFSET), and the number of
matches a first page reports (exact up to a cap, an estimate beyond: see
``capped_count_statement`` and ``MATCH_STATISTICS``).

The filter becomes a WHERE clause (usersvc.adapters.repository.filters);
rows come strictly after the cursor in the ordering, ties broken by id in the
same direction. Page tokens are decoded and checked by
usersvc.services.pagination before a cursor gets here.

A page with a byte budget (``ListQuery.max_bytes``) sums the rows' sizes
as it goes (usersvc.adapters.repository.sizes.WIRE_BYTES) and sends no
row past the first one over the budget: 1,000 users with the largest labels
are 21 MB, of which a 4 MiB response takes 190.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnClause,
    ColumnElement,
    Float,
    Integer,
    Uuid,
    bindparam,
    column,
    func,
    literal,
    literal_column,
    or_,
    over,
    select,
    text,
    tuple_,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ClauseElement, Executable, Select

from usersvc.adapters.orm import users_table
from usersvc.adapters.repository.filters import filter_clause
from usersvc.adapters.repository.sizes import WIRE_BYTES
from usersvc.adapters.repository.user_rows import (
    SELECT_USERS,
    USER_COLUMNS,
    user_from_row,
    users,
    with_holder,
)
from usersvc.domain.listing import Cursor, Filter, ListQuery, Ordering, Page, SortField, cursor_of

# The column of a budgeted page's rows that says whether the row belongs
# to the page (true) or only tells that more follow (false).
WITHIN_BUDGET = "within_budget"


def page_statement(query: ListQuery) -> Select[Any]:
    """The rows of one page plus one, which tells whether another follows.
    With ``query.max_bytes``, the rows also carry WITHIN_BUDGET, and end
    at the first row over the budget (see ``budgeted``). Raises ValueError
    for a page size below 1 or a cursor whose value does not fit the
    ordering (the service checks both first); InvalidArgument (field
    "filter") for a comparison without meaning."""
    if query.page_size < 1:
        raise ValueError(f"page_size must be at least 1, not {query.page_size}")
    after = None
    if query.after is not None:
        after = (
            _cursor_value(query.ordering.field, query.after),
            literal(query.after.id, Uuid),
        )
    return _keyset_page(
        _visible(query.filter, show_deleted=query.show_deleted),
        query.ordering,
        after=after,
        limit=query.page_size + 1,
        max_bytes=None if query.max_bytes is None else literal(query.max_bytes, Integer),
    )


def _keyset_page(
    where: ColumnElement[bool],
    ordering: Ordering,
    *,
    after: tuple[ColumnElement[Any], ColumnElement[Any]] | None,
    limit: int | ColumnElement[int],
    max_bytes: ColumnElement[int] | None,
) -> Select[Any]:
    sort_key = _sort_key(ordering.field)
    statement = SELECT_USERS.where(where)
    if after is not None:
        row_key = tuple_(sort_key, users.id)
        bound = tuple_(*after)
        statement = statement.where(row_key < bound if ordering.descending else row_key > bound)
    if ordering.descending:
        statement = statement.order_by(sort_key.desc(), users.id.desc())
    else:
        statement = statement.order_by(sort_key.asc(), users.id.asc())
    statement = statement.limit(limit)
    if max_bytes is None:
        return statement
    return budgeted(statement, sort_key, max_bytes, descending=ordering.descending)


# The two layers a budgeted page gets around it name the page's columns
# rather than taking them from the page (which varies with the filter and
# the cursor): built once, they cost a call no column collections (building
# them per call took 1 ms, the page itself 0.15 ms).
_USER_COLUMNS = tuple(column(c.name, c.type) for c in USER_COLUMNS)
_SORT_KEY: ColumnClause[Any] = column("sort_key")
_ROW_ID = column("id", Uuid)
_ROW_BYTES = column("wire_bytes", Integer)
_RUNNING = column("running_bytes", BigInteger)
_POSITION = column("page_position", BigInteger)
_ORDER = {
    False: (_SORT_KEY.asc(), _ROW_ID.asc()),
    True: (_SORT_KEY.desc(), _ROW_ID.desc()),
}
_SIZED_COLUMNS = {
    descending: (
        *_USER_COLUMNS,
        _SORT_KEY,
        _ROW_BYTES,
        over(func.sum(_ROW_BYTES), order_by=order, rows=(None, 0)).label(_RUNNING.name),
        over(func.row_number(), order_by=order, rows=(None, 0)).label(_POSITION.name),
    )
    for descending, order in _ORDER.items()
}


def budgeted(
    page: Select[Any],
    sort_key: ColumnElement[Any],
    max_bytes: int | ColumnElement[int],
    *,
    descending: bool,
) -> Select[Any]:
    """The rows of ``page`` (ordered by ``sort_key`` and id, limited) while
    their running sum of WIRE_BYTES stays within ``max_bytes`` (the first
    row always), plus the row after them, each with WITHIN_BUDGET.

    PostgreSQL still walks the page's LIMIT through the index and sums
    every row's size (a window function cannot end a scan), but sends only
    these rows: no row past the budget is read from the result, converted
    or freed. Raises nothing."""
    page_rows = page.add_columns(
        sort_key.label(_SORT_KEY.name), WIRE_BYTES.label(_ROW_BYTES.name)
    ).subquery("page_rows")
    sized = select(*_SIZED_COLUMNS[descending]).select_from(page_rows).subquery("sized_rows")
    budget = max_bytes if isinstance(max_bytes, ColumnElement) else literal(max_bytes, Integer)
    within = or_(budget >= _RUNNING, _POSITION == 1)
    # Every row whose predecessors fit; the second always, in case the
    # first alone is over the budget.
    kept = or_(_POSITION <= 2, budget >= _RUNNING - _ROW_BYTES)
    return (
        select(*_USER_COLUMNS, within.label(WITHIN_BUDGET))
        .select_from(sized)
        .where(kept)
        .order_by(*_ORDER[descending])
    )


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
_MATCH_STATISTICS_SQL = """
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
MATCH_STATISTICS = text(_MATCH_STATISTICS_SQL).bindparams(table_name=users_table.name)
# The same as a relation of one row (none before the table's first
# statistics), for a page to carry (``lane_page_statement``).
_STATISTICS = (
    text(_MATCH_STATISTICS_SQL)
    .bindparams(table_name=users_table.name)
    .columns(
        column("live_rows", BigInteger),
        column("not_deleted_share", Float),
        column("planner_rows", Float),
    )
    .subquery("statistics")
)


def page_of(rows: Sequence[Any], query: ListQuery) -> Page:
    """The page of ``query`` from the rows of its statement (RowMappings
    or asyncpg Records, in order; see ``page_statement``). Raises
    nothing."""
    kept = rows[: query.page_size]
    if query.max_bytes is not None and kept and not kept[-1][WITHIN_BUDGET]:
        # Only the last row can be past the budget: it tells that more
        # follow, and is not the page's.
        kept = kept[:-1]
    found = tuple(user_from_row(row) for row in kept)
    more = len(rows) > len(found)
    next_cursor = cursor_of(query.ordering.field, found[-1]) if more else None
    return Page(users=found, next_cursor=next_cursor)


def table_estimate(statistics: Any, *, show_deleted: bool) -> float | None:
    """The users a query without a filter matches, from a row of
    MATCH_STATISTICS' columns (None: the table has no statistics yet).
    Raises nothing."""
    if statistics is None or not statistics["live_rows"]:
        return None
    share = 1.0 if show_deleted else statistics["not_deleted_share"]
    return float(statistics["live_rows"]) * (1.0 if share is None else float(share))


def settled_by_statistics(estimate: float | None, exact_up_to: int) -> int | None:
    """The total a query without a filter reports when the statistics
    alone settle it: beyond twice the exact cap, so that their staleness
    cannot cross the cap. None: count. Raises nothing."""
    if estimate is None or estimate <= 2 * exact_up_to:
        return None
    return round(estimate)


@dataclass(frozen=True, slots=True)
class LaneShape:
    """What decides the text of a read-lane page (``lane_page_statement``);
    everything else is a parameter."""

    ordering: Ordering
    show_deleted: bool
    after: bool
    budgeted: bool
    statistics: bool
    # The LIMIT (the page size plus one), written into the text: with a
    # parameter there, PostgreSQL plans every execution anew (a generic
    # plan of an unknown LIMIT looks too costly to reuse), and a first
    # page's statistics take a millisecond to plan; with a constant it
    # reuses one plan per connection from the sixth execution on.
    limit: int


# The read lane's parameters, by name (usersvc.adapters.read_lane).
HOLDER_ID = "holder_id"
AFTER_VALUE = "after_value"
AFTER_ID = "after_id"
MAX_BYTES = "max_bytes"


def lane_cursor_value(field: SortField, cursor: Cursor) -> str | datetime:
    """The AFTER_VALUE of ``cursor`` in an ordering by ``field``. Raises
    ValueError for a value that does not fit the ordering, as
    ``page_statement`` does."""
    value = cursor.sort_value
    if field is SortField.CREATE_TIME:
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError("a create_time cursor holds an aware datetime")
        return value
    if not isinstance(value, str) or "\x00" in value:
        raise ValueError(f"a {field.value} cursor holds text without NUL")
    return value


def lane_page_statement(shape: LaneShape) -> Select[Any]:
    """A page without a filter as one statement for the read lane: the
    page's rows (as ``page_statement``; one more than the page, with
    WITHIN_BUDGET when budgeted) with the caller's account (HOLDER_COLUMNS,
    for the re-check of a privileged token) and, for a first page, the
    table's statistics (the columns of MATCH_STATISTICS) on every row.
    There is always a row: an empty page is one row whose "id" is NULL.

    Its text depends on ``shape`` only: the values travel as the
    parameters HOLDER_ID, AFTER_VALUE and AFTER_ID (with ``shape.after``)
    and MAX_BYTES (when budgeted), so the lane compiles it once per shape.
    Raises ValueError for a limit below 2 (a page of at least one)."""
    if shape.limit < 2:
        raise ValueError(f"a page's LIMIT is its size plus one, not {shape.limit}")
    field = shape.ordering.field
    after = None
    if shape.after:
        value: ColumnElement[Any]
        if field is SortField.CREATE_TIME:
            value = bindparam(AFTER_VALUE, type_=users.create_time.type)
        elif field is SortField.EMAIL:
            value = func.lower(bindparam(AFTER_VALUE, type_=users.email.type))
        else:
            value = bindparam(AFTER_VALUE, type_=users.display_name.type)
        after = (value, bindparam(AFTER_ID, type_=Uuid))
    page = _keyset_page(
        _visible(Filter(), show_deleted=shape.show_deleted),
        shape.ordering,
        after=after,
        limit=literal_column(str(int(shape.limit)), Integer),
        max_bytes=bindparam(MAX_BYTES, type_=Integer) if shape.budgeted else None,
    ).subquery("page")
    statement = with_holder(_STATISTICS, page) if shape.statistics else with_holder(page)
    # The joins keep the page's order in practice, but only ORDER BY
    # promises it.
    sort_key: ColumnElement[Any] = page.c[field.value]
    if field is SortField.EMAIL:
        sort_key = func.lower(sort_key)
    if shape.ordering.descending:
        return statement.order_by(sort_key.desc(), page.c.id.desc())
    return statement.order_by(sort_key.asc(), page.c.id.asc())


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
    value = lane_cursor_value(field, cursor)
    if field is SortField.CREATE_TIME:
        return literal(value, users.create_time.type)
    if field is SortField.EMAIL:
        return func.lower(literal(value, users.email.type))
    return literal(value, users.display_name.type)
