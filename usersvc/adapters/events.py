"""The events table: writing events with changes, numbering them, reading them.

Writing adds no round trip. A repository write that returns user rows is
wrapped by ``with_events`` into one statement::

    WITH changed AS (UPDATE users ... RETURNING <user columns>),
         recorded AS (INSERT INTO events ... SELECT ... FROM changed)
    SELECT * FROM changed

PostgreSQL runs a data-modifying CTE to completion even when nothing reads
it, so the event is in the same statement, and therefore in the same
transaction, as the change: a rollback takes both away. The snapshot of the
user is built by PostgreSQL from the RETURNING row (``jsonb_build_object``
of the user columns, which never include the password hash).

Numbering (``sequence_pending``): rows are inserted without a sequence. One
sequencer at a time across the cluster (the transaction-level advisory lock
SEQUENCER_LOCK_KEY) numbers the committed, unnumbered rows after the highest
number so far, in one transaction, and announces the highest new number on
EVENTS_CHANNEL. Readers only ever see numbered rows, so a transaction that
started earlier but commits later gets a later number instead of leaving a
hole behind a reader that has already moved past it. The writing
transaction NOTIFYs nothing: the sequencer is woken after its commit
(usersvc.adapters.event_wakeup).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Text,
    and_,
    bindparam,
    case,
    column,
    func,
    insert,
    literal,
    select,
    text,
    true,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.sql import Select
from sqlalchemy.sql.dml import ReturningDelete, ReturningInsert, ReturningUpdate
from sqlalchemy.sql.selectable import CTE, TextualSelect

from usersvc.adapters.database_errors import translate_database_errors
from usersvc.adapters.orm import event_relay_mark_table, events_table, users_table
from usersvc.adapters.repository.user_rows import USER_COLUMNS, user_from_row
from usersvc.domain.errors import InvalidArgument
from usersvc.domain.events import (
    MAX_ATTRIBUTE_LENGTH,
    NO_CALL,
    CallContext,
    EventComparison,
    EventDraft,
    EventFilter,
    EventFilterField,
    EventQuery,
    EventType,
    LoginFailureCause,
    StoredEvent,
)
from usersvc.domain.models import User

# NOTIFY channels: a process whose own feed does not listen announces, after
# its commit, that it wrote events on INSERTED_CHANNEL (usersvc.adapters
# .event_wakeup; no payload); the sequencer announces the highest number it
# gave on EVENTS_CHANNEL (payload: that number).
INSERTED_CHANNEL = "usersvc_events_inserted"
EVENTS_CHANNEL = "usersvc_events"
# pg_advisory_xact_lock key of the sequencer ("usersvc" "seq" in ASCII hex).
SEQUENCER_LOCK_KEY = 0x7573_6572_7376_0001
# How many rows one sequencer transaction numbers at most.
SEQUENCE_BATCH = 5_000

CallContextProvider = Callable[[], CallContext]


def no_call() -> CallContext:
    """The context of work outside any call: no actor, no request id."""
    return NO_CALL


# The execution options that mark a statement writing events (a constant
# statement is built with them): after a commit that ran one, the unit of
# work wakes the sequencer (usersvc.adapters.event_wakeup).
WRITES_EVENTS_OPTION = "usersvc_writes_events"
WRITES_EVENTS: Mapping[str, Any] = MappingProxyType({WRITES_EVENTS_OPTION: True})

_e = events_table.c
_u = users_table.c
# The snapshot holds exactly the columns a User carries (never the password
# hash), so a column added there is in the events too.
USER_FIELDS = tuple(column.name for column in USER_COLUMNS)
_USER_FIELDS = USER_FIELDS
_INSERT_COLUMNS = [
    _e.id,
    _e.type,
    _e.user_id,
    _e.actor,
    _e.request_id,
    _e.user_snapshot,
    _e.changed_fields,
    _e.attributes,
]


def snapshot_sql(alias: str) -> str:
    """SQL text of the jsonb snapshot of the user columns of ``alias``, for
    statements written as text. Only constant column names go in; raises
    ValueError for an alias that is not a plain identifier."""
    if not alias.isidentifier():
        raise ValueError(f"not an identifier: {alias!r}")
    pairs = ", ".join(f"'{name}', {alias}.{name}" for name in _USER_FIELDS)
    return f"jsonb_build_object({pairs})"


def _snapshot_of(columns: Any) -> ColumnElement[Any]:
    """jsonb of the user columns of a row source (a table or a CTE)."""
    pairs: list[Any] = []
    for name in _USER_FIELDS:
        pairs.extend((literal(name, Text), getattr(columns, name)))
    return func.jsonb_build_object(*pairs)


def _clean_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    return {str(k)[:64]: str(v)[:MAX_ATTRIBUTE_LENGTH] for k, v in attributes.items()}


# The bind parameters that stand for the call's actor and request id in a
# statement built once and run for many calls (``events_about`` with
# ``context=None``); ``call_parameters`` gives their values for one call.
ACTOR_PARAMETER = "event_actor"
REQUEST_ID_PARAMETER = "event_request_id"


def call_parameters(context: CallContext) -> dict[str, str]:
    """The values of ACTOR_PARAMETER and REQUEST_ID_PARAMETER for a call
    made in ``context``. Raises nothing."""
    return {ACTOR_PARAMETER: context.actor, REQUEST_ID_PARAMETER: context.request_id}


def _event_columns(
    draft: EventDraft,
    context: CallContext | None,
    user_id: Any,
    snapshot: Any,
    changed_fields: Any = None,
) -> list[Any]:
    actor: Any
    request_id: Any
    if context is None:
        actor = bindparam(ACTOR_PARAMETER, type_=Text)
        request_id = bindparam(REQUEST_ID_PARAMETER, type_=Text)
    else:
        actor = literal(context.actor, Text)
        request_id = literal(context.request_id, Text)
    if changed_fields is None:
        changed_fields = literal(list(draft.changed_fields), ARRAY(Text))
    return [
        func.usersvc_uuid7(),
        literal(draft.type.value, Text),
        user_id,
        actor,
        request_id,
        snapshot,
        changed_fields,
        literal(_clean_attributes(draft.attributes), JSONB),
    ]


def with_events(
    write: ReturningInsert[Any] | ReturningUpdate[Any] | ReturningDelete[Any],
    drafts: Sequence[EventDraft],
    context: CallContext,
    *,
    snapshot: bool = True,
) -> Any:
    """``write`` (an INSERT/UPDATE/DELETE ... RETURNING the user columns,
    ``id`` at least) with one event per draft per returned row written by
    the same statement, marked with WRITES_EVENTS; the result rows are those
    of ``write``. Without drafts, ``write`` itself. ``snapshot=False``
    stores no user (a purge). Raises ValueError when a snapshot is asked of
    a write that does not return every user column."""
    if not drafts:
        return write
    # This runs for every change a call makes, so it builds almost nothing:
    # the SELECT of the write's rows is built once per RETURNING shape, the
    # INSERT of the events is constant text, and the drafts travel as one
    # jsonb parameter. Statements built afresh cost more Python than the
    # event costs PostgreSQL (docs/performance.md, "The event write").
    # The RETURNING columns as given (``exported_columns`` would build a
    # column collection, some 45 microseconds a write).
    shape = _returning_shape(write._returning)
    if snapshot and not shape.has_user:
        raise ValueError("a snapshot needs the write to return every user column")
    rows = [
        {
            "type": draft.type.value,
            "actor": context.actor,
            "request_id": context.request_id,
            "changed_fields": list(draft.changed_fields),
            "attributes": _clean_attributes(draft.attributes),
        }
        for draft in drafts
    ]
    recorded = _RECORD_EVENTS[snapshot].bindparams(events=rows).cte("recorded")
    return shape.select.add_cte(write.cte(_CHANGED), recorded)


# The name of the write's CTE in ``with_events``.
_CHANGED = "changed"


def _record_events(snapshot: str) -> TextualSelect:
    # One event per draft (in the drafts' order) per row of "changed".
    # Constant column names only: the values are the one parameter.
    return (
        text(
            f"""
            INSERT INTO events (id, type, user_id, actor, request_id, user_snapshot,
                                changed_fields, attributes)
            SELECT usersvc_uuid7(), draft.type, {_CHANGED}.id, draft.actor,
                   draft.request_id, {snapshot}, draft.changed_fields, draft.attributes
            FROM ROWS FROM (
                jsonb_to_recordset(:events) AS (type text, actor text, request_id text,
                                                changed_fields text[], attributes jsonb)
            ) WITH ORDINALITY AS draft (type, actor, request_id, changed_fields, attributes, n)
            CROSS JOIN {_CHANGED}
            ORDER BY draft.n
            """  # noqa: S608
        )
        .bindparams(bindparam("events", type_=JSONB))
        .columns()
    )


# By ``snapshot``: with the user as the write returned it, or without.
_RECORD_EVENTS = {
    True: _record_events(snapshot_sql(_CHANGED)),
    False: _record_events("NULL::jsonb"),
}


@dataclass(frozen=True)
class _ReturningShape:
    select: TextualSelect  # the rows of the CTE "changed", as the write returns them
    has_user: bool  # whether they hold every user column (a snapshot needs them)


@functools.lru_cache(maxsize=16)
def _returning_shape(columns: tuple[Any, ...]) -> _ReturningShape:
    # The CTE's rows by name, typed as the write's columns (so the results
    # convert as the write's would): reading them off the CTE object itself
    # would build its column collection for every statement. The names are
    # those of the write's own columns, never caller input.
    names = [str(c.key) for c in columns]
    rows = text(f"SELECT {', '.join(names)} FROM {_CHANGED}").columns(  # noqa: S608
        *(column(name, c.type) for name, c in zip(names, columns, strict=True))
    )
    return _ReturningShape(
        select=rows.execution_options(**WRITES_EVENTS),
        has_user=all(name in names for name in _USER_FIELDS),
    )


def events_about(
    changed: CTE,
    drafts: Sequence[EventDraft],
    context: CallContext | None,
    *,
    snapshot: bool = True,
    changed_fields: str | None = None,
) -> CTE:
    """The INSERT of one event per draft per row of ``changed`` (a CTE of
    a write returning the user columns, ``id`` at least), as a CTE for the
    caller to attach to its statement (``add_cte``): PostgreSQL runs it
    whether or not anything reads it. ``context=None``: the actor and
    request id are the bind parameters ACTOR_PARAMETER and
    REQUEST_ID_PARAMETER (``call_parameters``), for a statement built once.
    ``changed_fields`` names a text[] column of ``changed`` holding each
    row's changed fields, instead of the drafts' own (a write that finds
    out in the statement which values it changed). The caller marks its
    statement with WRITES_EVENTS, so that its commit wakes the sequencer.
    Raises nothing."""
    recorded = insert(events_table).from_select(
        _INSERT_COLUMNS,
        _rows_for(changed, drafts, context, snapshot=snapshot, changed_fields=changed_fields),
    )
    return recorded.cte("recorded")


def _rows_for(
    changed: CTE,
    drafts: Sequence[EventDraft],
    context: CallContext | None,
    *,
    snapshot: bool,
    changed_fields: str | None,
) -> Any:
    selects = [
        select(
            *_event_columns(
                draft,
                context,
                changed.c.id,
                _snapshot_of(changed.c) if snapshot else literal(None, JSONB),
                None if changed_fields is None else changed.c[changed_fields],
            )
        ).select_from(changed)
        for draft in drafts
    ]
    return selects[0] if len(selects) == 1 else union_all(*selects)


class SqlAlchemyEventRecorder:
    """usersvc.domain.ports.EventRecorder: events not carried by another
    write (a failed login, a session revocation), one statement each, in the
    unit of work's transaction. Every method raises DatabaseUnavailable."""

    def __init__(self, session: AsyncSession, context: CallContextProvider | None = None):
        self._session = session
        self._context = context or no_call

    @property
    def context(self) -> CallContext:
        """The actor and request id of the running call. Raises nothing."""
        return self._context()

    async def add(self, user_id: uuid.UUID | None, drafts: Sequence[EventDraft]) -> None:
        """Write the drafts about ``user_id`` (None: about nobody), with the
        user as it now is in this transaction (no user when the row is
        gone)."""
        if drafts:
            await self._insert_about(literal(user_id, _u.id.type), drafts)

    async def add_login_failure(self, email: str) -> None:
        """auth.login_failed for an attempt that found no account to check
        (find_login found no account, or a locked one): cause "locked" with the user
        when an account has this email (case-insensitive), else
        "unknown_email" without a user. The email itself is not stored."""
        found = (
            select(_u.id)
            .where(func.lower(_u.email) == func.lower(literal(email, Text)))
            .scalar_subquery()
        )
        await self._insert_about(
            found,
            [EventDraft(EventType.LOGIN_FAILED)],
            cause=(LoginFailureCause.LOCKED, LoginFailureCause.UNKNOWN_EMAIL),
        )

    async def _insert_about(
        self,
        user_id: Any,
        drafts: Sequence[EventDraft],
        *,
        cause: tuple[LoginFailureCause, LoginFailureCause] | None = None,
    ) -> None:
        # INSERT ... SELECT FROM (the id) LEFT JOIN users: one statement,
        # with the snapshot of the row when there is one.
        context = self._context()
        anchor = select(user_id.label("uid")).cte("anchor")
        source = anchor.outerjoin(users_table, _u.id == anchor.c.uid)
        snapshot = case((_u.id.is_(None), literal(None, JSONB)), else_=_snapshot_of(_u))
        selects = []
        for draft in drafts:
            columns = _event_columns(draft, context, anchor.c.uid, snapshot)
            if cause is not None:
                found, missing = cause
                columns[-1] = case(
                    (_u.id.is_(None), literal({"cause": missing.value}, JSONB)),
                    else_=literal({"cause": found.value}, JSONB),
                )
            selects.append(select(*columns).select_from(source))
        rows = selects[0] if len(selects) == 1 else union_all(*selects)
        with translate_database_errors():
            await self._session.execute(
                insert(events_table)
                .from_select(_INSERT_COLUMNS, rows)
                .execution_options(**WRITES_EVENTS)
            )


