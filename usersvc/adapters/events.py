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
hole behind a reader that has already moved past it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Text,
    and_,
    bindparam,
    case,
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
from sqlalchemy.sql.selectable import CTE

from usersvc.adapters.database_errors import translate_database_errors
from usersvc.adapters.orm import events_table, users_table
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

# NOTIFY channels: the trigger of the events table announces inserts (at
# commit) on INSERTED_CHANNEL; the sequencer announces the highest number it
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
# statement built once and run for many calls (``with_events`` with
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
        func.gen_random_uuid(),
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
    the same statement; the result rows are those of ``write``. Without
    drafts, ``write`` itself. ``snapshot=False`` stores no user (a purge).
    Raises nothing."""
    if not drafts:
        return write
    changed = write.cte("changed")
    return select(changed).add_cte(events_about(changed, drafts, context, snapshot=snapshot))


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
    out in the statement which values it changed). Raises nothing."""
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
            await self._session.execute(insert(events_table).from_select(_INSERT_COLUMNS, rows))


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
            # The lock first, in its own statement: the UPDATE's snapshot is
            # taken after it is granted, so it sees every row numbered by
            # the sequencer before us. (A lock taken inside the UPDATE's own
            # statement would be granted after its snapshot.)
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SEQUENCER_LOCK_KEY})
            result = await conn.execute(_SEQUENCE_AFTER_LOCK, {"batch": batch})
            numbers = [row[0] for row in result]
            if numbers:
                await conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": EVENTS_CHANNEL, "payload": str(max(numbers))},
                )
    return len(numbers)


# The numbering statement, in the driver's own parameter style ($1: the
# batch size), so that the feed can run it on its dedicated connection.
SEQUENCE_SQL = """
    WITH base AS (SELECT coalesce(max(sequence), 0) AS top FROM events),
    pending AS (
        SELECT id, row_number() OVER (ORDER BY position) AS n
        FROM (
            SELECT id, position FROM events WHERE sequence IS NULL
            ORDER BY position LIMIT $1
        ) AS oldest
    )
    UPDATE events SET sequence = base.top + pending.n
    FROM pending, base
    WHERE events.id = pending.id
    RETURNING events.sequence
"""
_SEQUENCE_AFTER_LOCK = text(SEQUENCE_SQL.replace("$1", ":batch"))


async def sequence_pending_on(connection: Any, *, batch: int = SEQUENCE_BATCH) -> int:
    """``sequence_pending`` on a plain asyncpg connection (the feed's own,
    so numbering takes nothing from the pool). Raises what asyncpg raises."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", SEQUENCER_LOCK_KEY)
        numbers = [row[0] for row in await connection.fetch(SEQUENCE_SQL, batch)]
        if numbers:
            await connection.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(max(numbers)))
    return len(numbers)


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