# --- numbering ------------------------------------------------------------------


async def sequence_pending(engine: AsyncEngine, *, batch: int = SEQUENCE_BATCH) -> int:
    """Number the committed, unnumbered events after the highest number, in
    insertion order, as the single sequencer of the cluster (other
    callers wait for the advisory lock, then see the rows numbered), and
    announce the highest number on EVENTS_CHANNEL. Returns how many rows it
    numbered; call again while it returns ``batch``. Raises
    DatabaseUnavailable."""
    with translate_database_errors():
        async with engine.begin() as conn:
            result = await conn.execute(
                _NUMBER_EVENTS,
                {"key": SEQUENCER_LOCK_KEY, "batch": batch, "channel": EVENTS_CHANNEL},
            )
            numbered = int(result.scalar_one())
    return numbered


# A pass of the sequencer is one call of the function usersvc_number_events
# (migration 0008; since 0009 it reads its queue from a floor): it takes the
# advisory lock, then numbers in a statement of its own, whose snapshot
# therefore sees every row numbered before the lock was granted (a lock
# taken inside the numbering statement would be granted after its
# snapshot), and announces the highest new number. One
# statement outside an explicit transaction is one round trip; BEGIN, the
# lock, the UPDATE and COMMIT as statements of their own were four, most of
# a pass's cost when it numbers a few rows (docs/performance.md, "The event
# write, second pass"). In the driver's parameter style, for the feed's own
# connection.
SEQUENCE_SQL = "SELECT usersvc_number_events($1, $2, $3)"
_NUMBER_EVENTS = text("SELECT usersvc_number_events(:key, :batch, :channel)")


async def sequence_pending_on(connection: Any, *, batch: int = SEQUENCE_BATCH) -> int:
    """``sequence_pending`` on a plain asyncpg connection (the feed's own,
    so numbering takes nothing from the pool), which must not be in a
    transaction: the statement's own transaction holds the lock and ends
    with it. Raises what asyncpg raises."""
    numbered = await connection.fetchval(SEQUENCE_SQL, SEQUENCER_LOCK_KEY, batch, EVENTS_CHANNEL)
    return int(numbered)


# --- publishing -------------------------------------------------------------------

_m = event_relay_mark_table.c
# How far the relay has published (usersvc.adapters.nats_relay): every
# numbered event up to it, none after it; 0 before the first mark (or with
# the mark's row gone).
PUBLISHED_THROUGH: ColumnElement[int] = func.coalesce(
    select(_m.published_through).where(_m.id == 1).scalar_subquery(), 0
)


# --- reading ----------------------------------------------------------------------

# The columns of a stored event, as event_from_row reads them.
EVENT_COLUMNS = (
    _e.id,
    _e.sequence,
    _e.type,
    _e.user_id,
    _e.actor,
    _e.request_id,
    _e.create_time,
    _e.user_snapshot,
    _e.changed_fields,
    _e.attributes,
)


def event_query(query: EventQuery) -> Select[Any]:
    """The SELECT of ``query``: numbered rows only. Raises InvalidArgument
    (field "filter") for a comparison without meaning."""
    return (
        select(*EVENT_COLUMNS)
        .where(
            _e.sequence.is_not(None),
            _e.sequence > query.after_sequence,
            event_filter_clause(query.filter),
        )
        .order_by(_e.sequence)
        .limit(query.limit)
    )


def event_filter_clause(flt: EventFilter) -> ColumnElement[bool]:
    """The conjunction of the filter's comparisons (TRUE when empty).
    Raises InvalidArgument (field "filter")."""
    return and_(true(), *(_comparison(term) for term in flt.terms))


def _comparison(term: EventComparison) -> ColumnElement[bool]:
    column: Any
    match term.field:
        case EventFilterField.TYPE:
            column = _e.type
        case EventFilterField.ACTOR:
            column = _e.actor
        case EventFilterField.USER_ID:
            column = _e.user_id
        case EventFilterField.CREATE_TIME:
            column = _e.create_time
    value: Any = term.value
    if term.op == ":":
        if not isinstance(value, str):
            raise InvalidArgument.single("filter", f"{term.field.value} does not support ':'")
        pattern = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.like("%" + pattern + "%", escape="\\")  # type: ignore[no-any-return]
    bound = literal(value, column.type)
    match term.op:
        case "=":
            return column == bound  # type: ignore[no-any-return]
        case "!=":
            # != also matches events about nobody (user_id NULL).
            return column.is_distinct_from(bound)  # type: ignore[no-any-return]
        case "<":
            return column < bound  # type: ignore[no-any-return]
        case "<=":
            return column <= bound  # type: ignore[no-any-return]
        case ">":
            return column > bound  # type: ignore[no-any-return]
        case ">=":
            return column >= bound  # type: ignore[no-any-return]
    raise InvalidArgument.single("filter", f"unsupported operator {term.op!r}")


def event_from_row(row: RowMapping) -> StoredEvent:
    """The StoredEvent of a row of the event columns. Raises KeyError,
    ValueError for a row that is not one."""
    snapshot = row["user_snapshot"]
    return StoredEvent(
        id=row["id"],
        sequence=row["sequence"],
        type=row["type"],
        user_id=row["user_id"],
        actor=row["actor"],
        request_id=row["request_id"],
        create_time=row["create_time"],
        user=None if snapshot is None else _user_from_snapshot(snapshot),
        changed_fields=tuple(row["changed_fields"]),
        attributes={str(k): str(v) for k, v in row["attributes"].items()},
    )


def _user_from_snapshot(data: Mapping[str, Any]) -> User:
    # JSON gives back text for the id and the times; the rest maps as a row.
    row: dict[str, Any] = dict(data)
    row["id"] = uuid.UUID(data["id"])
    row["roles"] = data["roles"] or []
    row["labels"] = data["labels"] or {}
    for name, value in data.items():
        if name.endswith("_time") and value is not None:
            row[name] = datetime.fromisoformat(value)
    return user_from_row(row)  # type: ignore[arg-type]


class SqlAlchemyEventReader:
    """usersvc.domain.ports.EventReader: numbered events, one statement per
    call on a pooled connection, nothing locked."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine

    async def list(self, query: EventQuery) -> list[StoredEvent]:
        """Raises InvalidArgument (filter), DatabaseUnavailable."""
        stmt = event_query(query)
        with translate_database_errors():
            async with self._engine.connect() as conn:
                result = await conn.execute(stmt)
                rows = result.mappings().all()
        return [event_from_row(row) for row in rows]
